"""The issue-5 quality rules, on every tiny default pipeline (CPU, real diffusers pipelines, per-step latents):

- the fused fast path computes the same function as the plain FP8 path: per-step latent cosine >= 0.999;
- FP8 attention against BF16 stays within 0.002 of the FP8-GEMM-only path on every step. It does here, and on the
  full-size random-weight FLUX.1, FLUX.2 and Wan2.2 A14B forwards (H100, triton: gaps 0.00003 or less; H200, sage:
  0.000035 or less, also with Q/K channel outliers; `scripts/attention_quality.py`, docs/benchmarks.md), so the
  loader turns it on by default ("auto": where it pays)."""

from __future__ import annotations

import contextlib
import copy
import inspect

import pytest
import torch

from fp8cookbook.checkpoint import scales_from_amax
from fp8cookbook.fp8 import attention_diffusers as fd
from fp8cookbook.fp8 import fastpath
from fp8cookbook.fp8.attention_mode import MIN_KV_TOKENS
from fp8cookbook.fp8.fusion import fuse_fp8_projections
from fp8cookbook.fp8.quantize import StaticFP8Config, attention_scales, fp8_candidates, quantize_, record_input_amax
from fp8cookbook.compare import compare_trajectories
from fp8cookbook.families import FAMILIES, get_family
from fp8cookbook.loader import load_fp8_transformer
from fp8cookbook.pipelines import default_tiny_settings, generation_kwargs, load_pipeline, transformer_names

pytestmark = pytest.mark.usefixtures("one_thread", "tiny_cache_env")


def _calibrated_fp8(name: str):
    """The tiny pipeline (float32) and, per transformer, a plain FP8 copy plus attention scales, both calibrated on
    one real pipeline call (static input and Q/K/V amaxes, as ModelOpt's calibration does)."""
    fam = get_family(name)
    pipe = load_pipeline(name, dtype=torch.float32)
    names = transformer_names(pipe)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        amax = {n: stack.enter_context(record_input_amax(getattr(pipe, n), fp8_candidates(getattr(pipe, n), fam)))
                for n in names}
        attn = {n: stack.enter_context(fd.record_attention_amax(getattr(pipe, n))) for n in names}
        pipe(**generation_kwargs(fam, pipe, **default_tiny_settings(name), seed=1, output_type="latent"))
    plain = {}
    for n in names:
        model = copy.deepcopy(getattr(pipe, n))
        quantize_(model, StaticFP8Config(amax[n]))
        plain[n] = model
    scales = {n: attention_scales(getattr(pipe, n), fam, attn[n]) for n in names}
    return fam, pipe, plain, scales


def _step_cosines(report) -> list[float]:
    return [s["latents"]["cosine"] for s in report.steps]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fused_path_and_fp8_attention_trajectories(name):
    fam, pipe, plain, scales = _calibrated_fp8(name)
    t = default_tiny_settings(name)
    settings = dict(height=t["height"], width=t["width"], num_frames=t["num_frames"], steps=t["num_inference_steps"],
                    guidance_scale=t["guidance_scale"], seed=0, progress=False, family=name)

    fused = {n: copy.deepcopy(m) for n, m in plain.items()}
    for m in fused.values():
        fastpath.set_model_fast_path(m, fastpath.FastPathConfig(enabled=True))
        assert fuse_fp8_projections(m, fam.fusion_rules), f"{name}: nothing fused"
    same = compare_trajectories(pipe, plain, fused, **settings)
    assert min(_step_cosines(same)) >= 0.999, _step_cosines(same)

    gemm = compare_trajectories(pipe, {}, plain, **settings)
    with_attn = {n: copy.deepcopy(m) for n, m in plain.items()}
    for n, m in with_attn.items():
        assert sorted(fd.install_fp8_attention(m, scales[n])) == sorted(scales[n]) != []
    attn = compare_trajectories(pipe, {}, with_attn, **settings)
    g, a = _step_cosines(gemm), _step_cosines(attn)
    assert g != a, "FP8 attention must change the numbers (is it running?)"
    assert all(x < 1.0 for x in a)
    gaps = [gi - ai for gi, ai in zip(g, a)]
    print(f"{name}: FP8-GEMM step cosines {g}; +FP8 attention {a}; largest gap {max(gaps):.2e}")
    assert max(gaps) <= 0.002, f"{name}: FP8 attention falls {max(gaps):.4f} below the FP8-GEMM path"


def test_fp8_attention_is_on_by_default_where_it_pays():
    """The loader's default is "auto": FP8 attention only for long calls on a GPU kernel, so on this CPU every call of
    a tiny model stays BF16 and the output equals the model without FP8 attention; "on" runs every call in FP8."""
    assert inspect.signature(load_fp8_transformer).parameters["fp8_attention"].default == "auto"
    fam = get_family("flux1")
    torch.manual_seed(0)
    model = fam.transformer_class()(**fam.tiny_config).eval()
    inputs = fam.make_inputs(dict(model.config), height=32, width=32, text_len=8,
                             generator=torch.Generator().manual_seed(0))
    inputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        plain = model(**inputs)[0]
        with fd.record_attention_amax(model) as amax:
            model(**inputs)
        scales = scales_from_amax(amax)
        for minimum, fp8_calls in ((MIN_KV_TOKENS, 0), (0, len(scales))):
            fd.install_fp8_attention(model, scales, min_kv_tokens=minimum)
            with fd.count_fp8_attention_calls(model) as calls:
                out = model(**inputs)[0]
            fd.remove_fp8_attention(model)
            assert sum(c["fp8"] for c in calls.values()) == fp8_calls
            assert sum(c["bf16"] for c in calls.values()) == len(scales) - fp8_calls
            assert torch.equal(out, plain) == (fp8_calls == 0)
