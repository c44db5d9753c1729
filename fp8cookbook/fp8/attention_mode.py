"""The FP8-attention mode a user asks for, parsed once at the boundary (CLI, notebook parameters, function calls).

"auto" (the default) runs FP8 attention only for calls with at least `MIN_KV_TOKENS` keys, on a GPU with an FP8
kernel: per call on an H100 it pays at Wan2.2's 32,760 tokens and loses at FLUX's 4,608 and at the 512 text tokens
of Wan2.2's cross-attention (docs/benchmarks.md). "on" runs it for every call, "off" for none.
Imports no torch, so the CLI's --help stays fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import Fp8CookbookError

MIN_KV_TOKENS = 16384
MODES = ("auto", "on", "off")
KERNELS = ("triton", "cudnn")  # the CUDA kernels of FP8 attention; "triton" is the default (cuDNN: faster, less accurate)

__all__ = ["MIN_KV_TOKENS", "MODES", "KERNELS", "AttentionMode", "env_kernel"]


def env_kernel() -> str:
    """FP8COOKBOOK_ATTENTION_KERNEL (default "triton"): which CUDA kernel runs FP8 attention."""
    kernel = os.environ.get("FP8COOKBOOK_ATTENTION_KERNEL", "triton").strip().lower() or "triton"
    if kernel not in KERNELS:
        raise Fp8CookbookError(f"FP8COOKBOOK_ATTENTION_KERNEL={kernel!r}: use one of {', '.join(KERNELS)}")
    return kernel


@dataclass(frozen=True)
class AttentionMode:
    """`mode` one of MODES; `threshold` the key count "auto" needs; `kernel` the preferred CUDA kernel."""

    mode: str = "auto"
    threshold: int = MIN_KV_TOKENS
    kernel: str = "triton"

    @classmethod
    def parse(cls, value: "bool | str | None | AttentionMode", *, threshold: int | None = None,
              kernel: str | None = None) -> "AttentionMode":
        """A user's `fp8_attention` value (True is "on"; False and None are "off"; an AttentionMode passes through)."""
        if isinstance(value, AttentionMode):
            return value
        if value is True or value is False or value is None:
            mode = "on" if value else "off"
        else:
            mode = str(value).strip().lower()
            if mode not in MODES:
                raise Fp8CookbookError(f"fp8_attention={value!r}: use one of {', '.join(MODES)}")
        return cls(mode=mode, threshold=MIN_KV_TOKENS if threshold is None else int(threshold),
                   kernel=env_kernel() if kernel is None else kernel)

    @property
    def min_kv_tokens(self) -> int:
        """The `install_fp8_attention(min_kv_tokens=)` this mode asks for ("off" installs nothing)."""
        return self.threshold if self.mode == "auto" else 0

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def quantize_mha(self) -> bool:
        """Whether calibration should record Q/K/V amaxes for this mode (anything but "off")."""
        return self.mode != "off"

    def __str__(self) -> str:
        return self.mode
