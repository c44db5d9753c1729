"""FP8 attention: the reference math, the diffusers hook-up on every tiny family, the scale side file, the loader
switch, and (GPU) the Triton kernel against the reference."""

from __future__ import annotations

import json

import pytest
import torch

from fp8cookbook import checkpoint as ck
from fp8cookbook.fp8 import attention as fa
from fp8cookbook.fp8 import attention_diffusers as fd
from fp8cookbook.checkpoint import FP8_MAX
from fp8cookbook.errors import Fp8CookbookError
from fp8cookbook.families import FAMILIES, build_transformer, get_family
from fp8cookbook.fp8.numerics import quantize_fp8

NAMES = sorted(FAMILIES)
pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _exact(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2)).transpose(1, 2)


def _scales(*ts):
    return [t.abs().amax().float().reshape(1) / FP8_MAX for t in ts]


def test_reference_uniform_softmax_is_mean_of_quantised_v():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 50, 2, 16, generator=g)
    k = torch.randn(1, 50, 2, 16, generator=g)
    q = torch.zeros(1, 7, 2, 16)
    qs, ks, vs = _scales(torch.ones(1), k, v)
    out = fa.fp8_attention_reference(q, k, v, qs, ks, vs)
    v8 = (v / vs).to(torch.float8_e4m3fn).float() * vs  # P = 1 exactly: 256 is exact in e4m3
    assert torch.allclose(out, v8.mean(1, keepdim=True).expand_as(out), atol=1e-6)


def test_reference_is_close_to_exact_attention_but_not_equal():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 64, 3, 32, generator=g) for _ in range(3))
    out = fa.fp8_attention_reference(q, k, v, *_scales(q, k, v))
    err = _rel(out, _exact(q, k, v))
    assert 1e-3 < err < 0.08, err  # FP8 noise: visible, but a few percent


def test_reference_honours_sm_scale_and_dtype():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 16, 1, 16, generator=g, dtype=torch.bfloat16) for _ in range(3))
    sc = _scales(q, k, v)
    a = fa.fp8_attention_reference(q, k, v, *sc)
    b = fa.fp8_attention_reference(q, k, v, *sc, sm_scale=2.0)
    assert a.dtype == torch.bfloat16 and a.shape == q.shape and a.is_contiguous()
    assert not torch.allclose(a, b)


def _tiny(name: str):
    fam = get_family(name)
    model = build_transformer(fam, "tiny", seed=0, dtype=torch.float32)
    inputs = fam.make_inputs(dict(model.config), height=64, width=64, num_frames=5 if fam.is_video else None,
                             text_len=8, generator=torch.Generator().manual_seed(0))
    inputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    return model, inputs


@pytest.mark.parametrize("name", NAMES)
def test_install_runs_fp8_attention_everywhere_and_remove_restores(name):
    model, inputs = _tiny(name)
    mods = fd.attention_modules(model)
    assert mods
    with torch.no_grad():
        ref = model(**inputs)[0]
        with fd.record_attention_amax(model) as amax:
            again = model(**inputs)[0]
        assert torch.equal(again, ref)  # recording does not change the math
        assert not any(isinstance(m.processor._attention_backend, fa.AttentionScales) for m in mods.values())
        scales = ck.scales_from_amax(amax)
        assert sorted(scales) == sorted(mods)
        assert sorted(fd.install_fp8_attention(model, scales)) == sorted(mods)
        with fd.count_fp8_attention_calls(model) as counts:
            out = model(**inputs)[0]
        assert fd.remove_fp8_attention(model) == len(mods)
        back = model(**inputs)[0]
    assert all(c["fp8"] >= 1 and c["bf16"] == 0 for c in counts.values()), counts
    assert torch.equal(back, ref)
    cos = torch.nn.functional.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0)
    assert not torch.equal(out, ref) and cos > 0.999, float(cos)


def test_prequantised_op_matches_reference_on_cpu():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 40, 2, 32, generator=g) for _ in range(3))
    sc = _scales(q, k, v)
    q8, k8, v8 = (quantize_fp8(t, s) for t, s in zip((q, k, v), sc))
    out = torch.ops.fp8cookbook.fp8_attention_fp8(q8, k8, v8, *sc, 32 ** -0.5, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, fa.fp8_attention_reference(q, k, v, *sc).to(torch.bfloat16))


