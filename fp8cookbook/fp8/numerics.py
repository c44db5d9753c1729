"""FP8 numerics every kernel shares: the e4m3 dtype, its largest value, and "quantise x by its scale".

    Q(x / s) = round-to-nearest e4m3 of the IEEE round-to-nearest quotient x / s, saturated to +-448

`quantize_fp8` is the torch form (CPU reference, torch.compile, weights); `tl_quantize_fp8` the Triton form that
every Triton kernel calls, with the same division rounding (`div.rn`: Triton's plain `/` is an approximation).
"""

from __future__ import annotations

from typing import Any

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value

__all__ = ["FP8_DTYPE", "FP8_MAX", "quantize_fp8", "fp8_gemm_supported", "cuda_fp8_ok", "triton",
           "tl_quantize_fp8", "triton_available", "triton_error", "triton_quantize_fp8"]


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Q(x / scale): round to nearest E4M3 after saturating (a plain cast would turn overflow into NaN)."""
    y = x.to(torch.float32, copy=True)  # one float32 buffer, then in place: this runs over multi-GB exports
    return y.div_(scale.float()).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_gemm_supported(device: torch.device) -> bool:
    """`torch._scaled_mm` with E4M3 needs an Ada or Hopper (or newer) GPU."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


_FP8_GEMM_OK: dict[int, bool] = {}  # a cache of a hardware fact, not a setting


def cuda_fp8_ok(device: torch.device) -> bool:
    """`fp8_gemm_supported` for a CUDA device, asked once per device (it runs on every forward)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _FP8_GEMM_OK.get(index)
    if ok is None:
        ok = _FP8_GEMM_OK[index] = fp8_gemm_supported(device)
    return ok


# ---------------------------------------------------------------------------------------------- Triton
try:  # CUDA builds of torch ship Triton; the CPU wheels do not, and then the torch ops run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

_TRITON: dict[str, Any] = {}

if triton is not None:
    TL_FP8_MAX = tl.constexpr(FP8_MAX)

    @triton.jit
    def tl_quantize_fp8(x, scale):
        """Q(x / scale) inside a Triton kernel: x float32 (any shape), scale a float32 scalar or a block that
        broadcasts to x (per-row, per-channel scales); returns e4m3."""
        s = tl.broadcast_to(scale, x.shape)
        # IEEE round-to-nearest division, as torch's `x.float() / scale` (Triton's `/` is an approximation).
        y = tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=r,r,r", [x, s], dtype=tl.float32,
                                      is_pure=True, pack=1)
        y = tl.minimum(tl.maximum(y, -TL_FP8_MAX), TL_FP8_MAX)
        return y.to(tl.float8e4nv)

    @triton.jit
    def _quantize_fp8_kernel(x_ptr, out_ptr, scale_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, tl_quantize_fp8(x, tl.load(scale_ptr)), mask=mask)
else:
    tl_quantize_fp8 = None
    _quantize_fp8_kernel = None
    _TRITON["error"] = "ImportError: no triton in this torch build"


def triton_available() -> bool:
    """Triton importable, so the one-pass kernel exists."""
    return triton is not None


def triton_error() -> str | None:
    """Why Triton is unavailable (for the notes reports print), None when it is there."""
    return _TRITON.get("error")


_BLOCK = 4096


def triton_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Q(x / scale) for a CUDA tensor in one pass: the same result as `quantize_fp8`, 3 bytes per element."""
    if not triton_available():
        raise RuntimeError(f"Triton quantisation kernel unavailable: {_TRITON.get('error')}")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    n = x.numel()
    if n:
        _quantize_fp8_kernel[(triton.cdiv(n, _BLOCK),)](x, out, scale, n, BLOCK=_BLOCK, num_warps=8)
    return out
