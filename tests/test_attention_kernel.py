"""attention_kernel (v2): the quantised float32 reference on CPU, and the CUDA kernels against it and against exact
attention (GPU tests, marked `gpu`)."""

from __future__ import annotations

import pytest
import torch

from fp8cookbook.errors import Fp8CookbookError
from fp8cookbook.fp8 import attention_kernel as ak

from fp8cookbook.fp8 import attention as fa
from fp8cookbook.fp8.numerics import quantize_fp8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _exact(q, k, v, sm_scale=None):
    """float64 attention, (B, S, H, D)."""
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    sm = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    o = torch.softmax(qd @ kd.transpose(-1, -2) * sm, -1) @ vd
    return o.transpose(1, 2)


def _random(B, nq, nkv, H, D, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(B, n, H, D, generator=g, device=device).bfloat16() for n in (nq, nkv, nkv))


def _outliers(B, nq, nkv, H, D, seed=0, device="cpu"):
    """As scripts/attention_kernel_bench.py: in 4 channels Q is 20-50x the rest and K has a 20-50 bias; Q x 0.2."""
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, n, H, D, generator=g, device=device) for n in (nq, nkv, nkv))
    ch = torch.randperm(D, generator=g, device=device)[:4]
    f = torch.tensor([20.0, 30.0, 40.0, 50.0], device=device)
    q[..., ch] *= f
    k[..., ch] += f
    return (q * 0.2).bfloat16(), k.bfloat16(), v.bfloat16()


def _per_tensor_scales(q, k, v):
    return [t.abs().amax().float().reshape(1) / 448 for t in (q, k, v)]


# --------------------------------------------------------------------------------------------- CPU
def test_reference_is_near_exact_attention_but_not_equal():
    q, k, v = _random(1, 64, 700, 2, 64)
    ex = _exact(q, k, v)
    errs = {(qk, pv): _rel(ak.attention_v2_reference(q, k, v, qk=qk, pv=pv), ex)
            for qk in ak.QK_MODES for pv in ak.PV_MODES}
    assert all(0.003 < e < 0.06 for e in errs.values()), errs
    # INT8 Q·K is finer than e4m3 on random data; the second P term removes most of P's rounding
    assert errs["int8", "fp8"] < errs["fp8", "fp8"]
    assert errs["int8", "fp8x2"] < errs["int8", "fp8"]


def test_uniform_softmax_returns_mean_of_v():
    """q = 0: every key weighs the same (P = 1, exact in e4m3); O is the mean of V as quantised per channel after
    smoothing, dequantised, plus V's mean added back."""
    q, k, v = _random(1, 8, 500, 2, 32, seed=1)
    out = ak.attention_v2_reference(torch.zeros_like(q), k, v)
    vh = v.transpose(1, 2)
    _, _, v_mu, v_sc = ak._smoothing(q.transpose(1, 2), k.transpose(1, 2), vh, None)
    v8 = ak._quant(vh.float() - v_mu[:, :, None], v_sc[:, :, None], "fp8") * v_sc[:, :, None] + v_mu[:, :, None]
    mean = v8.mean(2, keepdim=True).transpose(1, 2).expand_as(out)
    assert _rel(out, mean) < 0.005
    assert _rel(out, v.float().mean(1, keepdim=True).expand_as(out)) > 0.005  # V's rounding is there


def test_key_channel_bias_does_not_matter():
    """K's per-channel mean is removed before quantisation (softmax is invariant to it), so a large key bias changes
    the output by rounding only; per-tensor static e4m3 (today's kernel's formula) breaks down on the same input."""
    q, k, v = _random(1, 64, 600, 2, 64, seed=2)
    bias = torch.zeros(64)
    bias[:4] = torch.tensor([20.0, 30.0, 40.0, 50.0])
    kb = (k.float() + bias).bfloat16()
    base = ak.attention_v2_reference(q, k, v)
    biased = ak.attention_v2_reference(q, kb, v)
    ex = _exact(q, kb, v)
    assert _rel(biased, ex) < 0.06
    assert _rel(biased, base) < 0.06
    old = fa.fp8_attention_reference(q, kb, v, *_per_tensor_scales(q, kb, v))
    assert _rel(old, ex) > 2 * _rel(biased, ex)


def test_outlier_channels_stay_accurate():
    q, k, v = _outliers(1, 128, 1024, 2, 128, seed=3)
    ex = _exact(q, k, v)
    new = _rel(ak.attention_v2_reference(q, k, v), ex)
    old = _rel(fa.fp8_attention_reference(q, k, v, *_per_tensor_scales(q, k, v)), ex)
    print(f"outliers: v2 reference {new:.4f}, per-tensor e4m3 reference {old:.4f}")
    assert new < 0.06 and old > 0.3


