"""Time BF16 against FP8 denoising in one process: same inputs, same compile setting, same GPU.

A *denoising loop* is `steps` transformer forwards with the family's inputs, fed back through an Euler update:
FLUX.1 and FLUX.2 (guidance-distilled) run one forward per step; Wan2.2 runs two (classifier-free guidance), and
A14B sends steps whose timestep is at or above the boundary to `transformer` (high noise) and the others to
`transformer_2` (low noise). Both experts are FP8 on the FP8 side.

Two sources of models:

- `synthetic="full"|"tiny"`: the family's real transformer class with random weights (timing needs no real
  weights; `tiny` runs on a CPU in seconds). The FP8 side is made in-process: every nn.Linear that
  `family.skip_in_calibration` keeps and whose K, N are multiples of 16 becomes `FP8Linear.quantize(linear, amax)`
  with input amaxes from one calibration forward per expert, taken with hooks before any timing.
- a real pipeline (`model_path`, optional `fp8_path`): `pipelines.load_pipeline`, step boundaries from
  `callback_on_step_end`; the FP8 transformer(s) come from an FP8 checkpoint folder, or are quantised in-process.

BF16 is measured first; then the model is converted to FP8 *in place*, layer by layer, each BF16 weight freed as its
FP8 copy is made, so models whose BF16 and FP8 copies do not fit together (FLUX.2 and Wan2.2 on an 80 GB card)
are measured the same way as the rest. Each side: warm-up loops (compilation and graph capture happen there),
then timed loops; the median loop time with min/max and quartiles, per-step medians, peak GPU memory
(`torch.cuda.max_memory_allocated`, reset between sides), and on FP8 sides the FP8 layers that actually ran
(`count_fp8_calls` over one untimed step per expert). GPU times come from CUDA events; CPU times from
`time.perf_counter` (CPU work is synchronous, so no synchronisation is needed there).
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import __version__, fastpath, fp8attention
from .checkpoint import write_json_atomic
from .errors import Fp8CookbookError
from .families import Family, build_transformer, get_family
from .fp8linear import FP8Linear, count_fp8_calls, fp8_modules

SCHEMA = "fp8cookbook.bench/1"

# Classifier-free guidance: Wan2.2 runs a conditional and an unconditional forward per step (guidance_scale > 1);
# FLUX.1-dev and FLUX.2-dev are guidance-distilled (the scale is an input of one forward).
FORWARDS_PER_STEP = {"wan22-a14b": 2, "wan22-ti2v-5b": 2}
# Flow-matching shift of the shipped schedulers; only decides which A14B expert a step uses (and the timesteps).
FLOW_SHIFT = {"wan22-a14b": 3.0, "wan22-ti2v-5b": 5.0}
_TINY_DEFAULTS = dict(height=64, width=64, num_frames=5, steps=3, runs=2, warmup=1, text_len=8)


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class BenchSettings:
    """Everything that decides what is timed; unset sizes take the family's (full) or the tiny defaults."""

    family: str
    synthetic: str | None = None  # "full" | "tiny" | None (real pipeline)
    model_path: str | None = None  # BF16 diffusers pipeline (folder or hub id); None with synthetic
    fp8_path: str | None = None  # FP8 checkpoint folder for the pipeline mode; None: quantise in-process
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    steps: int | None = None
    runs: int | None = None
    warmup: int | None = None
    text_len: int | None = None
    compile: bool = False
    cuda_graphs: bool = False
    fast: bool | None = None  # None: the process default (on unless FP8COOKBOOK_PLAIN=1)
    levers: bool = False  # time each fast-path lever as its own FP8 side
    include_fallback: bool = False  # synthetic: also quantise the family's BF16-fallback layers (not SGLang's profile)
    attention_backend: str | None = None  # diffusers attention backend for both sides (e.g. "_native_cudnn")
    # FP8 attention (static Q/K/V scales) on top of the FP8 side: "auto" (calls with >= MIN_KV_TOKENS keys, on a CUDA
    # kernel: the default, as in the loader), "on" (every call) or "off"
    fp8_attention: str = "auto"
    device: str | None = None
    seed: int = 0
    batch: int = 1


def _positive(name: str, value: Any, minimum: int = 1) -> int:
    try:
        out = int(value)
        if out != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise Fp8CookbookError(f"{name} must be an integer, got {value!r}") from None
    if out < minimum:
        raise Fp8CookbookError(f"{name} must be >= {minimum}, got {out}")
    return out