def test_masked_calls_fall_back_to_bf16():
    q = torch.randn(1, 8, 2, 16)
    st = fa.AttentionScales("x", *(torch.ones(1) for _ in range(3)))
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    out = fd.fp8_dispatch_attention_fn(q, q, q, attn_mask=mask, backend=st)
    assert st.bf16_calls == 1 and st.calls == 0
    assert torch.allclose(out, _exact(q, q, q), atol=1e-5)


def test_install_refuses_unknown_modules_and_bad_scales():
    model, _ = _tiny("flux1")
    with pytest.raises(Fp8CookbookError, match="does not have.*nope.attn"):
        fd.install_fp8_attention(model, {"nope.attn": (1.0, 1.0, 1.0)})
    name = next(iter(fd.attention_modules(model)))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(Fp8CookbookError, match=f"{name}.k"):
            fd.install_fp8_attention(model, {name: (1.0, bad, 1.0)})


def _side_file(folder, entries):
    (folder / ck.ATTENTION_SCALES_NAME).write_text(json.dumps({"format": "amax", "amax": entries}))


def test_read_attention_scales(tmp_path):
    assert ck.read_attention_scales(tmp_path) is None
    _side_file(tmp_path, {"a.attn.q_bmm_quantizer": 448.0, "a.attn.k_bmm_quantizer": 224.0,
                          "a.attn.v_bmm_quantizer": 4.48})
    assert ck.read_attention_scales(tmp_path) == {"a.attn": pytest.approx((1.0, 0.5, 0.01))}


@pytest.mark.parametrize("content, message", [
    ("{not json", "not an attention-scale file"),
    (json.dumps({"format": "scale", "amax": {}}), "not an attention-scale file"),
    (json.dumps({"format": "amax", "amax": {"a.attn.x_quantizer": 1.0}}), "unexpected entry 'a.attn.x_quantizer'"),
    (json.dumps({"format": "amax", "amax": {"a.attn.q_bmm_quantizer": 1.0}}), "a.attn: have \\['q'\\]"),
    (json.dumps({"format": "amax", "amax": {f"a.attn.{c}_bmm_quantizer": 0.0 if c == "v" else 1.0 for c in "qkv"}}),
     "a.attn.v_bmm_quantizer = 0.0"),
])
def test_bad_side_file_names_the_file(tmp_path, content, message):
    (tmp_path / ck.ATTENTION_SCALES_NAME).write_text(content)
    with pytest.raises(Fp8CookbookError, match=message) as info:
        ck.read_attention_scales(tmp_path)
    assert str(tmp_path / ck.ATTENTION_SCALES_NAME) in str(info.value)


# --------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                         reason="needs a CUDA GPU with FP8 (compute capability >= 8.9)")


KERNELS = ["triton", "cudnn"]