def test_layouts_and_sm_scale_agree():
    q, k, v = _random(2, 40, 130, 3, 32, seed=4)
    a = ak.attention_v2_reference(q, k, v, sm_scale=0.2)
    b = ak.attention_v2_reference(*(t.transpose(1, 2) for t in (q, k, v)), layout="bhsd", sm_scale=0.2)
    torch.testing.assert_close(b.transpose(1, 2), a, rtol=0, atol=0)
    assert a.dtype == q.dtype and a.shape == q.shape
    assert _rel(a, _exact(q, k, v, 0.2)) < 0.06
    assert _rel(ak.attention_v2_reference(q, k, v), a) > 0.01  # sm_scale is used


def test_static_v_scale_is_used():
    """The checkpoint's static scales: V uses its per-tensor scale, unsmoothed; a scale far too small saturates V."""
    q, k, v = _random(1, 32, 300, 2, 64, seed=5)
    sc = _per_tensor_scales(q, k, v)
    ex = _exact(q, k, v)
    assert _rel(ak.fp8_attention_v2(q, k, v, scales=sc), ex) < 0.06
    bad = [sc[0], sc[1], sc[2] / 100]
    assert _rel(ak.fp8_attention_v2(q, k, v, scales=bad), ex) > 0.5


def test_cpu_entry_point_runs_the_reference_and_keeps_inputs():
    q, k, v = _random(1, 20, 50, 2, 16, seed=6)  # head_dim 16: no kernel, but the reference takes any size
    before = [t.clone() for t in (q, k, v)]
    out = ak.fp8_attention_v2(q, k, v)
    torch.testing.assert_close(out, ak.attention_v2_reference(q, k, v), rtol=0, atol=0)
    for t, b in zip((q, k, v), before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("kwargs, message", [
    ({"layout": "bsdh"}, "layout='bsdh'"),
    ({"qk": "int4"}, "qk='int4'"),
    ({"pv": "bf16"}, "pv='bf16'"),
    ({"scales": (1.0, 1.0)}, "scales must be"),
    ({"scales": (1.0, 0.0, 1.0)}, r"scales\[k\]"),
    ({"scales": (1.0, 1.0, torch.ones(1, 1))}, r"scales\[v\] has shape \[1, 1\]"),  # files.check_scale's rule
])
def test_bad_arguments_name_the_argument(kwargs, message):
    q, k, v = _random(1, 8, 8, 2, 32)
    with pytest.raises(Fp8CookbookError, match=message):
        ak.fp8_attention_v2(q, k, v, **kwargs)


def test_bad_shapes_name_the_tensor():
    q, k, v = _random(1, 8, 8, 2, 32)
    with pytest.raises(Fp8CookbookError, match="v .* differ"):
        ak.fp8_attention_v2(q, k, v[:, :4])
    with pytest.raises(Fp8CookbookError, match="k has shape"):
        ak.fp8_attention_v2(q, k[0], v)
    with pytest.raises(Fp8CookbookError, match="heads or head_dim"):
        ak.fp8_attention_v2(q, k[:, :, :1], v[:, :, :1])
    with pytest.raises(Fp8CookbookError, match="q is torch.int8"):
        ak.fp8_attention_v2(q.to(torch.int8), k, v)


def test_sage_is_the_default_kernel_and_triton_stays_selectable(monkeypatch):
    from fp8cookbook.fp8 import attention_diffusers as fd
    from fp8cookbook.fp8.attention_mode import DEFAULT_KERNEL, KERNELS, AttentionMode
    import inspect

    monkeypatch.delenv("FP8COOKBOOK_ATTENTION_KERNEL", raising=False)
    assert DEFAULT_KERNEL == "sage" and set(KERNELS) == {"sage", "triton", "cudnn"}
    assert AttentionMode.parse("auto").kernel == "sage" and fa.AttentionScales(name="x").kernel == "sage"
    assert inspect.signature(fd.install_fp8_attention).parameters["kernel"].default == "sage"
    monkeypatch.setenv("FP8COOKBOOK_ATTENTION_KERNEL", "triton")
    assert AttentionMode.parse("auto").kernel == "triton"
    monkeypatch.setenv("FP8COOKBOOK_ATTENTION_KERNEL", "sage2")
    with pytest.raises(Fp8CookbookError, match="FP8COOKBOOK_ATTENTION_KERNEL='sage2'"):
        AttentionMode.parse("auto")


def test_op_off_cuda_runs_the_static_reference_for_every_kernel():
    """Off CUDA no kernel runs: the op computes the static-scale reference whichever kernel was asked for."""
    q, k, v = _random(1, 30, 40, 2, 32, seed=9)
    sc = _per_tensor_scales(q, k, v)
    ref = fa.fp8_attention_reference(q, k, v, *sc, 32 ** -0.5)
    for kernel in ("sage", "triton"):
        out = torch.ops.fp8cookbook.fp8_attention(q, k, v, *sc, 32 ** -0.5, kernel)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert fa.pick_kernel(q, k, 32 ** -0.5, "sage") in (None, "sage")  # None here: CPU torch has no Triton
    if not ak.attention_v2_available():
        assert not fa.sage_ok(q)


# --------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)
                         or not ak.attention_v2_available(),
                         reason="needs a CUDA GPU with FP8 (compute capability >= 8.9) and Triton")
