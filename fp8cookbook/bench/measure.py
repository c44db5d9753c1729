"""Measuring tools shared by the synthetic and the pipeline benchmark: timers, statistics, the schedule, compile."""

from __future__ import annotations

import importlib.metadata
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..version import __version__
from ..errors import Fp8CookbookError
from ..families import Family


def environment(device: torch.device) -> dict[str, Any]:
    """GPU name and the versions a reader needs to reproduce a number."""
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "torch": torch.__version__, "fp8cookbook": __version__}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover - diffusers is a dependency
        env["diffusers"] = None
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:  # the --peer library's version, read from its metadata (importing torchao is slow and noisy)
        env["torchao"] = importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        env["torchao"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   compute_capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   cuda=torch.version.cuda, sm_count=props.multi_processor_count)
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


class Timer:
    """Marks along the stream of work: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def intervals(self, marks: list) -> list[float]:
        if self.cuda:
            marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
        return [b - a for a, b in zip(marks, marks[1:])]


def stats(values: list[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    q1, q3 = (statistics.quantiles(values, n=4, method="inclusive")[::2] if len(values) > 1
              else (values[0], values[0]))
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q1, "q3": q3,
            "mean": statistics.fmean(values), "n": len(values), "all": values}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gb(n: float | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# ------------------------------------------------------------------------------------------------ schedule
@dataclass(frozen=True)
class Step:
    index: int
    sigma: float
    sigma_next: float
    timestep: float  # the 0..1000 training-time value
    expert: str


def schedule(family: Family, steps: int) -> list[Step]:
    """A flow-matching schedule of `steps` (shifted sigmas from 1 down) and the expert each step runs."""
    shift = family.flow_shift or 1.0  # decides which A14B expert a step uses (and the timesteps)
    sig = [shift * s / (1 + (shift - 1) * s) for s in (1 - i / steps for i in range(steps))] + [0.0]
    two = len(family.experts) > 1 and family.boundary_ratio is not None
    out = []
    for i in range(steps):
        t = sig[i] * 1000
        expert = family.experts[0] if not two or t >= family.boundary_ratio * 1000 else family.experts[1]
        out.append(Step(i, sig[i], sig[i + 1], t, expert))
    return out


def set_attention_backend(model: nn.Module, backend: str | None) -> None:
    """diffusers' attention backend for every attention module (None keeps the default, torch SDPA)."""
    if backend is None:
        return
    try:
        model.set_attention_backend(backend)
    except (ValueError, RuntimeError, ImportError, AttributeError) as e:
        raise Fp8CookbookError(f"--attention-backend {backend}: {str(e).splitlines()[0]}") from None


def compile_model(model: nn.Module) -> str:
    if getattr(model, "_repeated_blocks", None) and hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks(fullgraph=True)
        return "compile_repeated_blocks(fullgraph=True)"
    model.compile()
    return "torch.compile(transformer)"


def uncompile(model: nn.Module) -> None:
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
