"""The pipeline benchmark: a real pipeline, BF16 then FP8 (checkpoint folder or in-process), end to end.

Each timed call is a whole generation, decoded: text encoding (call start to the first transformer forward), the
denoising loop (the first forward to the last step's end callback, per step) and the VAE decode with the pipeline's
post-processing (the last step's end to the call's return). `loop_s` (the speedup's basis) is the denoising loop,
comparable with the synthetic benchmark; `call_s` and `phase_s` are the generation a user waits for.
"""

from __future__ import annotations

import contextlib
import statistics
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import Fp8CookbookError
from ..families import Family
from ..fp8.attention_diffusers import kernel_choices
from ..fp8.fastpath import set_model_fast_path
from ..fp8.fusion import fuse_fp8_projections
from ..fp8.linear import FastPathConfig, count_fp8_calls, fp8_modules
from ..fp8.quantize import StaticFP8Config, fp8_candidates, quantize_, record_input_amax
from ..offload import one_expert_resident, release_memory
from .measure import Timer, compile_model, gb, model_bytes, schedule, set_attention_backend, stats, uncompile
from .report import finish, report_head
from .settings import BenchSettings, attention_mode_of


def _fp8_folder_for(fp8_path: Path, component: str, single: bool) -> Path:
    if (fp8_path / "config.json").is_file() and single:
        return fp8_path
    sub = fp8_path / component
    if (sub / "config.json").is_file():
        return sub
    raise Fp8CookbookError(f"{fp8_path}: no FP8 checkpoint for {component} (expected {sub}/config.json"
                           + (" or config.json in the folder itself)" if single else ")"))


