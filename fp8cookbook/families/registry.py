"""The registry's types and functions: `Family`, `LayerRule`, `TinySettings`, `register`, `get_family`,
`build_transformer`. A module of its own so that the family files import it, not the package `__init__` that
imports them (no import cycle); `fp8cookbook.families` re-exports every name."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..errors import Fp8CookbookError
from ..fp8.fusion_rule import FusionRule
from ..sglang_names import generic_runtime_names

if TYPE_CHECKING:  # torch loads where a model is built, so the registry (and `fp8cookbook --help`) stay light
    import torch


@dataclass(frozen=True)
class LayerRule:
    """A regex that must match a whole module name, and why the layer is treated specially."""

    pattern: str
    why: str

    def matches(self, module_name: str) -> bool:
        return re.fullmatch(self.pattern, module_name) is not None


InputMaker = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class TinySettings:
    """Generation settings of the tiny pipeline: small enough for CPU tests (splat `as_dict()` into
    `pipelines.generation_kwargs`)."""

    height: int = 64
    width: int = 64
    num_frames: int | None = None
    num_inference_steps: int = 3
    guidance_scale: float = 3.5

    def as_dict(self) -> dict[str, Any]:
        return dict(height=self.height, width=self.width, num_frames=self.num_frames,
                    num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale)


@dataclass(frozen=True)
class Family:
    """Everything the library knows about one model family."""

    name: str
    title: str
    class_name: str  # diffusers transformer class, as in config.json's `_class_name`
    pipeline_class: str
    hub_id: str  # the base model SGLang serves with --model-path
    full_config: dict[str, Any]
    tiny_config: dict[str, Any]
    bf16_fallback: tuple[LayerRule, ...]  # converter profile: these layers stay BF16 in the output
    sensitive: Callable[[dict[str, Any]], tuple[LayerRule, ...]]  # calibration leaves these unquantized
    make_inputs: InputMaker
    build_tiny_pipeline: Callable[["Family"], Any]  # (family) -> a tiny random pipeline of the real classes, float32
    tiny_settings: TinySettings = field(default_factory=TinySettings)
    experts: tuple[str, ...] = ("transformer",)
    boundary_ratio: float | None = None
    # Defaults a user of the real model would pick.
    height: int = 1024
    width: int = 1024
    num_frames: int | None = None
    num_steps: int = 28
    guidance_scale: float = 3.5
    text_len: int = 512
    size_multiple: int = 16  # height and width must be multiples of this (VAE compression x patch size)
    # The sampler, as the benchmark's synthetic loop imitates it.
    forwards_per_step: int = 1  # transformer forwards per denoising step (2: classifier-free guidance batches)
    flow_shift: float | None = None  # the scheduler's static flow shift (None: no shift, i.e. 1.0)
    # Serving with SGLang.
    # the names SGLang's runtime (and its converter's `ignore`) may give a module besides the diffusers one
    sglang_aliases: Callable[[str], list[str]] = generic_runtime_names
    sglang_extra_flags: tuple[str, ...] = ()
    sglang_memory_flags: tuple[str, ...] = ()  # offload flags so the model fits one 80 GB GPU (SGLang's examples)
    serve_notes: tuple[str, ...] = ()  # printed with the serve command
    # The fast path: which FP8 layers read one input and may become one GEMM.
    fusion_rules: tuple[FusionRule, ...] = ()
    # Full-size stand-ins (standin.py): (family, full, transformer config) -> `standin.StandinParts`, the pipeline's
    # other components from the real repo's configs (cited), its scheduler and tokenizers. None: no stand-in.
    standin: Callable[["Family", bool, dict[str, Any]], "StandinParts"] | None = None

    @property
    def is_video(self) -> bool:
        return self.num_frames is not None

    def transformer_class(self) -> type[torch.nn.Module]:
        import diffusers

        return getattr(diffusers, self.class_name)

    def is_fallback(self, module_name: str) -> bool:
        return any(rule.matches(module_name) for rule in self.bf16_fallback)

    def skip_in_calibration(self, module_name: str, config: dict[str, Any]) -> bool:
        """Layers calibration leaves in BF16: the sensitive filter plus the fallback profile (quantizing them is waste)."""
        return self.is_fallback(module_name) or any(rule.matches(module_name) for rule in self.sensitive(config))


# ------------------------------------------------------------------------------------------- stand-in data
REDUCED_VOCAB = 1024  # text encoders of the reduced stand-ins: > every offline tokenizer's size


@dataclass(frozen=True)
class StandinComponent:
    """One weight-bearing pipeline component of a stand-in (standin.py): its class and constructor config."""

    name: str  # folder in the pipeline: transformer, text_encoder, vae, ...
    library: str  # "diffusers" or "transformers"
    class_name: str
    config: dict[str, Any]
    config_class: str | None = None  # transformers: the config class the model takes
    source: str = ""  # where the real config comes from
    dtype: str = "bfloat16"  # torch dtype name, as the real repo stores it (the Wan VAEs are float32 there)


@dataclass(frozen=True)
class StandinParts:
    """What a family's `Family.standin` gives besides the transformers, from the real repo's configs."""

    components: tuple[StandinComponent, ...]
    scheduler: tuple[str, dict[str, Any]]  # class name, config
    tokenizers: dict[str, Callable[[], Any]]  # component name -> an offline tokenizer factory
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)  # boundary_ratio, expand_timesteps


# ------------------------------------------------------------------------------------------------- registry
FAMILIES: dict[str, Family] = {}
ALIASES: dict[str, str] = {}


def register(family: Family, *aliases: str) -> Family:
    """Add a family (and the names a user may type for it) to the registry."""
    FAMILIES[family.name] = family
    for alias in aliases:
        ALIASES[alias] = family.name
    return family


def get_family(name: str) -> Family:
    """Look a family up by name or alias; an unknown name lists the known ones."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FAMILIES:
        known = ", ".join(sorted(FAMILIES) + sorted(ALIASES))
        raise Fp8CookbookError(f"unknown model family {name!r}; known: {known}")
    return FAMILIES[key]


