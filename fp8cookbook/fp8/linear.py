"""The FP8 linear layer (spec section 6): static per-tensor scales, E4M3 weight and activation.

    y = (s_x * Q(x / s_x)) @ (s_w * Q(W / s_w))^T + b,   Q = round-to-nearest E4M3, saturating at +-448

On CUDA with compute capability >= 8.9 the product is one `torch._scaled_mm` call with the weight passed as the
column-major transposed view of the row-major [out, in] FP8 tensor (free: `.t()` is a view). Elsewhere the same
math runs in float32, so CPU tests check the numerics the GPU computes. How the CUDA product runs (one-pass Triton
quantisation, fast accumulation) is the layer's `fast` config (`FastPathConfig`), not process state.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .numerics import FP8_DTYPE, FP8_MAX, cuda_fp8_ok, quantize_fp8, triton_available, triton_quantize_fp8


def env_plain() -> bool:
    """FP8COOKBOOK_PLAIN=1 asks for the plain path: the default of `FastPathConfig.from_env()`."""
    return os.environ.get("FP8COOKBOOK_PLAIN", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class FastPathConfig:
    """How `FP8Linear.forward` runs on CUDA; every layer holds one (`apply_fast_path` gives a model's layers one)."""

    enabled: bool = True  # master switch; False is the plain path
    triton_quant: bool = True  # eager: quantise activations in one Triton kernel
    fast_accum: bool = True  # _scaled_mm(use_fast_accum=True)

    @classmethod
    def from_env(cls) -> "FastPathConfig":
        """The default: on, unless FP8COOKBOOK_PLAIN=1."""
        return cls(enabled=not env_plain())

class FP8Linear(nn.Module):
    """A drop-in for nn.Linear holding an FP8 weight with its static weight and input scales.

    dtype casts of the model (`model.to(torch.bfloat16)`) leave the FP8 weight and fp32 scales alone and move
    them with device moves only: a cast would silently de-quantize them.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if in_features % 16 or out_features % 16:
            raise ValueError(f"FP8 GEMM needs in and out features that are multiples of 16, got {in_features}x{out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(1, dtype=torch.float32, device=device), requires_grad=False)
        self.input_scale = nn.Parameter(torch.ones(1, dtype=torch.float32, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.use_fast_accum = False  # exact fp32 accumulation unless the fast path opts in
        self.fast = FastPathConfig.from_env()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """An FP8 layer of the same shape on the same device, to be filled from a checkpoint."""
        dtype = linear.bias.dtype if linear.bias is not None else torch.bfloat16
        device = linear.weight.device
        return cls(linear.in_features, linear.out_features, linear.bias is not None, device=device, dtype=dtype)

    @classmethod
    def quantize(cls, linear: nn.Linear, input_amax: float | torch.Tensor) -> "FP8Linear":
        """Quantize an nn.Linear from its weight amax and a calibrated input amax (for tests and benchmarks)."""
        layer = cls.from_linear(linear).to(linear.weight.device)
        w = linear.weight.detach()
        w_scale = (w.abs().amax().float() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
        layer.weight_scale.data.copy_(w_scale)
        layer.input_scale.data.copy_(torch.as_tensor(input_amax, dtype=torch.float32).reshape(1) / FP8_MAX)
        layer.weight.data.copy_(quantize_fp8(w, w_scale))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        keep = {n: getattr(self, n).data for n in ("weight", "weight_scale", "input_scale")}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            # Learn where fn sends tensors from an empty probe, then move without changing dtype.
            device = fn(torch.empty(0, device=old.device)).device
            getattr(self, name).data = old.to(device)
        return self

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.is_cuda and cuda_fp8_ok(x2.device):
            # The fast path (fastpath.py) changes how, not what: one-pass quantisation in eager mode (under
            # torch.compile the torch ops below are fused into the producer by Inductor) and fast accumulation.
            cfg = self.fast
            fast = cfg.enabled
            if fast and cfg.triton_quant and not torch.compiler.is_compiling() and triton_available():
                xq = triton_quantize_fp8(x2, self.input_scale)
            else:
                xq = quantize_fp8(x2, self.input_scale)
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                                 bias=self.bias, out_dtype=x.dtype,
                                 use_fast_accum=self.use_fast_accum or (fast and cfg.fast_accum))
        else:
            xq = quantize_fp8(x2, self.input_scale).float() * self.input_scale
            y = xq @ self.dequantized_weight().t()
            if self.bias is not None:
                y = y + self.bias.float()
            y = y.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=float8_e4m3fn, weight_scale={float(self.weight_scale):.3e}, input_scale={float(self.input_scale):.3e}")


def fp8_modules(model: nn.Module) -> dict[str, FP8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}


@contextlib.contextmanager
def count_fp8_calls(model: nn.Module) -> Iterator[dict[str, int]]:
    """Count forward calls of every FP8 layer while the block runs: a checkpoint can load as FP8 and still run BF16."""
    counts: dict[str, int] = {}
    handles = []
    for name, module in fp8_modules(model).items():
        def hook(mod, args, name=name):
            counts[name] = counts.get(name, 0) + 1
        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def swap_linears(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool],
                 make: Callable[[nn.Linear, str], nn.Module]) -> list[str]:
    """Replace every `nn.Linear` for which `filter_fn(module, name)` holds by `make(linear, name)`, in place.

    The one loop that turns a model's linears into FP8 layers (the loader, `quantize_`); returns the swapped names.
    Only names are collected up front, so each BF16 layer is freed as soon as its replacement is made.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and filter_fn(m, name)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child), name))
    return names
