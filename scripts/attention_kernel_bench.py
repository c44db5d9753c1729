"""Attention kernels per call on one GPU: BF16 SDPA vs the static-scale FP8 kernel (`triton`) vs attention_kernel (`sage`) variants.

Same process, same inputs; per shape and kernel: milliseconds (median of CUDA-event timings, quantisation passes
included), TFLOP/s (4·B·H·Nq·Nkv·D over the time), and the relative L2 error against float32 attention on the first
heads, on random inputs (N(0, 1)) and on inputs with channel outliers (`outlier_inputs`). Imports torch and Triton
only (and fp8cookbook's kernels), so it runs where diffusers is not installed.

    PYTHONPATH=. python scripts/attention_kernel_bench.py --output docs/bench/attention-kernel-h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fp8cookbook.fp8 import attention_kernel as ak  # noqa: E402

from fp8cookbook.fp8 import attention as old  # noqa: E402,F401 - registers torch.ops.fp8cookbook (kernel "triton")

SHAPES = {  # (batch, query tokens, key tokens, heads, head_dim)
    "wan22 self 832x480x81": (1, 32760, 32760, 40, 128),
    "flux1 joint 1024x1024": (1, 4608, 4608, 24, 128),
    "flux2 joint 1024x1024": (1, 4608, 4608, 48, 128),
    "wan22 cross (512 text)": (1, 32760, 512, 40, 128),
}
# v2 variants: name -> keyword arguments of fp8_attention_v2
VARIANTS = {
    "v2 int8-qk fp8-pv": {"qk": "int8", "pv": "fp8"},
    "v2 int8-qk fp8x2-pv": {"qk": "int8", "pv": "fp8x2"},
}
MORE_VARIANTS = {  # --all: measured once (docs/bench/attention-kernel-h200-variants.json), not paying
    "v2 fp8-qk fp8-pv": {"qk": "fp8", "pv": "fp8"},
    "v2 int8-qk fp8-pv warp-spec": {"qk": "int8", "pv": "fp8", "warp_specialize": True},
}
OUTLIER_CHANNELS = 4
OUTLIER_FACTORS = (20.0, 30.0, 40.0, 50.0)


def outlier_inputs(B: int, nq: int, nkv: int, H: int, D: int, gen: torch.Generator, device: str = "cuda"):
    """Q/K with a few channels 20-50x the rest, as in DiTs: in the same 4 channels Q is scaled and K carries a bias
    (constant over tokens) of 20-50; Q is then scaled by 0.2 to keep the logits' spread moderate (std about 1.2)."""
    q = torch.randn(B, nq, H, D, device=device, generator=gen)
    k = torch.randn(B, nkv, H, D, device=device, generator=gen)
    v = torch.randn(B, nkv, H, D, device=device, generator=gen)
    ch = torch.randperm(D, generator=gen, device=device)[:OUTLIER_CHANNELS]
    f = torch.tensor(OUTLIER_FACTORS, device=device)
    q[..., ch] *= f
    k[..., ch] += f
    return (q * 0.2).bfloat16(), k.bfloat16(), v.bfloat16()


def random_inputs(B: int, nq: int, nkv: int, H: int, D: int, gen: torch.Generator, device: str = "cuda"):
    return tuple(torch.randn(B, n, H, D, device=device, generator=gen).bfloat16() for n in (nq, nkv, nkv))


def time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def exact(q, k, v, heads: int):
    """float32 attention on the first `heads` heads, (B, S, h, D)."""
    qf, kf, vf = (t[:, :, :heads].float().transpose(1, 2) for t in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf)
    return o.transpose(1, 2)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def kernels(q, k, v, D: int) -> dict:
    sm = D ** -0.5
    out = {"bf16 sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)}
    sc = [t.abs().amax().float().reshape(1) / 448 for t in (q, k, v)]
    out["today fp8 (per-tensor)"] = lambda: torch.ops.fp8cookbook.fp8_attention(q, k, v, *sc, sm, "triton")
    for name, kw in VARIANTS.items():
        out[name] = (lambda kw=kw: ak.fp8_attention_v2(q, k, v, **kw))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="shapes whose label contains this text")
    ap.add_argument("--output")
    ap.add_argument("--check-heads", type=int, default=2, help="heads compared with float32 attention")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--all", action="store_true", help="also the variants that did not pay (MORE_VARIANTS)")
    args = ap.parse_args()
    if args.all:
        VARIANTS.update(MORE_VARIANTS)
    import triton

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": triton.__version__, "cudnn": torch.backends.cudnn.version(), "python": platform.python_version()}
    print(env, flush=True)
    results: dict = {"environment": env, "variants": VARIANTS, "outlier_inputs": outlier_inputs.__doc__,
                     "shapes": {}}
    for label, (B, nq, nkv, H, D) in SHAPES.items():
        if args.only not in label:
            continue
        r: dict = {"shape": [B, nq, nkv, H, D], "ms": {}, "tflops": {}, "rel_l2_random": {}, "rel_l2_outlier": {},
                   "errors": {}}
        flops = ak.flops(B, H, nq, nkv, D)
        for inputs in ("random", "outlier"):
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (random_inputs if inputs == "random" else outlier_inputs)(B, nq, nkv, H, D, g)
            ref = exact(q, k, v, args.check_heads)
            for name, fn in kernels(q, k, v, D).items():
                if name in r["errors"]:
                    continue
                try:
                    o = fn()
                    r[f"rel_l2_{inputs}"][name] = rel(o[:, :, :args.check_heads], ref)
                    if inputs == "random":
                        ms = time_ms(fn, args.reps)
                        r["ms"][name], r["tflops"][name] = ms, flops / ms / 1e9
                    del o
                except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others' figures
                    r["errors"][name] = f"{type(e).__name__}: {str(e)[:600]}"
                    traceback.print_exc(limit=2)
            del q, k, v, ref
            torch.cuda.empty_cache()
        best = getattr(ak._ATTN, "cache", {})
        r["autotuned"] = {str(key): str(cfg) for key, cfg in best.items()}
        results["shapes"][label] = r
        print(f"\n{label} {r['shape']}")
        print(f"  {'kernel':32s} {'ms':>8s} {'TFLOP/s':>8s} {'err rand':>9s} {'err outl':>9s}")
        for name in r["rel_l2_random"] | r["errors"]:
            if name in r["errors"]:
                print(f"  {name:32s} ERROR {r['errors'][name][:200]}")
                continue
            print(f"  {name:32s} {r['ms'].get(name, float('nan')):8.3f} {r['tflops'].get(name, float('nan')):8.0f} "
                  f"{r['rel_l2_random'][name]:9.4f} {r['rel_l2_outlier'].get(name, float('nan')):9.4f}", flush=True)
        if args.output:
            Path(args.output).write_text(json.dumps(results, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
