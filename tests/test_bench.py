"""Benchmark harness and FP8 fast path: report schema, FP8 layers really ran, atomic JSON, failure paths, and the
fast path computing the plain path's function. No timing assertions: performance is never a unit test.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from fp8cookbook.bench import SCHEMA, BenchSettings, plan_sides, resolve_settings, schedule, summary_lines
from fp8cookbook.checkpoint import write_json_atomic
from fp8cookbook.cli import main
from fp8cookbook.errors import Fp8CookbookError
from fp8cookbook.families import FAMILIES, build_transformer, get_family
from fp8cookbook.fp8 import fastpath, fusion, numerics
from fp8cookbook.fp8.linear import FP8Linear, count_fp8_calls, env_plain, fp8_modules
from fp8cookbook.fp8.numerics import fp8_gemm_supported, quantize_fp8
from fp8cookbook.fp8.quantize import StaticFP8Config, fp8_candidates, quantize_, record_input_amax

ALL = sorted(FAMILIES)
needs_fp8_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and fp8_gemm_supported(torch.device("cuda"))),
                                   reason="needs a CUDA GPU with compute capability >= 8.9")


def _bench_cli(tmp_path, *extra: str) -> tuple[int, dict | None]:
    out = tmp_path / "report.json"
    rc = main(["bench", "--synthetic", "tiny", "--device", "cpu", "--output", str(out), *extra])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


# ------------------------------------------------------------------------------------------- report schema
@pytest.mark.parametrize("family", ALL)
def test_tiny_synthetic_report(tmp_path, capsys, family):
    rc, report = _bench_cli(tmp_path, "--family", family)
    assert rc == 0
    fam = get_family(family)
    assert report["schema"] == SCHEMA and report["family"] == fam.name and report["mode"] == "synthetic"
    assert report["synthetic"] == "tiny" and "random weights" in report["synthetic_note"]
    env = report["environment"]
    for key in ("torch", "diffusers", "fp8cookbook", "python", "gpu"):
        assert key in env, f"environment lacks {key}"
    settings = report["settings"]
    for key in ("height", "width", "steps", "runs", "warmup", "compile", "cuda_graphs", "device", "fast",
                "forwards_per_step", "text_len"):
        assert key in settings, f"settings lack {key}"
    assert settings["forwards_per_step"] == (2 if fam.is_video else 1)
    steps, runs = settings["steps"], settings["runs"]
    assert [x["name"] for x in report["sides"]] == ["bf16", "fp8"] and not report["failed_sides"]
    for side in report["sides"]:
        loop = side["loop_s"]
        assert loop["n"] == runs and len(loop["all"]) == runs and all(t > 0 for t in loop["all"])
        assert loop["min"] <= loop["q1"] <= loop["median"] <= loop["q3"] <= loop["max"]
        assert len(side["step_s_median"]) == steps and all(t > 0 for t in side["step_s_median"])
        assert all(len(r) == steps for r in side["step_s_all"])
        assert side["estimated_full_loop_s"] > 0 and side["output_finite"]
        assert side["peak_memory_gb"] is None  # CPU: no CUDA allocator to ask
    fp8 = report["sides"][1]
    assert fp8["fp8_layers"] > 0 and fp8["fp8_layers_ran"] == fp8["fp8_layers"], \
        f"{fp8['fp8_layers_ran']} of {fp8['fp8_layers']} FP8 layers ran"
    assert report["fp8_layers_ran"] == report["fp8_layers"] == fp8["fp8_layers"]
    assert report["quantized_linears"] == report["quantized_linears_planned"] >= fp8["fp8_layers"]
    assert fp8["model_bytes"] < report["sides"][0]["model_bytes"]
    assert report["speedup"] > 0
    experts = {x["expert"] for x in report["schedule"]}
    assert experts == set(fam.experts), f"schedule uses {experts}"
    assert f"{fp8['fp8_layers_ran']}/{fp8['fp8_layers']}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"], "temporary files left behind"


def test_plain_and_levers(tmp_path):
    rc, plain = _bench_cli(tmp_path, "--family", "flux1", "--plain", "--steps", "1", "--runs", "1", "--warmup", "0")
    assert rc == 0
    fp8 = plain["sides"][1]
    assert fp8["levers"] == {"fast": False, "triton_quant": False, "fast_accum": False, "fused": False,
                             "cuda_graphs": False, "fp8_attention": False}
    assert fp8["fp8_layers"] == fp8["fp8_layers_ran"] == plain["quantized_linears"], "plain path fuses nothing"
    rc, levers = _bench_cli(tmp_path, "--family", "flux1", "--levers", "--steps", "1", "--runs", "1")
    assert rc == 0
    names = [x["name"] for x in levers["sides"]]
    assert names == ["bf16", "fp8-plain", "fp8+triton-quant", "fp8+fast-accum", "fp8+fused"]
    assert levers["fp8"] == "fp8+fast-accum" and levers["bf16"] == "bf16", "eager headline: unfused fast path"
    assert levers["sides"][-1]["fp8_layers"] < levers["sides"][1]["fp8_layers"], "fusion must merge layers"


def test_fp8_attention_modes(tmp_path):
    """The default is "auto": on this CPU it changes nothing (no side); where no attention call is long enough (every
    tiny model, FLUX at 1024²) the side is skipped with a note, and a threshold the calls reach keeps it."""
    from dataclasses import replace

    from fp8cookbook.bench import run_synthetic

    rc, report = _bench_cli(tmp_path, "--family", "flux1", "--steps", "1", "--runs", "1")
    assert rc == 0 and report["settings"]["fp8_attention"] == "off" and len(report["sides"]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "--family", "flux1", "--synthetic", "tiny", "--fp8-attention", "sometimes"])
    family, s = resolve_settings(BenchSettings(family="wan22-a14b", synthetic="tiny", steps=2, runs=1, warmup=0,
                                               device="cpu"))
    s = replace(s, fp8_attention="auto")  # as on a GPU
    skipped = run_synthetic(family, s)
    assert "under 16384" in skipped["fp8_attention_skipped"] and len(skipped["sides"]) == 2
    kept = run_synthetic(family, replace(s, fp8_attention_threshold=9))  # reached by the tiny Wan2.2's video self-attention
    attn = kept["sides"][-1]
    assert "fp8_attention_skipped" not in kept and attn["name"] == "fp8+fp8-attention" and attn["headline"]
    assert attn["fp8_attention_mode"] == "auto" and attn["fp8_attention_layers"] > 0
    assert attn["fp8_attention_calls"] == 0 < attn["fp8_attention_fallback_calls"], "no CPU call runs FP8 in auto"


@pytest.mark.parametrize("family", ["flux1", "wan22-a14b"])
def test_fp8_attention_side(tmp_path, family):
    rc, report = _bench_cli(tmp_path, "--family", family, "--fp8-attention", "--steps", "2", "--runs", "1")
    assert rc == 0
    bf16, fp8, attn = report["sides"]
    assert [bf16["name"], fp8["name"], attn["name"]] == ["bf16", "fp8", "fp8+fp8-attention"]
    assert report["fp8"] == "fp8+fp8-attention" and attn["headline"] and not fp8["headline"]
    assert attn["levers"]["fp8_attention"] and not fp8["levers"]["fp8_attention"]
    assert attn["fp8_attention_layers"] > 0 and attn["fp8_attention_calls"] > 0
    assert attn["fp8_attention_fallback_calls"] == 0 and "fp8_attention_calls" not in fp8
    assert "first_forward_cosine_vs_bf16" not in bf16
    assert 0.99 < attn["first_forward_cosine_vs_bf16"] < 1.0
    assert attn["first_forward_cosine_vs_bf16"] != fp8["first_forward_cosine_vs_bf16"]


def test_plan_sides_order():
    _, s = resolve_settings(BenchSettings(family="flux1", synthetic="tiny", device="cpu", levers=True, compile=True))
    sides = plan_sides(s)
    assert [x.name for x in sides] == ["bf16", "fp8-plain", "fp8+fast-accum", "fp8+fused"], \
        "no Triton side under torch.compile"
    assert sides[-1].fuse and not any(x.fuse for x in sides[:-1]), "fusion is structural: last"
    assert [x.name for x in sides if x.headline] == ["fp8+fused"], "compiled: the fused fast path is the headline"
    for compile_, fuse in ((False, False), (True, True)):
        _, s = resolve_settings(BenchSettings(family="flux1", synthetic="tiny", device="cpu", compile=compile_))
        fp8 = plan_sides(s)[1]
        assert fp8.headline and fp8.fast and fp8.fuse is fuse, "fusion only where it pays: under torch.compile"
    _, s = resolve_settings(BenchSettings(family="flux1", synthetic="tiny", device="cpu", fast=False))
    assert not plan_sides(s)[1].fast


def test_a14b_schedule_uses_both_experts():
    fam = get_family("wan22-a14b")
    full = schedule(fam, fam.num_steps)
    high = [st for st in full if st.expert == "transformer"]
    assert 0 < len(high) < len(full) and all(st.timestep >= 875 for st in high)
    assert all(st.timestep < 875 for st in full if st.expert == "transformer_2")
    assert [st.expert for st in schedule(fam, 2)] == ["transformer", "transformer_2"]


def test_json_written_atomically(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": 1})
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("cannot be written")

    with pytest.raises(RuntimeError):
        write_json_atomic(path, {"a": 1, "b": Unprintable()})  # fails halfway through serialising
    assert json.loads(path.read_text()) == {"a": 1}, "a failed write must leave the old report intact"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ------------------------------------------------------------------------------------------- failure paths
@pytest.mark.parametrize("argv, words", [
    (["--family", "sdxl", "--synthetic", "tiny"], ["unknown model family", "sdxl"]),
    (["--family", "flux1", "--synthetic", "tiny", "--steps", "0"], ["--steps", ">= 1"]),
    (["--family", "flux1", "--synthetic", "tiny", "--steps", "abc"], ["--steps", "integer"]),
    (["--family", "flux1", "--synthetic", "tiny", "--runs", "-3"], ["--runs"]),
    (["--family", "flux1", "--synthetic", "tiny", "--height", "100"], ["--height", "multiple of 16"]),
    (["--family", "wan22", "--synthetic", "tiny", "--frames", "6"], ["--frames", "4k+1"]),
    (["--family", "flux1", "--synthetic", "tiny", "--frames", "5"], ["--frames", "video"]),
    (["--family", "flux1"], ["--synthetic", "--model-path"]),
    (["--family", "flux1", "--synthetic", "tiny", "--device", "npu:7"], ["--device"]),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, words):
    out = tmp_path / "r.json"
    rc = main(["bench", *argv, "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("fp8cookbook bench: error:"), err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda(capsys):
    assert main(["bench", "--family", "flux1", "--synthetic", "tiny", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: " in err and ("has no CUDA" in err or "sees no GPU" in err), err


def test_resolve_rejects_bad_settings():
    with pytest.raises(Fp8CookbookError, match="synthetic"):
        resolve_settings(BenchSettings(family="flux1", synthetic="huge"))
    with pytest.raises(Fp8CookbookError, match="--synthetic times random weights"):
        resolve_settings(BenchSettings(family="flux1", synthetic="tiny", fp8_path="x"))


def test_fp8_without_model_path_benches_the_tiny_pipeline(tmp_path, capsys, monkeypatch):
    """As quantize and compare: no --model-path is the tiny pipeline at its small settings, so the checkpoint just
    made by `quantize` is what is timed (the skill's bench step)."""
    from fp8cookbook.pipelines import tiny_pipeline_dir

    monkeypatch.setenv("FP8COOKBOOK_CACHE", str(tmp_path / "cache"))
    assert main(["quantize", "--family", "flux1", "--output-dir", str(tmp_path / "q"), "--quiet"]) == 0
    capsys.readouterr()
    fp8 = tmp_path / "q" / "fp8"
    out = tmp_path / "bench.json"
    import fp8cookbook.bench.pipeline as bench_pipeline  # the kernels FP8 attention ran reach the FP8 side's report
    monkeypatch.setattr(bench_pipeline, "kernel_choices", lambda m: {"q[1, 8, 2, 64] k[1, 8, 2, 64] bfloat16": "sage"})
    assert main(["bench", "--family", "flux1", "--fp8", str(fp8), "--device", "cpu", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    s, tiny = report["settings"], get_family("flux1").tiny_settings
    assert report["mode"] == "pipeline" and s["model_path"] == str(tiny_pipeline_dir("flux1")), s
    assert (s["height"], s["width"], s["steps"]) == (tiny.height, tiny.width, tiny.num_inference_steps), s
    assert report["fp8_source"].endswith(str(fp8)) and report["fp8_layers_ran"] == report["fp8_layers"] > 0, report
    assert f"{report['fp8_layers']}/{report['fp8_layers']}" in printed and "64x64" in printed, printed
    by_name = {side["name"]: side for side in report["sides"]}
    assert by_name["fp8"]["fp8_attention_kernel_choices"] == {"q[1, 8, 2, 64] k[1, 8, 2, 64] bfloat16": "sage"}
    assert "fp8_attention_kernel_choices" not in by_name["bf16"]
    # end to end: each timed call is a decoded generation, split into text encoding, denoising and VAE decode
    for side in by_name.values():
        ph = side["phase_s"]
        assert min(ph["encode"], ph["denoise"], ph["decode"]) > 0, ph
        assert side["call_s"]["median"] > side["loop_s"]["median"] > 0, side
    assert report["end_to_end_speedup"] == pytest.approx(by_name["bf16"]["call_s"]["median"]
                                                         / by_name["fp8"]["call_s"]["median"])
    assert "end to end (text encoding, denoising, VAE decode), FP8 vs BF16" in printed, printed
    assert "bf16 end to end:" in printed and "+ VAE decode" in printed, printed


# ------------------------------------------------------------------------------- fast path = same function
def _tiny_fp8(family: str, seed: int = 0):
    """A tiny transformer quantised the benchmark's way, its inputs, and the plain-path output."""
    fam = get_family(family)
    model = build_transformer(fam, "tiny", seed=seed)
    config = dict(model.config)
    inputs = fam.make_inputs(config, height=64, width=64, num_frames=5 if fam.is_video else None, text_len=8,
                             generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad(), record_input_amax(model, fp8_candidates(model, fam)) as amax:
        model(**inputs)
    quantize_(model, StaticFP8Config(amax))
    return model, inputs


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


@pytest.mark.parametrize("family", ALL)
def test_fused_fast_path_matches_plain(family):
    model, inputs = _tiny_fp8(family)
    n_plain = len(fp8_modules(model))
    with torch.no_grad(), fastpath.fast_path(model, False):
        plain = model(**inputs)[0]
    report = fastpath.apply_fast_path(model, fast=True, fuse=True, device="cpu",
                                      fusion_rules=get_family(family).fusion_rules)
    assert report.enabled and report.fused, f"nothing fused in {family}"
    assert len(fp8_modules(model)) < n_plain
    with torch.no_grad(), count_fp8_calls(model) as calls:
        fast = model(**inputs)[0]
    assert len(calls) == len(fp8_modules(model)), "every FP8 layer, fused ones included, must run"
    cos = _cos(fast, plain)
    assert cos >= 0.999, f"{family}: fused FP8 vs plain FP8 cosine {cos:.6f}"
    assert torch.isfinite(fast).all()


def test_fusion_requantizes_to_the_largest_scale():
    torch.manual_seed(0)
    lins = [torch.nn.Linear(64, 32).to(torch.bfloat16) for _ in range(3)]
    with torch.no_grad():
        lins[1].weight.mul_(4)  # a shard with a 4x larger weight scale
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    layers = [FP8Linear.quantize(lin, x.abs().max()) for lin in lins]
    fused = fusion.fuse_layers(layers)
    assert float(fused.weight_scale) == max(float(m.weight_scale) for m in layers)
    assert torch.equal(fused.weight[32:64], layers[1].weight), "the shard that sets the scale keeps its bytes"
    ref = torch.cat([m(x) for m in layers], dim=-1)
    out = fused(x)
    assert out.shape == (7, 96)
    assert _cos(out, ref) > 0.999
    # the other shards were requantised, not rescaled bytes: Q(W*s_old/s_new)
    w0 = quantize_fp8(layers[0].weight.float() * layers[0].weight_scale, fused.weight_scale)
    assert torch.equal(fused.weight[:32].view(torch.uint8), w0.view(torch.uint8))


def test_plain_env_switch(monkeypatch):
    monkeypatch.setenv("FP8COOKBOOK_PLAIN", "1")
    assert env_plain()
    model, _ = _tiny_fp8("flux1")  # layers built under FP8COOKBOOK_PLAIN=1 start on the plain path
    assert all(not m.fast.enabled for m in fp8_modules(model).values())
    n = len(fp8_modules(model))
    report = fastpath.apply_fast_path(model, fuse=True, fusion_rules=get_family("flux1").fusion_rules)  # env: plain
    assert not report.enabled and not report.fused and len(fp8_modules(model)) == n
    monkeypatch.setenv("FP8COOKBOOK_PLAIN", "0")
    assert not env_plain()


# --------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_triton_quantization_is_bit_exact():
    assert numerics.triton_available(), numerics._TRITON.get("error")
    for shape, scale in (((4608, 3072), 0.01), ((333, 12288), 0.5), ((1, 16), 3.0)):
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 40
        s = torch.tensor([scale], device="cuda")
        ref = quantize_fp8(x, s).view(torch.uint8)
        got = numerics.triton_quantize_fp8(x, s).view(torch.uint8)
        mismatches = int((ref != got).sum())
        assert mismatches == 0, f"{shape}: {mismatches} bytes differ"


@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_fast_path_matches_plain_and_cpu():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3072, 12288).to(torch.bfloat16)
    x = torch.randn(4096, 3072, dtype=torch.bfloat16)
    fp8 = FP8Linear.quantize(lin, x.abs().max())
    cpu = fp8(x).float()
    gpu_layer, xg = fp8.to("cuda"), x.cuda()
    with torch.no_grad():
        with fastpath.fast_path(gpu_layer, False):
            plain = gpu_layer(xg).float().cpu()
        with fastpath.fast_path(gpu_layer, True):
            fast = gpu_layer(xg).float().cpu()
    for name, out in (("plain", plain), ("fast", fast)):
        rel = float((out - cpu).norm() / cpu.norm())
        assert rel < 4e-3, f"{name} CUDA path vs CPU math: relative L2 {rel:.2e}"


@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_fused_model_and_cuda_graph_match():
    model, inputs = _tiny_fp8("flux1")
    model = model.to("cuda")
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad(), fastpath.fast_path(model, False):
        plain = model(**inputs)[0]
    fastpath.apply_fast_path(model, fast=True, fuse=True, fusion_rules=get_family("flux1").fusion_rules)
    with torch.no_grad():
        eager = model(**inputs)[0]
        graphed = fastpath.CudaGraphForward(model)
        replay = graphed(**inputs)
        replay2 = graphed(**dict(inputs, hidden_states=inputs["hidden_states"] * 2))
        eager2 = model(**dict(inputs, hidden_states=inputs["hidden_states"] * 2))[0]
    assert _cos(eager, plain) >= 0.999
    torch.testing.assert_close(replay, eager)
    torch.testing.assert_close(replay2, eager2)


@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_tiny_bench_runs(tmp_path):
    out = tmp_path / "r.json"
    assert main(["bench", "--family", "wan22", "--synthetic", "tiny", "--device", "cuda", "--cuda-graphs",
                 "--levers", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert not report["failed_sides"], report["failed_sides"]
    assert report["environment"]["gpu"] and report["sides"][0]["peak_memory_gb"] > 0
    assert report["fp8_layers_ran"] == report["fp8_layers"] > 0


def test_pipeline_bench_frees_the_bf16_transformer_before_the_fp8_one(tmp_path, monkeypatch):
    """diffusers modules hold reference cycles: setting the BF16 transformer to None freed nothing until a garbage
    collection, so on an H200 the FP8 side of FLUX.1-dev started with both transformers allocated (48.3 GB)."""
    import weakref

    from fp8cookbook.bench.pipeline import _PipelineRun
    from fp8cookbook.bench.settings import resolve_settings

    monkeypatch.setenv("FP8COOKBOOK_CACHE", str(tmp_path / "cache"))
    assert main(["quantize", "--family", "flux1", "--output-dir", str(tmp_path / "q"), "--quiet"]) == 0
    family, s = resolve_settings(BenchSettings(family="flux1", fp8_path=str(tmp_path / "q" / "fp8"), device="cpu"))
    run = _PipelineRun(family, s)
    run.measure("bf16", "bf16")
    bf16 = weakref.ref(run.pipe.transformer)
    import gc

    gc.disable()  # no collection by chance: only the benchmark's own release may free it
    try:
        run.load_fp8({})
        assert bf16() is None, "the BF16 transformer is still alive beside the FP8 one"
    finally:
        gc.enable()


def test_short_untimed_calls_in_pipeline_mode(tmp_path, monkeypatch):
    """--warmup-steps: warm-up, the FP8 call count and in-process calibration run the short count, the timed
    generations the full one; in eager mode the counted FP8 call is that side's warm-up (no second one)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fp8cookbook.bench import run_bench
    from fp8cookbook.pipelines import tiny_pipeline_dir

    monkeypatch.setenv("FP8COOKBOOK_CACHE", str(tmp_path / "cache"))
    seen: list[int] = []
    original = FlowMatchEulerDiscreteScheduler.set_timesteps

    @functools.wraps(original)  # the pipeline inspects its signature
    def recording(self, num_inference_steps=None, *args, **kwargs):
        sigmas = kwargs.get("sigmas")  # FLUX passes its own sigmas, one per step
        seen.append(num_inference_steps if sigmas is None else len(sigmas))
        return original(self, num_inference_steps, *args, **kwargs)

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "set_timesteps", recording)
    report = run_bench(BenchSettings(family="flux1", model_path=str(tiny_pipeline_dir("flux1")), device="cpu",
                                     steps=3, runs=1, warmup=1, warmup_steps=1, height=64, width=64, text_len=8))
    # BF16: warm-up, timed run; in-process calibration; FP8: counted call (its warm-up), timed run
    assert seen == [1, 3, 1, 1, 3], seen
    for side in report["sides"]:
        assert len(side["step_s_median"]) == 3, side["name"]
    fp8 = report["sides"][1]
    assert fp8["fp8_layers_ran"] == fp8["fp8_layers"] > 0
    assert "after 1 warm-up of 1 steps" in summary_lines(report)[0]
    with pytest.raises(Fp8CookbookError, match="--warmup-steps"):
        resolve_settings(BenchSettings(family="flux1", synthetic="tiny", warmup_steps=1))
    with pytest.raises(Fp8CookbookError, match="must not exceed --steps"):
        resolve_settings(BenchSettings(family="flux1", model_path="x", steps=2, warmup_steps=3, device="cpu"))


def test_one_expert_resident_pipeline_bench(tmp_path, monkeypatch):
    """--one-expert-resident (Wan2.2 A14B on an 80 GB card): every call of each side runs under
    offload.one_expert_resident, so each generation brings the high-noise expert in, then switches once to the
    low-noise one; in-process calibration runs under it too. On the CPU the moves are recorded, not made."""
    from fp8cookbook.bench import run_bench
    from fp8cookbook.pipelines import tiny_pipeline_dir

    monkeypatch.setenv("FP8COOKBOOK_CACHE", str(tmp_path / "cache"))
    report = run_bench(BenchSettings(family="wan22-a14b", model_path=str(tiny_pipeline_dir("wan22-a14b")),
                                     device="cpu", runs=1, warmup=1, one_expert_resident=True, steps=4,
                                     height=64, width=64, num_frames=5, text_len=8))
    assert report["settings"]["one_expert_resident"] is True
    for side in report["sides"]:  # two generations per side (warm-up or the counted FP8 call, then the timed one)
        arrivals = [m.split("->")[0] for i, m in enumerate(side["expert_moves"]) if i == 0 or i % 2 == 0]
        assert arrivals == ["transformer", "transformer_2", "transformer", "transformer_2"], side["expert_moves"]
    fp8 = report["sides"][1]
    assert fp8["fp8_layers_ran"] == fp8["fp8_layers"] > 0  # both experts ran, the calibration reached both
    with pytest.raises(Fp8CookbookError, match="two experts"):
        resolve_settings(BenchSettings(family="flux1", model_path="x", device="cpu", one_expert_resident=True))


def test_stage_peak_is_the_highest_side():
    """The benchmark resets CUDA's peak per side; the stage around it (CLI, notebook, full_size.py) must record
    BF16's peak (the larger), not the last side's (seen on the H200: the e2e stage reported FP8's 39.7 GiB while BF16
    peaked at 43.3)."""
    from fp8cookbook.bench import fold_side_peaks
    from fp8cookbook.stages import StageRecord

    record = StageRecord("e2e", peak_gpu_mb=40.0 * 1024)  # what the stage saw: the last (FP8) side
    fold_side_peaks(record, {"sides": [{"name": "bf16", "peak_memory_gb": 43.3},
                                       {"name": "fp8", "peak_memory_gb": 39.7}]})
    assert record.peak_gpu_mb == pytest.approx(43.3 * 1024)
    fold_side_peaks(record, {"sides": [{"name": "bf16", "peak_memory_gb": None}]})  # CPU: nothing to fold
    assert record.peak_gpu_mb == pytest.approx(43.3 * 1024)