class _PipelineRun:
    """One pipeline, its generation kwargs and its denoiser components, timed per step by callbacks."""

    def __init__(self, family: Family, s: BenchSettings, pipe: Any = None):
        from ..pipelines import generation_kwargs, load_pipeline, transformer_names

        self.family, self.s = family, s
        self.device = torch.device(s.device)
        self.timer = Timer(self.device)
        self.pipe = pipe if pipe is not None else load_pipeline(family.name, s.model_path, device=self.device)
        self.names = transformer_names(self.pipe)
        for n in self.names:
            set_attention_backend(getattr(self.pipe, n), s.attention_backend)
        self.kw = generation_kwargs(family, self.pipe, height=s.height, width=s.width, num_frames=s.num_frames,
                                    num_inference_steps=s.steps, output_type="pt")

    def components(self) -> list[torch.nn.Module]:
        return [getattr(self.pipe, n) for n in self.names]

    def call(self, untimed: bool = False, **extra: Any) -> None:
        """One generation; `untimed` ones (warm-up, counting, calibration) run `warmup_steps` steps."""
        kw = dict(self.kw, generator=torch.Generator("cpu").manual_seed(self.s.seed), **extra)
        if untimed and self.s.warmup_steps:
            kw["num_inference_steps"] = self.s.warmup_steps
        with torch.no_grad():
            self.pipe(**kw)

    def one_call(self, count: bool = False, untimed: bool = False) -> tuple[list[float], dict[str, int],
                                                                             dict[str, float]]:
        """One decoded pipeline call: its step times (from the first transformer forward and each step's end
        callback), the FP8 calls counted, and its phases (encode, denoise, decode, call)."""
        start = self.timer.mark()
        marks: list = []

        def first_forward(mod, args, kwargs):
            if not marks:
                marks.append(self.timer.mark())

        def on_step_end(p, i, t, callback_kwargs):
            marks.append(self.timer.mark())
            return callback_kwargs

        handles = [m.register_forward_pre_hook(first_forward, with_kwargs=True) for m in self.components()]
        per_component: list[tuple[str, dict[str, int]]] = []
        try:
            with contextlib.ExitStack() as stack:
                if count:
                    per_component = [(n, stack.enter_context(count_fp8_calls(getattr(self.pipe, n))))
                                     for n in self.names]
                self.call(untimed=untimed, callback_on_step_end=on_step_end)
        finally:
            for h in handles:
                h.remove()
        end = self.timer.mark()
        counts = {f"{n}.{k}": v for n, c in per_component for k, v in c.items()}
        encode, *steps, decode = self.timer.intervals([start, *marks, end])
        phases = {"encode": encode, "denoise": sum(steps), "decode": decode}
        phases["call"] = sum(phases.values())
        return steps, counts, phases

    def measure(self, name: str, precision: str) -> dict[str, Any]:
        """One side: every call of it (counted, warm-up, timed), with one expert resident if asked; the peak is
        reset after the experts are placed, so it is the generations' own."""
        with self.residency() as moves:
            out = self._measure(name, precision)
        if moves is not None:
            out["expert_moves"] = list(moves)  # the transfers its calls made, and the return to where they were
        return out

    @contextlib.contextmanager
    def residency(self):
        """`one_expert_resident` over the components when asked (yields its list of moves), else nothing (None)."""
        if not self.s.one_expert_resident:
            yield None
            return
        with one_expert_resident(dict(zip(self.names, self.components())), self.device) as moves:
            yield moves

    def _measure(self, name: str, precision: str) -> dict[str, Any]:
        s, device = self.s, self.device
        out: dict[str, Any] = {"name": name, "precision": precision, "headline": precision == "fp8",
                               "levers": {"fast": bool(s.fast and precision == "fp8"),
                                          "fused": bool(s.fast and s.compile and precision == "fp8")}}
        if device.type == "cuda":
            release_memory()
            torch.cuda.reset_peak_memory_stats(device)
            out["allocated_at_start_gb"] = gb(torch.cuda.memory_allocated(device))
        out["model_bytes"] = sum(model_bytes(m) for m in self.components())
        warmups = s.warmup
        if precision == "fp8":
            _, counts, _ = self.one_call(count=True, untimed=True)
            out["fp8_layers"] = sum(len(fp8_modules(m)) for m in self.components())
            out["fp8_layers_ran"] = len(counts)
            out["fp8_calls_counted"] = sum(counts.values())
            if not s.compile:  # eager: the counted call warmed the same kernels; compiled ones come after it
                warmups = max(warmups - 1, 0)
        if s.compile:
            torch._dynamo.reset()
            out["compile"] = sorted({compile_model(m) for m in self.components()})
        try:
            for _ in range(warmups):
                self.one_call(untimed=True)
            calls = [self.one_call() for _ in range(s.runs)]
        finally:
            for m in self.components():
                uncompile(m)
            if s.compile:
                torch._dynamo.reset()
        per_run = [steps for steps, _, _ in calls]
        out["loop_s"] = stats([sum(r) for r in per_run])
        out["call_s"] = stats([phases["call"] for _, _, phases in calls])
        out["phase_s"] = {k: statistics.median(phases[k] for _, _, phases in calls)
                          for k in ("encode", "denoise", "decode", "call")}
        out["step_s_median"] = [statistics.median(r[i] for r in per_run) for i in range(len(per_run[0]))]
        out["step_s_all"] = per_run
        out["peak_memory_gb"] = gb(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        # the CUDA kernel each FP8 attention call ran, eager and compiled calls alike (none off the GPU)
        choices = {k: v for m in self.components() for k, v in kernel_choices(m).items()}
        if precision == "fp8" and choices:
            out["fp8_attention_kernel_choices"] = choices
        return out

    def load_fp8(self, report: dict[str, Any]) -> None:
        """Swap each component for its FP8 checkpoint, the BF16 one freed first."""
        from ..loader import apply_attention_mode, load_fp8_transformer

        s, device = self.s, self.device
        for n in self.names:
            setattr(self.pipe, n, None)  # free the BF16 weights before the FP8 ones arrive
            release_memory()
            folder = _fp8_folder_for(Path(s.fp8_path), n, len(self.names) == 1)
            model, _ = load_fp8_transformer(folder, device=device, fp8_attention="off")
            set_attention_backend(model, s.attention_backend)
            layers = apply_attention_mode(model, folder, attention_mode_of(s))  # after the backend is set
            if layers:
                report.setdefault("fp8_attention_layers", {})[n] = layers
            setattr(self.pipe, n, model)
        report["fp8_source"] = f"checkpoint {s.fp8_path}"

    def quantize_in_process(self, report: dict[str, Any]) -> None:
        """One calibration call of the pipeline, then `quantize_` on each component."""
        amax: dict[str, dict[str, torch.Tensor]] = {}
        with contextlib.ExitStack() as stack:
            for n, m in zip(self.names, self.components()):
                amax[n] = stack.enter_context(record_input_amax(m, fp8_candidates(m, self.family)))
            with self.residency():
                self.call(untimed=True)
        report["quantized_linears"] = sum(len(quantize_(getattr(self.pipe, n), StaticFP8Config(amax[n])))
                                          for n in self.names)
        steps = self.s.warmup_steps or self.s.steps
        report["fp8_source"] = f"in-process quantisation (one calibration call of the pipeline, {steps} steps)"


def run_pipeline(family: Family, s: BenchSettings, log: Callable[[str], None] = lambda m: None, *,
                 pipe: Any = None) -> dict[str, Any]:
    """Time a real pipeline end to end, BF16 then FP8 (checkpoint folder or in-process quantisation).

    `pipe`: an already built pipeline to time instead of loading `s.model_path` (which then only names it), e.g.
    `scripts/full_size.py`'s in-memory stand-ins; its BF16 transformer(s) are replaced by the FP8 ones."""
    run = _PipelineRun(family, s, pipe=pipe)
    report = report_head(family, s, run.device, schedule(family, s.steps), family.forwards_per_step)
    report["components"] = run.names
    sides = [run.measure("bf16", "bf16")]
    if s.fp8_path:
        run.load_fp8(report)
    else:
        run.quantize_in_process(report)
    cfg = FastPathConfig(enabled=bool(s.fast))
    for m in run.components():
        set_model_fast_path(m, cfg)
    if s.fast and s.compile:
        report["fused_layers"] = sum(len(fuse_fp8_projections(m, family.fusion_rules)) for m in run.components())
    sides.append(run.measure("fp8", "fp8"))
    return finish(report, sides, s)
