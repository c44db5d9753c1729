"""Check the CUDA FP8 path against the float32 CPU math of spec section 6, and a converted checkpoint on the GPU.

Prints, per GEMM shape, the relative L2 of the plain CUDA path (`torch._scaled_mm`, exact accumulation) and of the
fast path (Triton activation quantisation, fast accumulation) against the CPU reference, and the FP8 error against
BF16 for scale. Then converts a tiny FLUX.1 and Wan2.2 export and runs the loaded transformer on CPU and GPU.

    python scripts/verify_cuda_fp8.py            # needs a GPU with compute capability >= 8.9
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fp8cookbook.fp8 import fastpath  # noqa: E402
from fp8cookbook.convert import convert_checkpoint  # noqa: E402
from fp8cookbook.families import get_family  # noqa: E402
from fp8cookbook.fp8.linear import FP8Linear, count_fp8_calls  # noqa: E402
from fp8cookbook.loader import load_fp8_transformer  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def gemms() -> None:
    print(f"{'M x K x N':>22}  {'plain vs CPU':>12}  {'fast vs CPU':>12}  {'FP8 vs BF16':>12}")
    for seed, (m, k, n) in enumerate([(4096, 3072, 3072), (4096, 3072, 12288), (1024, 15360, 6144), (2048, 5120, 13824), (333, 64, 48)]):
        torch.manual_seed(seed)
        lin = torch.nn.Linear(k, n).to(torch.bfloat16)
        lin.weight.data.mul_(0.5)
        x = torch.randn(m, k, dtype=torch.bfloat16)
        layer = FP8Linear.quantize(lin, x.abs().max())
        cpu = layer(x).float()
        layer = layer.to("cuda")
        xc = x.cuda()
        with fastpath.fast_path(layer, False):
            plain = layer(xc).float().cpu()
        with fastpath.fast_path(layer, True):
            fast = layer(xc).float().cpu()
        bf16 = lin.cuda()(xc).float().cpu()
        print(f"{m:>6} x {k:>5} x {n:>5}  {rel(plain, cpu):12.2e}  {rel(fast, cpu):12.2e}  {rel(fast, bf16):12.2e}")


def checkpoints() -> None:
    from conftest import make_handmade_export

    for name in ("flux1", "wan22-a14b"):
        with tempfile.TemporaryDirectory() as d:
            paths = make_handmade_export(Path(d), name)
            convert_checkpoint(paths["export"], Path(d) / "fp8", base_transformer=paths["base"], progress=False)
            fam = get_family(name)
            outs = {}
            for device in ("cpu", "cuda"):
                model, report = load_fp8_transformer(Path(d) / "fp8", device=device, dtype=torch.bfloat16)
                inputs = fam.make_inputs(dict(model.config), height=64, width=64, num_frames=5 if fam.is_video else None,
                                         text_len=8, device=device, generator=torch.Generator().manual_seed(3))
                with torch.no_grad(), count_fp8_calls(model) as calls:
                    outs[device] = model(**inputs)[0].float().cpu()
                print(f"{name:12s} {device:5s} FP8 layers ran {len(calls)}/{report.fp8_layers}, "
                      f"weight still FP8 on device: {all(m.weight.dtype == torch.float8_e4m3fn for m in model.modules() if isinstance(m, FP8Linear))}")
            print(f"{name:12s} loaded checkpoint, GPU vs CPU output: relative L2 {rel(outs['cuda'], outs['cpu']):.2e}")


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    gemms()
    checkpoints()