def family_for_class(class_name: str | None) -> Family | None:
    """The profile for a config.json `_class_name` (both Wan2.2 variants share one, with the same empty profile)."""
    for family in FAMILIES.values():
        if family.class_name == class_name:
            return family
    return None


def sglang_aliases_for(class_name: str | None) -> Callable[[str], list[str]] | None:
    """The runtime-name table of the family a config.json `_class_name` names, for `sglang_names.bf16_decider`;
    None when no family has that class (SGLang's converter names then)."""
    family = family_for_class(class_name)
    return family.sglang_aliases if family is not None else None


def all_fusion_rules() -> tuple[FusionRule, ...]:
    """Every family's fusion rules, for a model whose family is not known (rules are keyed by module class)."""
    seen: dict[str, FusionRule] = {}
    for family in FAMILIES.values():
        for rule in family.fusion_rules:
            seen.setdefault(rule.class_name, rule)
    return tuple(seen.values())


def build_transformer(family: Family, size: str = "tiny", *, seed: int = 0, dtype: torch.dtype | None = None,
                      device: str | torch.device = "cpu") -> torch.nn.Module:
    """A transformer of the family's real class with random weights: `tiny` for CPU tests, `full` for timing.

    `full` is built on the meta device, cast there (so FLUX.2 never exists in float32: that would be 128 GB), with
    `_keep_in_fp32_modules` kept float32 as `from_pretrained` keeps them, and its values drawn on `device`:
    N(0, 1/fan_in) for matrices, N(0, 0.02) elsewhere, 1 + N(0, 0.02) for norm weights.
    """
    import torch

    if size not in ("tiny", "full"):
        raise Fp8CookbookError(f"unknown size {size!r}; use 'tiny' or 'full'")
    dtype = torch.bfloat16 if dtype is None else dtype
    cls = family.transformer_class()
    if size == "tiny":
        torch.manual_seed(seed)
        return cls(**family.tiny_config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        model = cls(**family.full_config)
    model = model.to(dtype)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, p in model.named_parameters():
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                t.zero_()
            elif t.dim() >= 2:
                t.normal_(0.0, 1.0 / math.sqrt(math.prod(t.shape[1:])), generator=g)
            else:
                t.normal_(0.0, 0.02, generator=g)
                if "norm" in name and name.endswith("weight"):
                    t.add_(1.0)
    return model.eval().requires_grad_(False)