MODES = [("int8", "fp8"), ("int8", "fp8x2"), ("fp8", "fp8")]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("qk, pv", MODES)
@pytest.mark.parametrize("shape", [(1, 4608, 4608, 4, 128), (2, 1000, 333, 3, 64), (1, 257, 4096, 2, 128)])
def test_kernel_matches_reference(shape, qk, pv):
    B, nq, nkv, H, D = shape
    q, k, v = _random(B, nq, nkv, H, D, seed=7, device="cuda")
    out = ak.fp8_attention_v2(q, k, v, qk=qk, pv=pv)
    ref = ak.attention_v2_reference(q, k, v, qk=qk, pv=pv)
    noise = _rel(ref, _exact(q, k, v))
    err = _rel(out, ref)
    print(f"{qk}/{pv} {shape}: kernel vs reference {err:.2e}, reference vs exact {noise:.2e}")
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    # The kernel rounds P against a running row max, the reference against the whole row's: with one e4m3 term for
    # P the two round P differently (H200: 0.49-0.64 of the noise); with the residual term (fp8x2) P's rounding is
    # gone and everything else must agree (H200: 0.04-0.05 of the noise).
    bound = (0.1 if pv == "fp8x2" else 0.8) * noise
    assert err < bound
    # (B, H, S, D) inputs, strided views
    outh = ak.fp8_attention_v2(*(t.transpose(1, 2) for t in (q, k, v)), layout="bhsd", qk=qk, pv=pv)
    assert _rel(outh.transpose(1, 2), ref) < bound


# Bounds from the H200 measurement (docs/bench/attention-kernel-h200.json, rel. L2 vs float32 on 2 heads); the
# issue's target is 0.03. (random, outliers) per mode.
ACCURACY = {("int8", "fp8"): (0.045, 0.045), ("int8", "fp8x2"): (0.035, 0.035)}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("qk, pv", list(ACCURACY))
@pytest.mark.parametrize("inputs", ["random", "outliers"])
def test_accuracy_against_exact_attention(inputs, qk, pv):
    make = _random if inputs == "random" else _outliers
    q, k, v = make(1, 1024, 8192, 2, 128, seed=8, device="cuda")
    err = _rel(ak.fp8_attention_v2(q, k, v, qk=qk, pv=pv), _exact(q, k, v))
    old = _rel(torch.ops.fp8cookbook.fp8_attention(q, k, v, *_per_tensor_scales(q, k, v), 128 ** -0.5, "triton"),
               _exact(q, k, v))
    print(f"{inputs} {qk}/{pv}: v2 {err:.4f}, today's per-tensor kernel {old:.4f}")
    assert err < ACCURACY[qk, pv][inputs == "outliers"]
    assert err < old


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("pv", ak.PV_MODES)
def test_long_sequence_accumulates_exactly_enough(pv):
    """The flat-softmax case of test_fp8_attention.py: 32k keys whose values share one direction; the kernel must not
    shrink O (one MMA accumulator over all key tiles had returned 0.49 of the norm on cuDNN)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    B, nq, nkv, H, D = 1, 256, 32760, 2, 128
    q = (torch.randn(B, nq, H, D, device="cuda", generator=g) * 0.015).bfloat16()
    k = torch.randn(B, nkv, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    common = torch.randn(1, 1, H, D, device="cuda", generator=g)
    v = (common + 0.5 * torch.randn(B, nkv, H, D, device="cuda", generator=g)).bfloat16()
    out = ak.fp8_attention_v2(q, k, v, pv=pv).float()
    ref = ak.attention_v2_reference(q, k, v, pv=pv).float()
    exact = _exact(q, k, v).float()
    print(f"norm ratio kernel/reference {float(out.norm() / ref.norm()):.6f}, kernel vs exact {_rel(out, exact):.2e}")
    assert abs(float(out.norm() / ref.norm()) - 1) < 0.01
    assert _rel(out, ref) < 0.01 and _rel(out, exact) < 0.01


@pytest.mark.gpu
@gpu
def test_op_runs_sage_by_default_and_triton_on_request():
    q, k, v = _random(1, 600, 700, 2, 128, seed=10, device="cuda")
    sc = _per_tensor_scales(q, k, v)
    assert fa.pick_kernel(q, k, 128 ** -0.5) == "sage"
    q8 = quantize_fp8(q, sc[0])
    assert fa.pick_kernel(q8, q8, 128 ** -0.5, "sage") == "triton"  # e4m3 inputs: sage needs BF16 to smooth
    out = torch.ops.fp8cookbook.fp8_attention(q, k, v, *sc, 128 ** -0.5)
    torch.testing.assert_close(out, ak.fp8_attention_v2(q, k, v), rtol=0, atol=0)
    old = torch.ops.fp8cookbook.fp8_attention(q, k, v, *sc, 128 ** -0.5, "triton")
    ref = fa.fp8_attention_reference(q, k, v, *sc, 128 ** -0.5)
    assert _rel(old, ref) < 0.5 * _rel(ref, _exact(q, k, v)) and _rel(out, old) > 1e-3
