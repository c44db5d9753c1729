"""What a benchmark times: its settings (validated once, at the boundary) and the sides it measures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ..errors import Fp8CookbookError
from ..families import Family, get_family
from ..fp8.attention_mode import AttentionMode
from ..fp8.linear import FastPathConfig
from .peers import check_peers, parse_peers

SCHEMA = "fp8cookbook.bench/1"
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
    # pipeline mode: denoising steps of each untimed call (warm-up, the FP8 call count, in-process calibration);
    # None: --steps. A short warm-up warms the same kernels as a full one; it must reach every expert (A14B: >= 2)
    warmup_steps: int | None = None
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
    fp8_attention_threshold: int | None = None  # "auto"'s key count; None: attention_mode.MIN_KV_TOKENS
    # other FP8 libraries timed on the same layers, each from a fresh BF16 build after our sides (bench/peers.py)
    peers: tuple[str, ...] = ()
    # pipeline mode, two-expert families (Wan2.2 A14B): only the running expert on the GPU, the other on the CPU, on
    # both sides (offload.one_expert_resident): what an 80 GB card needs for BF16; the transfers are in the times
    one_expert_resident: bool = False
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
    tiny_pipeline = s.synthetic is None and s.model_path is None and s.fp8_path is not None
    if tiny_pipeline:  # as quantize and compare: no --model-path is the tiny test pipeline, at its small settings
        from ..pipelines import tiny_pipeline_dir

        s.model_path = str(tiny_pipeline_dir(family.name))
    if s.synthetic is None and s.model_path is None:
        raise Fp8CookbookError("say what to time: --synthetic full|tiny (random weights) or --model-path PIPELINE")
    if s.synthetic is not None and (s.model_path or s.fp8_path):
        raise Fp8CookbookError("--synthetic times random weights; it takes no --model-path/--fp8")
    tiny = s.synthetic == "tiny"
    defaults = dict(_TINY_DEFAULTS) if tiny else dict(height=family.height, width=family.width,
                                                      num_frames=family.num_frames, steps=family.num_steps,
                                                      runs=3, warmup=1, text_len=family.text_len)
    if tiny_pipeline:
        t = family.tiny_settings
        defaults.update(height=t.height, width=t.width, num_frames=t.num_frames, steps=t.num_inference_steps, runs=2,
                        text_len=_TINY_DEFAULTS["text_len"])
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
    multiple = family.size_multiple
    for key in ("height", "width"):
        if getattr(s, key) % multiple:
            raise Fp8CookbookError(f"--{key} must be a multiple of {multiple} for {family.title}, got {getattr(s, key)}")
    if s.one_expert_resident and (s.synthetic is not None or len(family.experts) < 2):
        why = "has one transformer" if len(family.experts) < 2 else "is synthetic here"
        raise Fp8CookbookError(f"--one-expert-resident is for a pipeline (--model-path) with two experts "
                               f"(Wan2.2 A14B); {family.title} {why}")
    if s.warmup_steps is not None:
        if s.synthetic is not None:
            raise Fp8CookbookError("--warmup-steps is for a pipeline (--model-path); a synthetic warm-up is one loop")
        s.warmup_steps = _positive("--warmup-steps", s.warmup_steps)
        if s.warmup_steps > s.steps:
            raise Fp8CookbookError(f"--warmup-steps ({s.warmup_steps}) must not exceed --steps ({s.steps})")
    if family.is_video and (s.num_frames - 1) % 4:
        raise Fp8CookbookError(f"--frames must be 4k+1 for {family.title} (the VAE packs 4 frames), got {s.num_frames}")
    if s.device is None:
        s.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(s.device)
    except (RuntimeError, ValueError):
        raise Fp8CookbookError(f"--device: not a torch device: {s.device!r}") from None
    from ..params import require_device

    require_device(s.device, "--device")
    if s.cuda_graphs and device.type != "cuda":
        raise Fp8CookbookError("--cuda-graphs needs a CUDA device")
    if s.include_fallback and s.synthetic is None:
        raise Fp8CookbookError("--include-fallback is for --synthetic (a checkpoint decides its own FP8 layers)")
    s.fp8_attention = AttentionMode.parse(s.fp8_attention).mode
    if s.fp8_attention == "on" and s.synthetic is None and s.fp8_path is None:
        raise Fp8CookbookError("--fp8-attention on with a pipeline needs --fp8 CHECKPOINT with Q/K/V scales "
                               "(quantize with --quantize-mha); --synthetic calibrates its own")
    if s.fp8_attention == "auto" and (device.type != "cuda" or (s.synthetic is None and s.fp8_path is None)):
        s.fp8_attention = "off"  # nothing would change: the auto rule needs a CUDA kernel (and scales)
    if s.cuda_graphs and s.synthetic is None:
        raise Fp8CookbookError("--cuda-graphs is for the synthetic benchmark (a pipeline's loop is not captured)")
    s.peers = parse_peers(s.peers)
    if s.peers and s.synthetic is None:
        raise Fp8CookbookError("--peer is for --synthetic (each peer side rebuilds the BF16 weights from the seed)")
    check_peers(s.peers, device)
    if s.fast is None:
        s.fast = FastPathConfig.from_env().enabled
    return family, s


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
    peer: str | None = None  # another library's FP8 (bench/peers.py PEERS); precision "peer", none of our levers

    def levers(self) -> dict[str, bool]:
        return {"fast": self.fast, "triton_quant": self.triton_quant, "fast_accum": self.fast_accum,
                "fused": self.fuse, "cuda_graphs": self.cuda_graphs, "fp8_attention": self.fp8_attention != "off"}


def plan_sides(s: BenchSettings) -> list[Side]:
    """The sides to measure, BF16 first (FP8 is made from it in place), structural changes (fusion), then peers.

    The FP8 headline side is the fast path as shipped: one-pass quantisation and fast accumulation always, fused
    projections only under torch.compile, where they pay (in eager mode the strided Q/K/V views they produce cost
    more copies than the fused GEMM saves; docs/benchmarks.md has the numbers). `--plain` makes it the plain path.
    Peers come last, each on a fresh BF16 build, so adding one leaves our sides measured exactly as without it.
    """
    sides = _plan_gemm_sides(s)
    if s.fp8_attention != "off":  # the most complete FP8 side again, with FP8 attention on top: the headline
        last = sides[-1]
        sides.append(replace(last, name=f"{last.name}+fp8-attention", fp8_attention=s.fp8_attention, headline=True))
        for side in sides[:-1]:
            side.headline = False
    sides += [Side(peer, "peer", cuda_graphs=s.cuda_graphs, peer=peer) for peer in s.peers]
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


def attention_mode_of(s: BenchSettings, mode: str | None = None) -> AttentionMode:
    """The settings' FP8-attention mode (or `mode`), with their threshold."""
    return AttentionMode.parse(mode or s.fp8_attention, threshold=s.fp8_attention_threshold)
