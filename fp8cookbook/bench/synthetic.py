"""The synthetic benchmark: the family's real transformer class with random weights, FP8 made in process."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from ..families import Family, build_transformer
from ..fp8.attention_diffusers import (count_fp8_attention_calls, install_fp8_attention, kernel_choices,
                                       record_attention_amax, recorded_key_lengths, remove_fp8_attention)
from ..fp8.fastpath import CudaGraphForward, set_model_fast_path
from ..fp8.fusion import fuse_fp8_projections
from ..fp8.linear import FastPathConfig, count_fp8_calls, fp8_modules
from ..fp8.numerics import triton_available
from ..fp8.quantize import StaticFP8Config, attention_scales, fp8_candidates, quantize_, record_input_amax
from .measure import (Step, Timer, compile_model, gb, model_bytes, schedule, set_attention_backend,
                      stats, sync, uncompile)
from .peers import peer_info, quantize_peer
from .report import finish, report_head
from .settings import BenchSettings, Side, attention_mode_of, plan_sides


class SyntheticRun:
    """Models, inputs and the loop for one synthetic benchmark: build, calibrate, convert, then measure sides."""

    def __init__(self, family: Family, s: BenchSettings):
        self.family, self.s = family, s
        self.device = torch.device(s.device)
        self.timer = Timer(self.device)
        self.steps = schedule(family, s.steps)
        self.experts = list(dict.fromkeys(st.expert for st in self.steps))
        self.cfg = family.forwards_per_step
        self.models: dict[str, nn.Module] = {}
        self.build_models()
        config = dict(next(iter(self.models.values())).config)
        g = torch.Generator().manual_seed(s.seed)
        self.inputs = family.make_inputs(config, height=s.height, width=s.width, num_frames=s.num_frames,
                                         batch=s.batch, text_len=s.text_len, device=self.device, generator=g)
        ehs = self.inputs["encoder_hidden_states"]
        self.negative = torch.randn(ehs.shape, generator=g).to(ehs.device, ehs.dtype) if self.cfg == 2 else None
        self.x0 = self.inputs["hidden_states"]
        t_in = self.inputs["timestep"]
        self.t = [torch.full_like(t_in, st.sigma if t_in.is_floating_point() else round(st.timestep))
                  for st in self.steps]
        self.graphs: dict[str, CudaGraphForward] = {}
        self.reference_output: torch.Tensor | None = None  # the BF16 side's first forward, the quality reference

    def build_models(self) -> None:
        """The BF16 models from the seed (the same weights every time: peer sides start from a rebuild)."""
        for i, name in enumerate(self.experts):
            self.models[name] = build_transformer(self.family, self.s.synthetic, seed=self.s.seed + i,
                                                  device=self.device)
            set_attention_backend(self.models[name], self.s.attention_backend)

    def kwargs(self, step: Step, x: torch.Tensor, negative: bool = False) -> dict[str, Any]:
        kw = dict(self.inputs, hidden_states=x, timestep=self.t[step.index])
        if negative:
            kw["encoder_hidden_states"] = self.negative
        return kw

    def forward(self, expert: str, kw: dict[str, Any]) -> torch.Tensor:
        if expert in self.graphs:
            return self.graphs[expert](**kw)
        return self.models[expert](**kw)[0]

    def step(self, st: Step, x: torch.Tensor) -> torch.Tensor:
        v = self.forward(st.expert, self.kwargs(st, x))
        if self.cfg == 2:
            v_neg = self.forward(st.expert, self.kwargs(st, x, negative=True))
            v = v_neg + self.family.guidance_scale * (v - v_neg)
        return x + (st.sigma_next - st.sigma) * v

    @torch.no_grad()
    def loop(self) -> tuple[list[float], torch.Tensor]:
        x = self.x0
        marks = [self.timer.mark()]
        for st in self.steps:
            x = self.step(st, x)
            marks.append(self.timer.mark())
        return self.timer.intervals(marks), x

    def first_step_of(self, expert: str) -> Step:
        return next(st for st in self.steps if st.expert == expert)

    @torch.no_grad()
    def calibrate(self) -> dict[str, list[str]]:
        """One forward per expert (its first step, conditional input) with input-amax hooks on the FP8 candidates."""
        self.amax: dict[str, dict[str, torch.Tensor]] = {}
        self.attention_scales: dict[str, dict[str, tuple[float, float, float]]] = {}
        self.max_kv_tokens = 0  # the longest attention call's key count
        for expert, model in self.models.items():
            names = fp8_candidates(model, self.family, include_fallback=self.s.include_fallback)
            with record_input_amax(model, names) as amax, contextlib.ExitStack() as stack:
                attn = (stack.enter_context(record_attention_amax(model))
                        if self.s.fp8_attention != "off" else {})
                model(**self.kwargs(self.first_step_of(expert), self.x0))
                if attn:
                    self.max_kv_tokens = max([self.max_kv_tokens, *recorded_key_lengths(model).values()])
            self.amax[expert] = amax
            if attn:
                self.attention_scales[expert] = attention_scales(model, self.family, attn,
                                                                 include_fallback=self.s.include_fallback)
        sync(self.device)
        self.nonfinite_amax = 0
        for amax in self.amax.values():  # random weights can overflow; never time an all-zero activation
            for name, a in amax.items():
                if not bool(torch.isfinite(a)):
                    amax[name] = torch.ones_like(a)
                    self.nonfinite_amax += 1
        # the layers `to_fp8` swaps (each calibrated candidate), which the peers quantise too
        self.fp8_layer_names = {e: sorted(a) for e, a in self.amax.items()}
        return self.fp8_layer_names

    def to_fp8(self) -> int:
        n = 0
        for expert, model in self.models.items():
            n += len(quantize_(model, StaticFP8Config(self.amax.pop(expert))))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return n

    def to_peer(self, peer: str) -> dict[str, Any]:
        """Free the current models, rebuild BF16 from the seed, and let the peer quantise our FP8 layers."""
        t0 = time.perf_counter()
        self.models.clear()
        self.graphs = {}
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.build_models()
        sync(self.device)
        t1 = time.perf_counter()
        layers = sum(quantize_peer(m, peer, self.fp8_layer_names[e]) for e, m in self.models.items())
        sync(self.device)
        return {"peer": peer_info(peer), "peer_layers": layers,
                "peer_layers_planned": sum(len(v) for v in self.fp8_layer_names.values()),
                "rebuild_wall_s": t1 - t0, "convert_wall_s": time.perf_counter() - t1}

    @torch.no_grad()
    def count_fp8(self) -> dict[str, Any]:
        """One untimed step per expert under `count_fp8_calls`: how many FP8 layers (and attentions) really ran."""
        layers = ran = calls = attn_fp8 = attn_bf16 = 0
        for expert, model in self.models.items():
            with count_fp8_calls(model) as counts, count_fp8_attention_calls(model) as attn:
                self.step(self.first_step_of(expert), self.x0)
            layers += len(fp8_modules(model))
            ran += len(counts)
            calls += sum(counts.values())
            attn_fp8 += sum(c["fp8"] for c in attn.values())
            attn_bf16 += sum(c["bf16"] for c in attn.values())
        sync(self.device)
        out = {"fp8_layers": layers, "fp8_layers_ran": ran, "fp8_calls_counted": calls,
               "count_steps": [self.first_step_of(e).index for e in self.models]}
        if attn_fp8 or attn_bf16:
            out.update(fp8_attention_calls=attn_fp8, fp8_attention_fallback_calls=attn_bf16)
        return out

    @torch.no_grad()
    def first_forward(self) -> torch.Tensor:
        """The first expert's output on the first step (eager, untimed): the quality probe of every side."""
        st = self.steps[0]
        return self.models[st.expert](**self.kwargs(st, self.x0))[0].float().flatten().cpu()

    def _set_fast_path(self, side: Side, out: dict[str, Any]) -> None:
        """The side's fast-path config on every FP8 layer, and fusion once (structural: later sides keep it)."""
        cfg = FastPathConfig(enabled=side.fast, triton_quant=side.triton_quant, fast_accum=side.fast_accum)
        for m in self.models.values():
            set_model_fast_path(m, cfg)
        if side.fuse and not getattr(self, "_fused", False):
            out["fused_layers"] = sum(len(fuse_fp8_projections(m, self.family.fusion_rules))
                                      for m in self.models.values())
            self._fused = True

    def _install_attention(self, side: Side, out: dict[str, Any]) -> None:
        if side.fp8_attention != "off":
            mode = attention_mode_of(self.s, side.fp8_attention)
            out["fp8_attention_mode"] = side.fp8_attention
            out["fp8_attention_layers"] = sum(
                len(install_fp8_attention(self.models[e], sc, min_kv_tokens=mode.min_kv_tokens, kernel=mode.kernel))
                for e, sc in self.attention_scales.items())

    def _probe(self, side: Side, out: dict[str, Any]) -> None:
        """Untimed: the first forward's cosine against BF16's, and on FP8 sides what really ran in FP8."""
        probe = self.first_forward()
        if side.precision == "bf16" and self.reference_output is None:
            self.reference_output = probe
        elif self.reference_output is not None:
            out["first_forward_cosine_vs_bf16"] = float(torch.nn.functional.cosine_similarity(
                probe.double(), self.reference_output.double(), dim=0))
        if side.precision == "fp8":
            out.update(self.count_fp8())
            if side.triton_quant and self.device.type == "cuda" and not triton_available():
                out["note"] = "Triton unavailable: torch-op quantisation"

    def _timed_loops(self, side: Side, out: dict[str, Any]) -> tuple[list[list[float]], torch.Tensor]:
        """Compile or capture as the side asks, warm up, then the timed loops; undoes compile/graphs/FP8 attention."""
        s, dev = self.s, self.device
        if s.compile:
            torch._dynamo.reset()
            out["compile"] = sorted({compile_model(m) for m in self.models.values()})
        if side.cuda_graphs:
            pool = torch.cuda.graph_pool_handle()
            self.graphs = {e: CudaGraphForward(m, pool=pool) for e, m in self.models.items()}
        try:
            t0 = time.perf_counter()
            for _ in range(s.warmup):
                self.loop()
            sync(dev)
            out["warmup_wall_s"] = time.perf_counter() - t0
            per_run = []
            x = self.x0
            for _ in range(s.runs):
                steps, x = self.loop()
                per_run.append(steps)
        finally:
            self.graphs = {}
            for m in self.models.values():
                uncompile(m)
                remove_fp8_attention(m)
            if s.compile:
                torch._dynamo.reset()
        return per_run, x

    def _timings(self, per_run: list[list[float]], x: torch.Tensor, out: dict[str, Any]) -> None:
        loops = [sum(r) for r in per_run]
        out["loop_s"] = stats(loops)
        out["step_s_median"] = [statistics.median(r[i] for r in per_run) for i in range(len(self.steps))]
        out["step_s_all"] = per_run
        by_expert = {e: statistics.median(r[st.index] for r in per_run for st in self.steps if st.expert == e)
                     for e in self.experts}
        out["step_s_by_expert"] = by_expert
        out["forward_s_median"] = statistics.median(out["step_s_median"]) / self.cfg
        full = schedule(self.family, self.family.num_steps)
        out["estimated_full_loop_s"] = sum(by_expert.get(st.expert, statistics.median(by_expert.values()))
                                           for st in full)
        out["output_finite"] = bool(torch.isfinite(x).all())

    def measure(self, side: Side) -> dict[str, Any]:
        """One side: levers, memory baseline, quality probe, timed loops, statistics."""
        dev = self.device
        out: dict[str, Any] = {"name": side.name, "precision": side.precision, "levers": side.levers(),
                               "headline": side.headline}
        if side.peer is not None:
            out.update(self.to_peer(side.peer))
        self._set_fast_path(side, out)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            out["allocated_at_start_gb"] = gb(torch.cuda.memory_allocated(dev))
        out["model_bytes"] = sum(model_bytes(m) for m in self.models.values())
        self._install_attention(side, out)
        self._probe(side, out)
        per_run, x = self._timed_loops(side, out)
        self._timings(per_run, x, out)
        if side.fp8_attention != "off" and dev.type == "cuda":
            out["fp8_attention_kernel"] = attention_mode_of(self.s, side.fp8_attention).kernel
            out["fp8_attention_kernel_choices"] = {k: v for m in self.models.values()
                                                   for k, v in kernel_choices(m).items()}
        if dev.type == "cuda":
            out["peak_memory_gb"] = gb(torch.cuda.max_memory_allocated(dev))
            out["peak_reserved_gb"] = gb(torch.cuda.max_memory_reserved(dev))
        else:
            out["peak_memory_gb"] = None
        return out