def _kernel(monkeypatch, kernel: str) -> None:
    if kernel == "cudnn" and not fa.cudnn_attention_available():
        pytest.skip("the cuDNN frontend package (nvidia-cudnn-frontend) is not installed")
    # the kernel is an argument now (ops, install_fp8_attention); nothing process-wide to patch


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(1, 4608, 4608, 4, 128), (2, 1000, 333, 3, 64), (1, 257, 4096, 2, 128)])
def test_cuda_kernel_matches_reference(shape, kernel, monkeypatch):
    _kernel(monkeypatch, kernel)
    B, nq, nkv, H, D = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, nq, H, D, device="cuda", generator=g, dtype=torch.bfloat16) * 2
    k = torch.randn(B, nkv, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(B, nkv, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    sc = _scales(q, k, v)
    out = torch.ops.fp8cookbook.fp8_attention(q, k, v, *sc, D ** -0.5, kernel)
    ref = fa.fp8_attention_reference(q, k, v, *sc, D ** -0.5)
    fp8_noise = _rel(ref, _exact(q, k, v))
    err = _rel(out, ref)
    print(f"{kernel} {shape}: kernel vs reference {err:.2e}, reference vs exact {fp8_noise:.2e}, "
          f"cuDNN refusals {fa.cudnn_errors()}")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert err < 0.5 * fp8_noise and err < 0.04
    # The same on inputs quantised beforehand (what runs under torch.compile).
    q8, k8, v8 = (quantize_fp8(t, s) for t, s in zip((q, k, v), sc))
    out8 = torch.ops.fp8cookbook.fp8_attention_fp8(q8, k8, v8, *sc, D ** -0.5, torch.bfloat16, kernel)
    assert out8.dtype == torch.bfloat16 and _rel(out8, ref) < 0.5 * fp8_noise


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_runs_under_torch_compile_and_strided_inputs(kernel, monkeypatch):
    _kernel(monkeypatch, kernel)
    g = torch.Generator(device="cuda").manual_seed(1)
    qkv = torch.randn(1, 300, 3, 2, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)  # strided views, as fused projections give
    sc = _scales(q, k, v)
    f = torch.compile(lambda q, k, v: torch.ops.fp8cookbook.fp8_attention(q, k, v, *sc, 0.125, kernel) * 2, fullgraph=True)
    out = f(q, k, v)
    ref = fa.fp8_attention_reference(q, k, v, *sc, 0.125) * 2
    assert _rel(out, ref) < 0.04


def _tiny_wan_cuda():
    """A tiny Wan2.2 transformer on the GPU in BF16, and its inputs."""
    fam = get_family("wan22-a14b")
    torch.manual_seed(0)  # the tiny config with head_dim 64: head_dim 16 has no FP8 kernel (the reference runs)
    model = fam.transformer_class()(**{**fam.tiny_config, "attention_head_dim": 64}).to("cuda", torch.bfloat16).eval()
    inputs = fam.make_inputs(dict(model.config), height=64, width=64, num_frames=5, text_len=8,
                             generator=torch.Generator().manual_seed(0))
    inputs = {k: v.to("cuda", torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else
              (v.cuda() if torch.is_tensor(v) else v) for k, v in inputs.items()}
    return model, inputs


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel", KERNELS + ["sage"])  # "sage": attention_kernel.py, the default since issue 13
def test_fp8_attention_model_in_cuda_graph_and_compiled(kernel, monkeypatch):
    """A tiny Wan2.2 model with FP8 attention: CUDA-graph replay equals eager, and compile_repeated_blocks runs it."""
    from fp8cookbook.fp8 import fastpath

    _kernel(monkeypatch, kernel)
    model, inputs = _tiny_wan_cuda()
    with torch.no_grad():
        ref = model(**inputs)[0]
        with fd.record_attention_amax(model) as amax:
            model(**inputs)
        scales = ck.scales_from_amax(amax)
        # the "auto" rule with a threshold above every call's key count: every call stays BF16, bit for bit
        fd.install_fp8_attention(model, scales, min_kv_tokens=10 ** 9, kernel=kernel)
        with fd.count_fp8_attention_calls(model) as calls:
            torch.testing.assert_close(model(**inputs)[0], ref, rtol=0, atol=0)
        assert all(c["fp8"] == 0 for c in calls.values())
        # above the 8 text tokens: the self-attention calls (32 video tokens) run FP8, the cross-attention ones do not
        fd.install_fp8_attention(model, scales, min_kv_tokens=9, kernel=kernel)
        with fd.count_fp8_attention_calls(model) as calls:
            model(**inputs)
        assert {n: c["fp8"] for n, c in calls.items()} == {n: int(n.endswith("attn1")) for n in calls}
        fd.install_fp8_attention(model, scales, kernel=kernel)
        with fd.count_fp8_attention_calls(model) as calls:
            eager = model(**inputs)[0]
        assert all(c["fp8"] == 1 for c in calls.values())
        assert fa.pick_kernel(*(torch.empty(1, 80, 2, 64, device="cuda", dtype=torch.bfloat16),) * 2, 0.125, kernel) == kernel
        replay = fastpath.CudaGraphForward(model)(**inputs)
        model.compile_repeated_blocks(fullgraph=True)
        compiled = model(**inputs)[0]
    torch.testing.assert_close(replay, eager)
    cos = torch.nn.functional.cosine_similarity(eager.float().flatten(), ref.float().flatten(), dim=0)
    assert 0.98 < float(cos) < 1.0
    assert _rel(compiled, eager) < 0.02


@pytest.mark.gpu
@gpu
def test_long_sequence_accumulates_exactly_enough():
    """32k keys whose values share one direction (as Wan2.2's V does): O is a long average of nearly equal rows.

    FP8 tensor cores accumulate with reduced precision; a kernel that sums all key tiles in one MMA accumulator loses
    the late small terms and shrinks O (Wan2.2's cosine fell 0.019). Measured on an H100: cuDNN's FP8 SDPA, which
    still does that, returns 0.49 of the reference's norm here (relative error 0.52); Triton's kernel, which adds
    each tile's product in float32, 0.998 (relative error 0.0035).
    """
    g = torch.Generator(device="cuda").manual_seed(2)
    B, nq, nkv, H, D = 1, 256, 32760, 2, 128
    q = (torch.randn(B, nq, H, D, device="cuda", generator=g) * 0.015).bfloat16()  # a nearly flat softmax
    k = torch.randn(B, nkv, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    common = torch.randn(1, 1, H, D, device="cuda", generator=g)
    v = (common + 0.5 * torch.randn(B, nkv, H, D, device="cuda", generator=g)).bfloat16()
    sc = _scales(q, k, v)
    out = torch.ops.fp8cookbook.fp8_attention(q, k, v, *sc, D ** -0.5, "triton").float()
    ref = fa.fp8_attention_reference(q, k, v, *sc, D ** -0.5).float()
    exact = _exact(q, k, v).float()
    print(f"norm ratio kernel/reference {float(out.norm() / ref.norm()):.6f}, kernel vs reference {_rel(out, ref):.2e}, "
          f"reference vs exact {_rel(ref, exact):.2e}, kernel vs exact {_rel(out, exact):.2e}")
    assert abs(float(out.norm() / ref.norm()) - 1) < 0.01
    assert _rel(out, ref) < 0.01


def test_compiled_calls_are_recorded_for_kernel_choices(monkeypatch):
    """Under torch.compile the dispatch cannot fill `AttentionScales.ran` (a dict store guards on the dict, one
    recompile per call); it records each layer's call in one attribute that compiled code replays, and
    `kernel_choices` resolves it with the op's own rule (`op_kernel`). CPU: dynamo only (backend "eager"), the
    kernel rule stood in for, since off an FP8 GPU the reference runs and no CUDA kernel is chosen."""
    torch._dynamo.reset()
    model, inputs = _tiny("flux1")
    with torch.no_grad():
        with fd.record_attention_amax(model) as amax:
            model(**inputs)
        fd.install_fp8_attention(model, ck.scales_from_amax(amax), kernel="triton")
        assert fd.kernel_choices(model) == {}  # nothing ran yet
        picked = []

        def rule(q, k, sm_scale, backend):
            picked.append((q.dtype, q.shape[1] == k.shape[1], backend))
            return f"stand-in {backend}"

        monkeypatch.setattr(fd, "op_kernel", rule)
        assert fd.kernel_choices(model) == {}  # eager calls on the CPU ran the reference: nothing recorded
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        compiled(**inputs)
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
        compiled(**inputs)  # a second call replays the record and does not recompile
    choices = fd.kernel_choices(model)
    assert choices and set(choices.values()) == {"stand-in triton"}, choices
    assert all(key.endswith("float8_e4m3fn") for key in choices), choices  # Inductor-quantised inputs
    assert {d for d, _, _ in picked} == {torch.float8_e4m3fn}
    seq = inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]  # joint attention tokens
    assert any(f"k[1, {seq}," in key for key in choices), (seq, choices)
    torch._dynamo.reset()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel", KERNELS + ["sage"])
def test_compiled_only_model_reports_its_kernel(kernel, monkeypatch):
    """A model that only ever ran compiled (no eager call filled `ran`) still reports which kernel its FP8
    attention ran: `sage` on the BF16 inputs, the others on Inductor's e4m3 ones (cuDNN may refuse: Triton)."""
    _kernel(monkeypatch, kernel)
    torch._dynamo.reset()
    model, inputs = _tiny_wan_cuda()
    with torch.no_grad():
        with fd.record_attention_amax(model) as amax:
            model(**inputs)
        fd.install_fp8_attention(model, ck.scales_from_amax(amax), kernel=kernel)
        model.compile_repeated_blocks(fullgraph=True)
        model(**inputs)
    choices = fd.kernel_choices(model)
    torch._dynamo.reset()
    assert choices, "compiled FP8 attention left no kernel choice"
    if kernel == "sage":
        assert set(choices.values()) == {"sage"} and all(k.endswith("bfloat16") for k in choices), choices
    else:
        assert all(k.endswith("float8_e4m3fn") for k in choices), choices
        assert set(choices.values()) <= ({"cudnn", "triton"} if kernel == "cudnn" else {"triton"}), choices
