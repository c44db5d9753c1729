"""Per-GEMM view of the FP8 levers on one GPU: BF16 linear vs FP8 (plain quantisation, one-pass Triton quantisation,
fast accumulation), and fused Q/K/V against three separate GEMMs, for the shapes of FLUX.1, FLUX.2 and Wan2.2.

    python scripts/gemm_levers.py [--output gemm.json]

Times are medians of CUDA-event timings after warm-up (triton.testing.do_bench), on random data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8cookbook.fp8.numerics import quantize_fp8, triton_quantize_fp8  # noqa: E402

# (name, tokens M, in K, out N): one representative layer of each kind at the benchmark resolutions.
SHAPES = [
    ("flux1 attn q/k/v (img)", 4096, 3072, 3072),
    ("flux1 single q/k/v/mlp fused", 4608, 3072, 3 * 3072 + 12288),
    ("flux1 single proj_out", 4608, 15360, 3072),
    ("flux1 ff in (img)", 4096, 3072, 12288),
    ("flux2 single qkv_mlp", 4608, 6144, 3 * 6144 + 2 * 18432),
    ("flux2 single to_out", 4608, 6144 + 18432, 6144),
    ("wan a14b attn q", 32760, 5120, 5120),
    ("wan a14b ffn in", 32760, 5120, 13824),
    ("wan a14b ffn out", 32760, 13824, 5120),
]


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for name, m, k, n in SHAPES:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
        b = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.01
        sx = (x.abs().amax().float() / 448).reshape(1)
        sw = (w.abs().amax().float() / 448).reshape(1)
        wq = quantize_fp8(w, sw)
        xq = quantize_fp8(x, sx)
        flops = 2 * m * k * n
        r = {"layer": name, "M": m, "K": k, "N": n}
        r["bf16_s"] = bench(lambda: torch.nn.functional.linear(x, w, b))
        r["quant_torch_s"] = bench(lambda: quantize_fp8(x, sx))
        r["quant_triton_s"] = bench(lambda: triton_quantize_fp8(x, sx))
        r["gemm_fp8_s"] = bench(lambda: torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, bias=b,
                                                          out_dtype=torch.bfloat16))
        r["gemm_fp8_fast_accum_s"] = bench(lambda: torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, bias=b,
                                                                     out_dtype=torch.bfloat16, use_fast_accum=True))
        r["fp8_plain_s"] = r["quant_torch_s"] + r["gemm_fp8_s"]
        r["fp8_fast_s"] = r["quant_triton_s"] + r["gemm_fp8_fast_accum_s"]
        r["bf16_tflops"] = flops / r["bf16_s"] / 1e12
        r["fp8_fast_accum_tflops"] = flops / r["gemm_fp8_fast_accum_s"] / 1e12
        rows.append(r)
        del x, w, wq, xq
    # Fused Q/K/V: one GEMM of N=3*3072 against three of N=3072 (FLUX.1 image stream), FP8 fast path.
    x = torch.randn(4096, 3072, device=dev, dtype=torch.bfloat16)
    sx = (x.abs().amax().float() / 448).reshape(1)
    ws = [quantize_fp8(torch.randn(3072, 3072, device=dev, dtype=torch.bfloat16) / 55, torch.ones(1, device=dev) / 100)
          for _ in range(3)]
    wf = torch.cat(ws)
    one = torch.ones(1, device=dev)

    def three():
        xq = triton_quantize_fp8(x, sx)
        xq2 = triton_quantize_fp8(x, sx)
        xq3 = triton_quantize_fp8(x, sx)
        return [torch._scaled_mm(q, w.t(), scale_a=sx, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)
                for q, w in zip((xq, xq2, xq3), ws)]

    def fused():
        xq = triton_quantize_fp8(x, sx)
        return torch._scaled_mm(xq, wf.t(), scale_a=sx, scale_b=one, out_dtype=torch.bfloat16,
                                use_fast_accum=True).chunk(3, dim=-1)

    qkv = {"three_gemms_s": bench(three), "one_fused_gemm_s": bench(fused)}
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "flux1_qkv": qkv}
    print(f"{'layer':30s} {'bf16 ms':>8s} {'q torch':>8s} {'q triton':>8s} {'fp8 mm':>8s} {'+accum':>8s} "
          f"{'plain x':>8s} {'fast x':>8s}")
    for r in rows:
        print(f"{r['layer']:30s} {r['bf16_s'] * 1e3:8.3f} {r['quant_torch_s'] * 1e3:8.3f} "
              f"{r['quant_triton_s'] * 1e3:8.3f} {r['gemm_fp8_s'] * 1e3:8.3f} {r['gemm_fp8_fast_accum_s'] * 1e3:8.3f} "
              f"{r['bf16_s'] / r['fp8_plain_s']:8.2f} {r['bf16_s'] / r['fp8_fast_s']:8.2f}")
    print(f"FLUX.1 q/k/v: three FP8 GEMMs {qkv['three_gemms_s'] * 1e3:.3f} ms, one fused {qkv['one_fused_gemm_s'] * 1e3:.3f} ms")
    if args.output:
        args.output.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
