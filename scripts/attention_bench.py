"""FP8 attention vs BF16 attention per call, at the attention shapes of the full-size models (GPU only).

Prints, per shape: BF16 torch SDPA (what diffusers runs: cuDNN's flash kernel on H100) and fp8cookbook's FP8
attention op with each CUDA kernel (Triton; cuDNN when the `cudnn` frontend package is importable), quantisation
and dequantisation included; milliseconds, TFLOP/s, and the relative L2 error against exact float32 attention on
the first heads (and against the float32 FP8 reference for the FLUX shapes). Writes JSON with --output.

    python scripts/attention_bench.py --output attention.json
"""

from __future__ import annotations

import argparse
import json

import torch

from fp8cookbook.fp8 import attention as fa
from fp8cookbook.bench import environment

SHAPES = {  # (batch, query tokens, key tokens, heads, head_dim, score std); 512 text tokens
    "flux1 joint": (1, 4608, 4608, 24, 128, 1.0),
    "flux2 joint": (1, 4608, 4608, 48, 128, 1.0),
    "wan22 self 832x480x81": (1, 32760, 32760, 40, 128, 1.0),
    "wan22 cross (512 text)": (1, 32760, 512, 40, 128, 1.0),
    # scores with std 0.015, as in the random-weight Wan2.2 self-attention: a nearly flat softmax, P close to 1
    "wan22 self, flat softmax": (1, 32760, 32760, 40, 128, 0.015),
}


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


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="shapes whose label contains this text")
    ap.add_argument("--output")
    ap.add_argument("--check-heads", type=int, default=2, help="heads compared with exact attention")
    args = ap.parse_args()
    results = {"environment": environment(torch.device("cuda")), "shapes": {}}
    print(results["environment"].get("gpu"), torch.__version__)
    for label, (B, nq, nkv, H, D, score_std) in SHAPES.items():
        if args.only not in label:
            continue
        g = torch.Generator(device="cuda").manual_seed(0)
        q = (torch.randn(B, nq, H, D, device="cuda", generator=g) * score_std).bfloat16()
        k = torch.randn(B, nkv, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, nkv, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        sc = [t.abs().amax().float().reshape(1) / 448 for t in (q, k, v)]
        sm = D ** -0.5
        flops = 4 * B * H * nq * nkv * D
        r: dict = {"shape": [B, nq, nkv, H, D]}
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

        def op(kernel: str):
            def run():
                return torch.ops.fp8cookbook.fp8_attention(q, k, v, *sc, sm, kernel)
            return run

        r["bf16_sdpa_ms"] = time_ms(sdpa)
        kernels = ["triton"] + (["cudnn"] if fa.cudnn_attention_available() else [])
        for kernel in kernels:
            r[f"fp8_{kernel}_ms"] = time_ms(op(kernel))
        best = getattr(fa._attn_fwd_kernel, "best_config", None)
        r["triton_config"] = str(best) if best is not None else None
        r["cudnn_errors"] = fa.cudnn_errors()
        for key in [k for k in r if k.endswith("_ms")]:
            r[key.replace("_ms", "_tflops")] = flops / (r[key] * 1e-3) / 1e12
        r["speedup_fp8_vs_bf16"] = {kn: r["bf16_sdpa_ms"] / r[f"fp8_{kn}_ms"] for kn in kernels}
        h = args.check_heads
        qs, ks_, vs_ = q[:, :, :h].contiguous(), k[:, :, :h].contiguous(), v[:, :, :h].contiguous()
        exact = torch.nn.functional.scaled_dot_product_attention(
            qs.float().transpose(1, 2), ks_.float().transpose(1, 2), vs_.float().transpose(1, 2)).transpose(1, 2)
        r["rel_l2_vs_exact"] = {"bf16_sdpa": rel(sdpa()[:, :, :h], exact),
                                **{f"fp8_{kn}": rel(op(kn)()[:, :, :h], exact) for kn in kernels}}
        if nq * nkv <= 4608 * 4608:
            ref = fa.fp8_attention_reference(qs, ks_, vs_, *sc, sm)
            r["rel_l2_vs_fp8_reference"] = {f"fp8_{kn}": rel(op(kn)()[:, :, :h], ref) for kn in kernels}
        results["shapes"][label] = r
        print(label, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
