"""Static FP8 in process, in torchao's style: calibrate input amaxes, then `quantize_(model, config, filter_fn=...)`.

This is the benchmark's and the tests' quantizer (random or real weights, no export). Checkpoints for SGLang come
from the ModelOpt path instead (`fp8cookbook.quantize`), whose scales the converter writes.

    names = fp8_candidates(model, family)                 # what the family lets become FP8 (K, N % 16 == 0)
    with record_input_amax(model, names) as amax:
        model(**inputs)                                   # calibration forwards
    quantize_(model, StaticFP8Config(amax))               # each nn.Linear -> FP8Linear, freed as it goes
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn

from ..checkpoint import scales_from_amax
from .linear import FP8Linear, swap_linears

if TYPE_CHECKING:
    from ..families import Family

__all__ = ["StaticFP8Config", "fp8_filter", "fp8_candidates", "record_input_amax", "quantize_", "attention_scales"]


@dataclass(frozen=True)
class StaticFP8Config:
    """Per-layer input amaxes (from `record_input_amax`); layers without one stay as they are."""

    input_amax: dict[str, torch.Tensor]
    min_amax: float = 1e-12  # an all-zero calibration input would give a zero scale


def fp8_filter(family: "Family", config: dict, *, include_fallback: bool = False) -> Callable[[nn.Module, str], bool]:
    """`filter_fn(module, name)`: a plain nn.Linear with K, N % 16 == 0 that the family's calibration filter keeps.

    `include_fallback` quantises the converter's BF16-fallback layers too (only the sensitive filter applies), to
    compare with measurements that put every block Linear in FP8; checkpoints made by the converter never do that.
    """
    def skipped(name: str) -> bool:
        if include_fallback:
            return any(rule.matches(name) for rule in family.sensitive(config))
        return family.skip_in_calibration(name, config)

    def keep(m: nn.Module, name: str) -> bool:
        return type(m) is nn.Linear and not skipped(name) and m.in_features % 16 == 0 and m.out_features % 16 == 0

    return keep


@torch.no_grad()
def fp8_candidates(model: nn.Module, family: "Family", *, include_fallback: bool = False) -> list[str]:
    """Names of the linear layers `fp8_filter` lets become FP8."""
    config = dict(model.config) if hasattr(model, "config") else {}
    keep = fp8_filter(family, config, include_fallback=include_fallback)
    return [name for name, m in model.named_modules() if keep(m, name)]


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
def quantize_(model: nn.Module, config: StaticFP8Config,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> list[str]:
    """Replace each calibrated nn.Linear (that `filter_fn` also keeps) by `FP8Linear.quantize`, in place.

    Each BF16 weight is freed as soon as its FP8 copy is made, so models whose BF16 and FP8 copies do not fit
    together still convert. Returns the replaced layers' names.
    """
    amax = config.input_amax

    def chosen(m: nn.Module, name: str) -> bool:
        return name in amax and (filter_fn is None or filter_fn(m, name))

    return swap_linears(model, chosen, lambda linear, name: FP8Linear.quantize(linear, amax[name].clamp_min(config.min_amax)))


@torch.no_grad()
def attention_scales(model: nn.Module, family: Family, amax: dict[str, dict[str, torch.Tensor]], *,
                     include_fallback: bool = False) -> dict[str, tuple[float, float, float]]:
    """Q/K/V scales from `record_attention_amax` for the modules a `--quantize-mha` checkpoint has them for.

    ModelOpt disables the attention quantizers of the blocks the family keeps in BF16 (Wan2.2's edge blocks), so
    those keep BF16 attention; `include_fallback` gives them FP8 attention too. A non-finite amax (random weights can
    overflow) becomes 1, as for the linear layers.
    """
    config = dict(model.config)
    return scales_from_amax(
        {n: {k: (v if bool(torch.isfinite(v)) else torch.ones_like(v)) for k, v in a.items()}
         for n, a in amax.items() if include_fallback or not family.skip_in_calibration(n, config)})