def resolve_settings(s: BenchSettings) -> tuple[Family, BenchSettings]:
    """Validate and fill in defaults; every problem is an Fp8CookbookError (one line in the CLI)."""
    family = get_family(s.family)
    s = BenchSettings(**asdict(s))
    s.family = family.name
    if s.synthetic not in (None, "full", "tiny"):
        raise Fp8CookbookError(f"--synthetic must be 'full' or 'tiny', got {s.synthetic!r}")
    if s.fp8_path is not None and s.model_path is None:
        raise Fp8CookbookError("--fp8 needs --model-path (the BF16 pipeline it replaces the transformer of)")
    if s.synthetic is None and s.model_path is None:
        raise Fp8CookbookError("say what to time: --synthetic full|tiny (random weights) or --model-path PIPELINE")
    if s.synthetic is not None and (s.model_path or s.fp8_path):
        raise Fp8CookbookError("--synthetic times random weights; it takes no --model-path/--fp8")
    tiny = s.synthetic == "tiny"
    defaults = dict(_TINY_DEFAULTS) if tiny else dict(height=family.height, width=family.width,
                                                      num_frames=family.num_frames, steps=family.num_steps,
                                                      runs=3, warmup=1, text_len=family.text_len)
    for key, minimum in (("height", 16), ("width", 16), ("steps", 1), ("runs", 1), ("warmup", 0),
                         ("text_len", 1), ("num_frames", 1), ("batch", 1)):
        value = getattr(s, key)
        flag = "--" + {"num_frames": "frames", "text_len": "text-len"}.get(key, key)
        if value is None:
            value = defaults.get(key)
        if key == "num_frames" and not family.is_video:
            if getattr(s, key) is not None:
                raise Fp8CookbookError(f"--frames is for video families; {family.title} makes images")
            value = None
        if value is not None:
            value = _positive(flag, value, minimum)
        setattr(s, key, value)
    multiple = 32 if family.name == "wan22-ti2v-5b" else 16
    for key in ("height", "width"):
        if getattr(s, key) % multiple:
            raise Fp8CookbookError(f"--{key} must be a multiple of {multiple} for {family.title}, got {getattr(s, key)}")
    if family.is_video and (s.num_frames - 1) % 4:
        raise Fp8CookbookError(f"--frames must be 4k+1 for {family.title} (the VAE packs 4 frames), got {s.num_frames}")
    if s.device is None:
        s.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(s.device)
    except (RuntimeError, ValueError):
        raise Fp8CookbookError(f"--device: not a torch device: {s.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Fp8CookbookError(f"--device {s.device}: CUDA is not available on this machine")
    if s.cuda_graphs and device.type != "cuda":
        raise Fp8CookbookError("--cuda-graphs needs a CUDA device")
    if s.include_fallback and s.synthetic is None:
        raise Fp8CookbookError("--include-fallback is for --synthetic (a checkpoint decides its own FP8 layers)")
    s.fp8_attention = fp8attention.attention_mode(s.fp8_attention)
    if s.fp8_attention == "on" and s.synthetic is None and s.fp8_path is None:
        raise Fp8CookbookError("--fp8-attention on with a pipeline needs --fp8 CHECKPOINT with Q/K/V scales "
                               "(quantize with --quantize-mha); --synthetic calibrates its own")
    if s.fp8_attention == "auto" and (device.type != "cuda" or (s.synthetic is None and s.fp8_path is None)):
        s.fp8_attention = "off"  # nothing would change: the auto rule needs a CUDA kernel (and scales)
    if s.cuda_graphs and s.synthetic is None:
        raise Fp8CookbookError("--cuda-graphs is for the synthetic benchmark (a pipeline's loop is not captured)")
    if s.fast is None:
        s.fast = fastpath.CONFIG.enabled
    return family, s


# ------------------------------------------------------------------------------------------------ helpers
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
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   compute_capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   cuda=torch.version.cuda, sm_count=props.multi_processor_count)
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


class _Timer:
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


