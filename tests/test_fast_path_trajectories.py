"""The issue-5 quality rules, on every tiny default pipeline (CPU, real diffusers pipelines, per-step latents):

- the fused fast path computes the same function as the plain FP8 path: per-step latent cosine >= 0.999;
- FP8 attention against BF16 stays within 0.002 of the FP8-GEMM-only path on every step. It does here, but on a
  full-size random-weight Wan2.2 A14B step it does not (cosine 0.9834 against 0.9986; docs/benchmarks.md), so the
  rule keeps FP8 attention an opt-in: `load_fp8_transformer(fp8_attention=False)` by default.
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import pytest
import torch

from fp8cookbook import fastpath, fp8attention
from fp8cookbook.bench import attention_scales, fp8_candidates, quantize_in_place, record_input_amax
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
        attn = {n: stack.enter_context(fp8attention.record_attention_amax(getattr(pipe, n))) for n in names}
        pipe(**generation_kwargs(fam, pipe, **default_tiny_settings(name), seed=1, output_type="latent"))
    plain = {}
    for n in names:
        model = copy.deepcopy(getattr(pipe, n))
        quantize_in_place(model, amax[n])
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
    with fastpath.fast_path(True):
        for m in fused.values():
            assert fastpath.fuse_fp8_projections(m), f"{name}: nothing fused"
        same = compare_trajectories(pipe, plain, fused, **settings)
    assert min(_step_cosines(same)) >= 0.999, _step_cosines(same)

    gemm = compare_trajectories(pipe, {}, plain, **settings)
    with_attn = {n: copy.deepcopy(m) for n, m in plain.items()}
    for n, m in with_attn.items():
        assert sorted(fp8attention.install_fp8_attention(m, scales[n])) == sorted(scales[n]) != []
    attn = compare_trajectories(pipe, {}, with_attn, **settings)
    g, a = _step_cosines(gemm), _step_cosines(attn)
    assert g != a, "FP8 attention must change the numbers (is it running?)"
    assert all(x < 1.0 for x in a)
    gaps = [gi - ai for gi, ai in zip(g, a)]
    print(f"{name}: FP8-GEMM step cosines {g}; +FP8 attention {a}; largest gap {max(gaps):.2e}")
    assert max(gaps) <= 0.002, f"{name}: FP8 attention falls {max(gaps):.4f} below the FP8-GEMM path"


def test_fp8_attention_is_opt_in():
    assert inspect.signature(load_fp8_transformer).parameters["fp8_attention"].default is False
