"""Where one denoising step's GPU time goes, BF16 vs FP8 (fast path unfused, then fused), by kernel category.

    python scripts/profile_step.py --family flux1 [--compile] [--attention-backend NAME] [--output prof.json]

Full-size synthetic model (random weights), eager by default; torch.profiler with CUDA activity over one step
after two warm-up steps. Categories: GEMM (cuBLAS/CUTLASS), attention, FP8 activation quantisation, other.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8cookbook.fp8 import fastpath  # noqa: E402
from fp8cookbook.fp8.fusion import fuse_fp8_projections  # noqa: E402
from fp8cookbook.bench import BenchSettings, SyntheticRun, resolve_settings  # noqa: E402
from fp8cookbook.bench.measure import compile_model, uncompile  # noqa: E402


def category(name: str) -> str:
    n = name.lower()
    if "quantize_fp8" in n:
        return "fp8 quant (triton)"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")):
        return "attention"
    if any(k in n for k in ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "cublas", "_mm_", "matmul")):
        return "gemm"
    return "other"


def profile(run: SyntheticRun, label: str, compiled: bool) -> dict:
    st = run.steps[0]
    if compiled:
        torch._dynamo.reset()
        for m in run.models.values():
            compile_model(m)
    with torch.no_grad():
        for _ in range(2):
            run.step(st, run.x0)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run.step(st, run.x0)
            torch.cuda.synchronize()
    if compiled:
        for m in run.models.values():
            uncompile(m)
    kernels: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            kernels[evt.name] = kernels.get(evt.name, 0.0) + evt.device_time_total / 1e6
    cats: dict[str, float] = {}
    for name, t in kernels.items():
        cats[category(name)] = cats.get(category(name), 0.0) + t
    total = sum(cats.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    print(f"\n== {label}: GPU busy {total * 1e3:.1f} ms per step")
    for c, t in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {c:20s} {t * 1e3:8.2f} ms  {100 * t / total:5.1f}%")
    for name, t in top:
        print(f"    {t * 1e3:8.2f} ms  {name[:110]}")
    return {"label": label, "gpu_busy_s": total, "categories_s": cats, "top_kernels_s": top}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="flux1")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--attention-backend")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    family, s = resolve_settings(BenchSettings(family=args.family, synthetic="full", steps=2, device="cuda",
                                               attention_backend=args.attention_backend))
    run = SyntheticRun(family, s)
    run.calibrate()
    results = [profile(run, "bf16", args.compile)]
    run.to_fp8()
    for m in run.models.values():
        fastpath.set_model_fast_path(m, fastpath.FastPathConfig(enabled=True))
    results.append(profile(run, "fp8 fast, unfused", args.compile))
    for m in run.models.values():
        fuse_fp8_projections(m, family.fusion_rules)
    results.append(profile(run, "fp8 fast, fused", args.compile))
    if args.output:
        args.output.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "family": family.name,
                                           "compile": args.compile, "results": results}, indent=2))


if __name__ == "__main__":
    main()