def _measure_side(run: SyntheticRun, side: Side, plan: list[Side]) -> dict[str, Any]:
    try:
        return run.measure(side)
    except Exception as e:  # noqa: BLE001 - one side failing (graph capture, OOM) must not lose the others
        if run.device.type != "cuda" or len(plan) == 2:
            raise
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return {"name": side.name, "precision": side.precision, "levers": side.levers(),
                "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]}


def run_synthetic(family: Family, s: BenchSettings, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Time the synthetic loop: BF16, then each FP8 side (the models are converted in place once)."""
    t0 = time.perf_counter()
    run = SyntheticRun(family, s)
    sync(run.device)
    report = report_head(family, s, run.device, run.steps, run.cfg)
    report["build_wall_s"] = time.perf_counter() - t0
    candidates = run.calibrate()
    report["quantized_linears_planned"] = sum(len(v) for v in candidates.values())
    report["nonfinite_amax"] = run.nonfinite_amax
    threshold = attention_mode_of(s, "auto").threshold
    if s.fp8_attention == "auto" and run.max_kv_tokens < threshold:
        report["fp8_attention_skipped"] = (f"auto: the longest attention call has {run.max_kv_tokens} keys, under "
                                           f"{threshold}: FP8 attention would not run")
        log(report["fp8_attention_skipped"])
        s = replace(s, fp8_attention="off")
    plan = plan_sides(s)
    sides: list[dict[str, Any]] = []
    for side in plan:
        if side.precision == "fp8" and "quantized_linears" not in report:
            t0 = time.perf_counter()
            report["quantized_linears"] = run.to_fp8()
            sync(run.device)
            report["convert_wall_s"] = time.perf_counter() - t0
        log(f"measuring {side.name} ...")
        sides.append(_measure_side(run, side, plan))
        log(f"  {side.name}: " + (f"{sides[-1]['loop_s']['median']:.3f} s" if "loop_s" in sides[-1]
                                  else sides[-1]["error"]))
    return finish(report, sides, s)
