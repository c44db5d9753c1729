"""The FP8 fast path: the same math as the plain FP8 layer (spec section 6), with fewer bytes and launches.

Levers, each measured on its own by `fp8cookbook bench --levers` (docs/benchmarks.md has the numbers):

- **One-pass activation quantisation.** The plain CUDA path quantises an activation with separate element-wise
  ops (upcast, divide, clamp, cast: about 27 bytes moved per element). In eager mode the fast path does it in one
  Triton kernel (2 bytes read, 1 written, same division rounding). Under `torch.compile` the plain torch ops are
  kept on purpose, because Inductor fuses them into the kernel that produces the activation (LayerNorm+modulation).
- **Fast accumulation** (`torch._scaled_mm(..., use_fast_accum=True)`): Hopper's FP8 tensor-core accumulator
  without the periodic promotion to fp32.
- **Shared-input fusion.** Layers that read the same activation (Q/K/V; the FLUX.1 single block's Q/K/V and MLP
  input) become one FP8 GEMM. The shards' weights are requantised to one common scale (the largest of the shard
  scales, so nothing saturates) and the largest input scale is kept; SGLang does the same for its fused QKV.
- **CUDA graphs** (`CudaGraphForward`): one captured forward per input shape, replayed; removes the CPU launch
  cost. It is not FP8-specific, so the benchmark applies it to BF16 and FP8 alike.

The fast path is on by default on CUDA. Each FP8 layer holds its `FastPathConfig` (no process-wide switch);
switch a model back to the plain path with the environment variable `FP8COOKBOOK_PLAIN=1` (read when a layer is
built), `apply_fast_path(model, fast=False)`, the `fast_path(model, False)` context manager, or
`fp8cookbook bench --plain`. On CPU the flags change nothing: the FP8 layer
runs its float32 reference math, and fusion (structural) computes the same function there too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
from torch import nn

from .fusion import FusionRule, fuse_fp8_projections
from .linear import FastPathConfig, env_plain, fp8_modules
from .numerics import triton_available, triton_error, triton_quantize_fp8

__all__ = ["FastPathConfig", "fast_path", "triton_available", "triton_quantize_fp8", "fuse_fp8_projections",
           "apply_fast_path", "set_model_fast_path", "FastPathReport", "CudaGraphForward", "env_plain"]


def set_model_fast_path(model: nn.Module, config: FastPathConfig) -> FastPathConfig | None:
    """Give every FP8 layer of `model` the config (one shared object); returns the config the first layer had."""
    layers = list(fp8_modules(model).values())
    old = replace(layers[0].fast) if layers else None
    for m in layers:
        m.fast = config
    return old


@contextlib.contextmanager
def fast_path(model: nn.Module, enabled: bool = True, *, triton_quant: bool | None = None,
              fast_accum: bool | None = None) -> Iterator[FastPathConfig]:
    """Temporarily run `model`'s FP8 layers on (or, `enabled=False`, off) the fast path."""
    saved = {name: m.fast for name, m in fp8_modules(model).items()}
    base = FastPathConfig()
    cfg = FastPathConfig(enabled=bool(enabled),
                         triton_quant=base.triton_quant if triton_quant is None else bool(triton_quant),
                         fast_accum=base.fast_accum if fast_accum is None else bool(fast_accum))
    set_model_fast_path(model, cfg)
    try:
        yield cfg
    finally:
        for name, m in fp8_modules(model).items():
            if name in saved:
                m.fast = saved[name]


@dataclass
class FastPathReport:
    """What `apply_fast_path` did: whether the fast path is on, and which layers became fused FP8 GEMMs."""

    enabled: bool
    device: str
    fused: list[str] = field(default_factory=list)
    triton_quant: bool = False
    fast_accum: bool = False
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "device": self.device, "fused_layers": len(self.fused),
                "triton_quant": self.triton_quant, "fast_accum": self.fast_accum, "note": self.note}


def apply_fast_path(model: nn.Module, *, fast: bool | None = None, fuse: bool = False,
                    device: str | torch.device | None = None, config: FastPathConfig | None = None,
                    fusion_rules: tuple[FusionRule, ...] = ()) -> FastPathReport:
    """Switch an FP8 model to the fast path (or, with `fast=False`, to the plain path).

    `config` (default `FastPathConfig.from_env()`: on, unless FP8COOKBOOK_PLAIN=1) is given to every FP8 layer,
    with its master switch set to `fast` when that is not None. `fuse=True` also merges shared-input FP8 layers into one GEMM each (in place):
    pass it when the model will run under torch.compile, where it pays; in eager mode it measured slower
    (docs/benchmarks.md), because the fused output's strided Q/K/V views cost extra copies downstream.
    """
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    cfg = replace(config) if config is not None else FastPathConfig.from_env()
    if fast is not None:
        cfg.enabled = bool(fast)
    enabled = cfg.enabled
    set_model_fast_path(model, cfg)
    report = FastPathReport(enabled=enabled, device=str(device))
    if not enabled:
        report.note = "plain path"
        return report
    if fuse:
        report.fused = fuse_fp8_projections(model, fusion_rules)
    cuda = device.type == "cuda"
    report.triton_quant = cuda and cfg.triton_quant and triton_available()
    report.fast_accum = cuda and cfg.fast_accum
    if cuda and cfg.triton_quant and not report.triton_quant:
        report.note = f"Triton unavailable ({triton_error() or '?'}): activations quantised by torch ops"
    return report


# ------------------------------------------------------------------------------------------- CUDA graphs
@dataclass
class _Captured:
    graph: Any
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


class CudaGraphForward:
    """Call a transformer through CUDA graphs: captured once per input signature, then replayed.

    `forward(**kwargs)` returns a fresh copy of the output (the captured buffer is reused by the next replay).
    Every tensor argument is copied into the graph's static input before a replay. Graphs of several models may
    share one memory pool (`pool=`) because outputs are copied out right after each replay.
    """

    def __init__(self, model: nn.Module, *, pool=None, warmup: int = 2):
        self.model = model
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.warmup = warmup
        self.graphs: dict[tuple, _Captured] = {}

    @staticmethod
    def _key(kwargs: dict[str, Any]) -> tuple:
        parts = []
        for k in sorted(kwargs):
            v = kwargs[k]
            parts.append((k, tuple(v.shape), v.dtype, str(v.device)) if isinstance(v, torch.Tensor) else (k, repr(v)))
        return tuple(parts)

    @staticmethod
    def _first(out):
        return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)

    def _capture(self, kwargs: dict[str, Any]) -> _Captured:
        static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(self.warmup):  # library handles, JIT and compile caches, before capture
                self.model(**static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            out = self._first(self.model(**static))
        return _Captured(graph, {k: v for k, v in static.items() if isinstance(v, torch.Tensor)}, out)

    def __call__(self, **kwargs: Any) -> torch.Tensor:
        key = self._key(kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(kwargs)
        for name, buf in entry.inputs.items():
            src = kwargs[name]
            if src.data_ptr() != buf.data_ptr():
                buf.copy_(src)
        entry.graph.replay()
        return entry.output.clone()

    def reset(self) -> None:
        self.graphs.clear()