def _stats(values: list[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    q1, q3 = (statistics.quantiles(values, n=4, method="inclusive")[::2] if len(values) > 1
              else (values[0], values[0]))
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q1, "q3": q3,
            "mean": statistics.fmean(values), "n": len(values), "all": values}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gb(n: float | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def _model_bytes(model: nn.Module) -> int:
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
    shift = FLOW_SHIFT.get(family.name, 1.0)
    sig = [shift * s / (1 + (shift - 1) * s) for s in (1 - i / steps for i in range(steps))] + [0.0]
    two = len(family.experts) > 1 and family.boundary_ratio is not None
    out = []
    for i in range(steps):
        t = sig[i] * 1000
        expert = family.experts[0] if not two or t >= family.boundary_ratio * 1000 else family.experts[1]
        out.append(Step(i, sig[i], sig[i + 1], t, expert))
    return out


# ---------------------------------------------------------------------------------------- synthetic models
@torch.no_grad()
def fp8_candidates(model: nn.Module, family: Family, *, include_fallback: bool = False) -> list[str]:
    """Linear layers the FP8 side quantises: not skipped by the family's calibration filter, K and N % 16 == 0.

    `include_fallback` quantises the converter's BF16-fallback layers too (only the sensitive filter applies), to
    compare with measurements that put every block Linear in FP8; checkpoints made by the converter never do that.
    """
    config = dict(model.config) if hasattr(model, "config") else {}

    def skipped(name: str) -> bool:
        if include_fallback:
            return any(rule.matches(name) for rule in family.sensitive(config))
        return family.skip_in_calibration(name, config)

    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and not skipped(name) and m.in_features % 16 == 0 and m.out_features % 16 == 0]


@contextlib.contextmanager
def record_input_amax(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward pre-hooks that keep the running max |input| of each named layer (on its device, no sync)."""
    amax: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(mod, args, name=name):
            a = args[0].detach().abs().amax().float()
            amax[name] = a if name not in amax else torch.maximum(amax[name], a)
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        yield amax
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def attention_scales(model: nn.Module, family: Family, amax: dict[str, dict[str, torch.Tensor]], *,
                     include_fallback: bool = False) -> dict[str, tuple[float, float, float]]:
    """Q/K/V scales from `record_attention_amax` for the modules a `--quantize-mha` checkpoint has them for.

    ModelOpt disables the attention quantizers of the blocks the family keeps in BF16 (Wan2.2's edge blocks), so
    those keep BF16 attention; `include_fallback` gives them FP8 attention too. A non-finite amax (random weights can
    overflow) becomes 1, as for the linear layers.
    """
    config = dict(model.config)
    return fp8attention.scales_from_amax(
        {n: {k: (v if bool(torch.isfinite(v)) else torch.ones_like(v)) for k, v in a.items()}
         for n, a in amax.items() if include_fallback or not family.skip_in_calibration(n, config)})


def quantize_in_place(model: nn.Module, amax: dict[str, torch.Tensor]) -> list[str]:
    """Replace each calibrated nn.Linear by `FP8Linear.quantize`, freeing its BF16 weight as soon as it is copied."""
    done = []
    for name in sorted(amax):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            continue
        setattr(parent, child, FP8Linear.quantize(linear, amax[name].clamp_min(1e-12)))
        del linear  # the last reference: the caching allocator reuses its memory for the next layer
        done.append(name)
    return done


# ------------------------------------------------------------------------------------------- side control
@dataclass
class Side:
    """One measured configuration."""

    name: str
    precision: str  # "bf16" | "fp8"
    fast: bool = False
    triton_quant: bool = False
    fast_accum: bool = False
    fuse: bool = False
    cuda_graphs: bool = False
    fp8_attention: str = "off"  # "auto" | "on" | "off", as BenchSettings.fp8_attention
    headline: bool = False  # the FP8 side the report's `speedup` is about

    def levers(self) -> dict[str, bool]:
        return {"fast": self.fast, "triton_quant": self.triton_quant, "fast_accum": self.fast_accum,
                "fused": self.fuse, "cuda_graphs": self.cuda_graphs, "fp8_attention": self.fp8_attention != "off"}


def plan_sides(s: BenchSettings) -> list[Side]:
    """The sides to measure, BF16 first (FP8 is made from it in place), structural changes (fusion) last.

    The FP8 headline side is the fast path as shipped: one-pass quantisation and fast accumulation always, fused
    projections only under torch.compile, where they pay (in eager mode the strided Q/K/V views they produce cost
    more copies than the fused GEMM saves; docs/benchmarks.md has the numbers). `--plain` makes it the plain path.
    """
    sides = _plan_gemm_sides(s)
    if s.fp8_attention != "off":  # the most complete FP8 side again, with FP8 attention on top: the headline
        last = sides[-1]
        sides.append(replace(last, name=f"{last.name}+fp8-attention", fp8_attention=s.fp8_attention, headline=True))
        for side in sides[:-1]:
            side.headline = False
    return sides


def _plan_gemm_sides(s: BenchSettings) -> list[Side]:
    g, c = s.cuda_graphs, s.compile
    if not s.levers:
        fp8 = (Side("fp8", "fp8", fast=True, triton_quant=True, fast_accum=True, fuse=c, cuda_graphs=g, headline=True)
               if s.fast else Side("fp8", "fp8", cuda_graphs=g, headline=True))
        return [Side("bf16", "bf16", cuda_graphs=g), fp8]
    sides = [Side("bf16", "bf16")]
    if g:
        sides.append(Side("bf16+graphs", "bf16", cuda_graphs=True))
    sides.append(Side("fp8-plain", "fp8", headline=not s.fast and not g))
    if g and not s.fast:
        sides.append(Side("fp8-plain+graphs", "fp8", cuda_graphs=True, headline=True))
    if not c:  # under torch.compile, Inductor fuses the quantisation itself: no Triton-kernel side
        sides.append(Side("fp8+triton-quant", "fp8", fast=True, triton_quant=True))
    accum = dict(fast=True, triton_quant=True, fast_accum=True)
    sides.append(Side("fp8+fast-accum", "fp8", **accum, headline=s.fast and not c and not g))
    if g and not c:
        sides.append(Side("fp8+fast-accum+graphs", "fp8", **accum, cuda_graphs=True, headline=s.fast))
    sides.append(Side("fp8+fused", "fp8", **accum, fuse=True, headline=s.fast and c and not g))
    if g and c:
        sides.append(Side("fp8+fused+graphs", "fp8", **accum, fuse=True, cuda_graphs=True, headline=s.fast))
    return sides


def set_attention_backend(model: nn.Module, backend: str | None) -> None:
    """diffusers' attention backend for every attention module (None keeps the default, torch SDPA)."""
    if backend is None:
        return
    try:
        model.set_attention_backend(backend)
    except (ValueError, RuntimeError, ImportError, AttributeError) as e:
        raise Fp8CookbookError(f"--attention-backend {backend}: {str(e).splitlines()[0]}") from None


def _compile_model(model: nn.Module) -> str:
    if getattr(model, "_repeated_blocks", None) and hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks(fullgraph=True)
        return "compile_repeated_blocks(fullgraph=True)"
    model.compile()
    return "torch.compile(transformer)"


def _uncompile(model: nn.Module) -> None:
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None


# ---------------------------------------------------------------------------------------- synthetic bench
class _SyntheticRun:
    """Models, inputs and the loop for one synthetic benchmark."""

    def __init__(self, family: Family, s: BenchSettings):
        self.family, self.s = family, s
        self.device = torch.device(s.device)
        self.timer = _Timer(self.device)
        self.steps = schedule(family, s.steps)
        self.experts = list(dict.fromkeys(st.expert for st in self.steps))
        self.cfg = FORWARDS_PER_STEP.get(family.name, 1)
        self.models: dict[str, nn.Module] = {}
        for i, name in enumerate(self.experts):
            if s.synthetic == "full":
                self.models[name] = build_transformer(family, "full", seed=s.seed + i, device=self.device)
            else:
                self.models[name] = build_transformer(family, "tiny", seed=s.seed + i, device=self.device)
            set_attention_backend(self.models[name], s.attention_backend)
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
        self.graphs: dict[str, fastpath.CudaGraphForward] = {}
        self.reference_output: torch.Tensor | None = None  # the BF16 side's first forward, the quality reference

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
                attn = (stack.enter_context(fp8attention.record_attention_amax(model))
                        if self.s.fp8_attention != "off" else {})
                model(**self.kwargs(self.first_step_of(expert), self.x0))
                if attn:
                    self.max_kv_tokens = max([self.max_kv_tokens, *fp8attention.recorded_key_lengths(model).values()])
            self.amax[expert] = amax
            if attn:
                self.attention_scales[expert] = attention_scales(model, self.family, attn,
                                                                 include_fallback=self.s.include_fallback)
        _sync(self.device)
        self.nonfinite_amax = 0
        for amax in self.amax.values():  # random weights can overflow; never time an all-zero activation
            for name, a in amax.items():
                if not bool(torch.isfinite(a)):
                    amax[name] = torch.ones_like(a)
                    self.nonfinite_amax += 1
        return {e: sorted(a) for e, a in self.amax.items()}

    def to_fp8(self) -> int:
        n = 0
        for expert, model in self.models.items():
            n += len(quantize_in_place(model, self.amax.pop(expert)))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return n

    @torch.no_grad()
    def count_fp8(self) -> dict[str, Any]:
        """One untimed step per expert under `count_fp8_calls`: how many FP8 layers (and attentions) really ran."""
        layers = ran = calls = attn_fp8 = attn_bf16 = 0
        for expert, model in self.models.items():
            with count_fp8_calls(model) as counts, fp8attention.count_fp8_attention_calls(model) as attn:
                self.step(self.first_step_of(expert), self.x0)
            layers += len(fp8_modules(model))
            ran += len(counts)
            calls += sum(counts.values())
            attn_fp8 += sum(c["fp8"] for c in attn.values())
            attn_bf16 += sum(c["bf16"] for c in attn.values())
        _sync(self.device)
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

    def measure(self, side: Side) -> dict[str, Any]:
        s, dev = self.s, self.device
        out: dict[str, Any] = {"name": side.name, "precision": side.precision, "levers": side.levers(),
                               "headline": side.headline}
        fastpath.set_fast_path(side.fast, triton_quant=side.triton_quant, fast_accum=side.fast_accum)
        if side.fuse and not getattr(self, "_fused", False):
            out["fused_layers"] = sum(len(fastpath.fuse_fp8_projections(m)) for m in self.models.values())
            self._fused = True
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            out["allocated_at_start_gb"] = _gb(torch.cuda.memory_allocated(dev))
        out["model_bytes"] = sum(_model_bytes(m) for m in self.models.values())
        if side.fp8_attention != "off":
            minimum = fp8attention.min_kv_tokens(side.fp8_attention)
            out["fp8_attention_mode"] = side.fp8_attention
            out["fp8_attention_layers"] = sum(
                len(fp8attention.install_fp8_attention(self.models[e], sc, min_kv_tokens=minimum))
                for e, sc in self.attention_scales.items())
        probe = self.first_forward()
        if side.precision == "bf16" and self.reference_output is None:
            self.reference_output = probe
        elif self.reference_output is not None:
            out["first_forward_cosine_vs_bf16"] = float(torch.nn.functional.cosine_similarity(
                probe.double(), self.reference_output.double(), dim=0))
        if side.precision == "fp8":
            out.update(self.count_fp8())
            if side.triton_quant and dev.type == "cuda" and not fastpath.triton_available():
                out["note"] = "Triton unavailable: torch-op quantisation"
        if s.compile:
            torch._dynamo.reset()
            out["compile"] = sorted({_compile_model(m) for m in self.models.values()})
        if side.cuda_graphs:
            pool = torch.cuda.graph_pool_handle()
            self.graphs = {e: fastpath.CudaGraphForward(m, pool=pool) for e, m in self.models.items()}
        try:
            t0 = time.perf_counter()
            for _ in range(s.warmup):
                self.loop()
            _sync(dev)
            out["warmup_wall_s"] = time.perf_counter() - t0
            per_run = []
            x = self.x0
            for _ in range(s.runs):
                steps, x = self.loop()
                per_run.append(steps)
        finally:
            self.graphs = {}
            for m in self.models.values():
                _uncompile(m)
                fp8attention.remove_fp8_attention(m)
            if s.compile:
                torch._dynamo.reset()
        loops = [sum(r) for r in per_run]
        out["loop_s"] = _stats(loops)
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
        if side.fp8_attention != "off" and dev.type == "cuda":
            out["fp8_attention_kernel"] = fp8attention.KERNEL
            out["fp8_attention_kernel_choices"] = fp8attention.kernel_choices()
        if dev.type == "cuda":
            out["peak_memory_gb"] = _gb(torch.cuda.max_memory_allocated(dev))
            out["peak_reserved_gb"] = _gb(torch.cuda.max_memory_reserved(dev))
        else:
            out["peak_memory_gb"] = None
        return out


def run_synthetic(family: Family, s: BenchSettings, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    old = fastpath.set_fast_path()
    try:
        t0 = time.perf_counter()
        run = _SyntheticRun(family, s)
        _sync(run.device)
        report = _report_head(family, s, run.device, run.steps, run.cfg)
        report["build_wall_s"] = time.perf_counter() - t0
        candidates = run.calibrate()
        report["quantized_linears_planned"] = sum(len(v) for v in candidates.values())
        report["nonfinite_amax"] = run.nonfinite_amax
        sides: list[dict[str, Any]] = []
        if s.fp8_attention == "auto" and run.max_kv_tokens < fp8attention.MIN_KV_TOKENS:
            report["fp8_attention_skipped"] = (f"auto: the longest attention call has {run.max_kv_tokens} keys, under "
                                               f"{fp8attention.MIN_KV_TOKENS}: FP8 attention would not run")
            log(report["fp8_attention_skipped"])
            s = replace(s, fp8_attention="off")
        plan = plan_sides(s)
        for side in plan:
            if side.precision == "fp8" and "quantized_linears" not in report:
                t0 = time.perf_counter()
                report["quantized_linears"] = run.to_fp8()
                _sync(run.device)
                report["convert_wall_s"] = time.perf_counter() - t0
            log(f"measuring {side.name} ...")
            try:
                sides.append(run.measure(side))
            except Exception as e:  # noqa: BLE001 - one side failing (graph capture, OOM) must not lose the others
                if run.device.type != "cuda" or len(plan) == 2:
                    raise
                sides.append({"name": side.name, "precision": side.precision, "levers": side.levers(),
                              "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]})
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            log(f"  {side.name}: " + (f"{sides[-1]['loop_s']['median']:.3f} s" if "loop_s" in sides[-1]
                                      else sides[-1]["error"]))
        return _finish(report, sides, s)
    finally:
        fastpath.restore_fast_path(old)


# ----------------------------------------------------------------------------------------- pipeline bench
def _fp8_folder_for(fp8_path: Path, component: str, single: bool) -> Path:
    if (fp8_path / "config.json").is_file() and single:
        return fp8_path
    sub = fp8_path / component
    if (sub / "config.json").is_file():
        return sub
    raise Fp8CookbookError(f"{fp8_path}: no FP8 checkpoint for {component} (expected {sub}/config.json"
                           + (" or config.json in the folder itself)" if single else ")"))


def run_pipeline(family: Family, s: BenchSettings, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Time a real pipeline's denoising loop, BF16 then FP8 (checkpoint folder or in-process quantisation)."""
    from .pipelines import generation_kwargs, load_pipeline, transformer_names

    device = torch.device(s.device)
    timer = _Timer(device)
    pipe = load_pipeline(family.name, s.model_path, device=device)
    names = transformer_names(pipe)
    for n in names:
        set_attention_backend(getattr(pipe, n), s.attention_backend)
    kw = generation_kwargs(family, pipe, height=s.height, width=s.width, num_frames=s.num_frames,
                           num_inference_steps=s.steps, output_type="latent")
    report = _report_head(family, s, device, schedule(family, s.steps), FORWARDS_PER_STEP.get(family.name, 1))
    report["components"] = names

    def one_call(count: bool = False) -> tuple[list[float], dict[str, int]]:
        marks: list = []

        def first_forward(mod, args, kwargs):
            if not marks:
                marks.append(timer.mark())

        def on_step_end(p, i, t, callback_kwargs):
            marks.append(timer.mark())
            return callback_kwargs

        handles = [getattr(pipe, n).register_forward_pre_hook(first_forward, with_kwargs=True) for n in names]
        per_component: list[tuple[str, dict[str, int]]] = []
        try:
            with contextlib.ExitStack() as stack:
                if count:
                    per_component = [(n, stack.enter_context(count_fp8_calls(getattr(pipe, n)))) for n in names]
                with torch.no_grad():
                    pipe(**dict(kw, generator=torch.Generator("cpu").manual_seed(s.seed)),
                         callback_on_step_end=on_step_end)
        finally:
            for h in handles:
                h.remove()
        counts = {f"{n}.{k}": v for n, c in per_component for k, v in c.items()}
        return timer.intervals(marks), counts

    def measure(name: str, precision: str) -> dict[str, Any]:
        out: dict[str, Any] = {"name": name, "precision": precision, "headline": precision == "fp8",
                               "levers": {"fast": bool(s.fast and precision == "fp8"),
                                          "fused": bool(s.fast and s.compile and precision == "fp8")}}
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            out["allocated_at_start_gb"] = _gb(torch.cuda.memory_allocated(device))
        out["model_bytes"] = sum(_model_bytes(getattr(pipe, n)) for n in names)
        if precision == "fp8":
            _, counts = one_call(count=True)
            out["fp8_layers"] = sum(len(fp8_modules(getattr(pipe, n))) for n in names)
            out["fp8_layers_ran"] = len(counts)
            out["fp8_calls_counted"] = sum(counts.values())
        if s.compile:
            torch._dynamo.reset()
            out["compile"] = sorted({_compile_model(getattr(pipe, n)) for n in names})
        try:
            for _ in range(s.warmup):
                one_call()
            per_run = [one_call()[0] for _ in range(s.runs)]
        finally:
            for n in names:
                _uncompile(getattr(pipe, n))
            if s.compile:
                torch._dynamo.reset()
        out["loop_s"] = _stats([sum(r) for r in per_run])
        out["step_s_median"] = [statistics.median(r[i] for r in per_run) for i in range(len(per_run[0]))]
        out["step_s_all"] = per_run
        out["peak_memory_gb"] = _gb(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        return out

    old = fastpath.set_fast_path(False)
    try:
        sides = [measure("bf16", "bf16")]
        if s.fp8_path:
            from .loader import apply_attention_mode, load_fp8_transformer

            for n in names:
                setattr(pipe, n, None)  # free the BF16 weights before the FP8 ones arrive
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                folder = _fp8_folder_for(Path(s.fp8_path), n, len(names) == 1)
                model, _ = load_fp8_transformer(folder, device=device, fp8_attention="off")
                set_attention_backend(model, s.attention_backend)
                layers = apply_attention_mode(model, folder, s.fp8_attention)  # after the backend is set
                if layers:
                    report.setdefault("fp8_attention_layers", {})[n] = layers
                setattr(pipe, n, model)
            report["fp8_source"] = f"checkpoint {s.fp8_path}"
        else:
            amax: dict[str, dict[str, torch.Tensor]] = {}
            with contextlib.ExitStack() as stack:
                for n in names:
                    amax[n] = stack.enter_context(record_input_amax(getattr(pipe, n), fp8_candidates(getattr(pipe, n), family)))
                with torch.no_grad():
                    pipe(**dict(kw, generator=torch.Generator("cpu").manual_seed(s.seed)))
            report["quantized_linears"] = sum(len(quantize_in_place(getattr(pipe, n), amax[n])) for n in names)
            report["fp8_source"] = "in-process quantisation (one calibration call of the pipeline)"
        fastpath.set_fast_path(s.fast)
        if s.fast and s.compile:
            report["fused_layers"] = sum(len(fastpath.fuse_fp8_projections(getattr(pipe, n))) for n in names)
        sides.append(measure("fp8", "fp8"))
    finally:
        fastpath.restore_fast_path(old)
    return _finish(report, sides, s)


# ----------------------------------------------------------------------------------------------- reports
def _report_head(family: Family, s: BenchSettings, device: torch.device, steps: list[Step], cfg: int) -> dict:
    settings = asdict(s)
    settings["forwards_per_step"] = cfg
    settings["fp8_made"] = ("in place after the BF16 measurement (each BF16 Linear freed as its FP8 copy is made)"
                            if not s.fp8_path else "loaded from the FP8 checkpoint after freeing the BF16 transformer")
    return {
        "schema": SCHEMA,
        "family": family.name,
        "title": family.title,
        "mode": "synthetic" if s.synthetic else "pipeline",
        "synthetic": s.synthetic,
        "synthetic_note": ("random weights of the real transformer class; FP8 made in-process from one calibration "
                           "forward per expert" if s.synthetic else None),
        "settings": settings,
        "environment": environment(device),
        "schedule": [{"step": st.index, "timestep": round(st.timestep, 2), "expert": st.expert} for st in steps],
        "full_schedule_steps": family.num_steps,
    }


def _finish(report: dict[str, Any], sides: list[dict[str, Any]], s: BenchSettings) -> dict[str, Any]:
    def base_for(side: dict[str, Any]) -> dict[str, Any] | None:
        graphs = side["levers"].get("cuda_graphs", False)
        return next((b for b in sides if b["precision"] == "bf16" and b["levers"].get("cuda_graphs", False) == graphs),
                    None)

    failed = [x for x in sides if "error" in x]
    sides_ok = [x for x in sides if "error" not in x]
    report["failed_sides"] = failed
    sides = sides_ok
    for side in sides:
        base = base_for(side)
        if base is not None:
            side["speedup_vs_bf16"] = base["loop_s"]["median"] / side["loop_s"]["median"]
            if side.get("peak_memory_gb") and base.get("peak_memory_gb"):
                side["peak_memory_vs_bf16"] = side["peak_memory_gb"] / base["peak_memory_gb"]
    report["sides"] = sides + failed
    bf16 = next(x for x in sides if x["precision"] == "bf16" and x["levers"].get("cuda_graphs", False) == s.cuda_graphs)
    fp8 = next((x for x in sides if x.get("headline")), None) or \
        [x for x in sides if x["precision"] == "fp8" and x["levers"].get("cuda_graphs", False) == s.cuda_graphs][-1]
    report["bf16"], report["fp8"] = bf16["name"], fp8["name"]
    report["speedup"] = bf16["loop_s"]["median"] / fp8["loop_s"]["median"]
    report["peak_memory_ratio"] = (fp8["peak_memory_gb"] / bf16["peak_memory_gb"]
                                   if fp8.get("peak_memory_gb") and bf16.get("peak_memory_gb") else None)
    report["fp8_layers"] = fp8.get("fp8_layers")
    report["fp8_layers_ran"] = fp8.get("fp8_layers_ran")
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    s, env = report["settings"], report["environment"]
    size = f"{s['width']}x{s['height']}" + (f"x{s['num_frames']}f" if s.get("num_frames") else "")
    where = env.get("gpu") or f"CPU ({env.get('cpu')})"
    what = f"synthetic {report['synthetic']}" if report["synthetic"] else f"pipeline {s['model_path']}"
    lines = [f"{report['title']} {what}, {size}, {s['steps']} steps x {s['forwards_per_step']} forward(s), "
             f"{'compiled' if s['compile'] else 'eager'}{', CUDA graphs' if s['cuda_graphs'] else ''}"
             f"{', attention ' + s['attention_backend'] if s.get('attention_backend') else ''}"
             f"{', fallback layers in FP8' if s.get('include_fallback') else ''}, "
             f"{s['runs']} runs after {s['warmup']} warm-up, on {where}",
             f"  {'side':30s} {'loop median':>11s} {'[min, max]':>19s} {'step':>8s} {'peak GB':>8s} "
             f"{'FP8 ran':>9s} {'speedup':>8s} {'cos vs BF16':>11s}"]
    for side in report["sides"]:
        if "error" in side:
            lines.append(f"  {side['name']:30s} failed: {side['error']}")
            continue
        loop = side["loop_s"]
        peak = "-" if side.get("peak_memory_gb") is None else f"{side['peak_memory_gb']:.1f}"
        ran = f"{side['fp8_layers_ran']}/{side['fp8_layers']}" if "fp8_layers" in side else "-"
        speed = f"{side['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in side else "-"
        cos = f"{side['first_forward_cosine_vs_bf16']:.6f}" if "first_forward_cosine_vs_bf16" in side else "-"
        lines.append(f"  {side['name']:30s} {loop['median']:10.3f}s [{loop['min']:8.3f}, {loop['max']:8.3f}] "
                     f"{statistics.median(side['step_s_median']):7.3f}s {peak:>8s} {ran:>9s} {speed:>8s} {cos:>11s}")
    ratio = report.get("peak_memory_ratio")
    lines.append(f"  FP8 ({report['fp8']}) vs BF16 ({report['bf16']}): {report['speedup']:.2f}x"
                 + (f", peak memory {100 * ratio:.0f}% of BF16" if ratio else ""))
    return lines


def run_bench(settings: BenchSettings, *, output: str | Path | None = None,
              log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Run the benchmark the settings describe; write the JSON report atomically when `output` is given."""
    family, s = resolve_settings(settings)
    threads = torch.get_num_threads()
    if s.synthetic == "tiny" and torch.device(s.device).type == "cpu":
        torch.set_num_threads(1)  # tiny matrices: waking a thread pool costs more than the products themselves
    try:
        report = run_synthetic(family, s, log) if s.synthetic else run_pipeline(family, s, log)
    finally:
        torch.set_num_threads(threads)
    if output is not None:
        write_json_atomic(output, report)
    return report


def _log_stderr(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
