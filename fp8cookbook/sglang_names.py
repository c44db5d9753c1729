"""How SGLang's diffusion runtime reads `ignore`: which layers it builds in BF16, in the names it uses itself.

Facts (read from sgl-project/sglang, `multimodal_gen/runtime/layers/quantization/modelopt_quant.py`,
`configs/models/dits/{flux,wanvideo}.py`, `tools/build_modelopt_fp8_transformer.py`; the code here is ours):

- SGLang asks the quantization config once per quantizable linear layer, with the layer's *runtime* prefix: the
  module name in SGLang's own model class, not in diffusers'. A pattern keeps the layer BF16 when it matches the
  whole prefix, `*` standing for any characters (`ModelOptQuantConfig.is_layer_excluded`).
- The runtime names differ from the diffusers names the checkpoint's tensors carry. SGLang maps tensor names with
  the family's `param_names_mapping` (Wan2.2: `blocks.N.attn1.to_q` is `blocks.N.to_q`, `ffn.net.0.proj` is
  `ffn.fc_in`, ...), and SGLang's own converter writes `ignore` in runtime names: every `*.ff.net.0.proj` becomes
  `*.ff.proj_in` and `*.ff.net.2` becomes `*.ff.proj_out` (so the published FLUX.1 checkpoint lists
  `transformer_blocks.N.ff.proj_in`, not `ff.net.0.proj`). ModelOpt's own exports write diffusers names.
- So a folder is read correctly by checking a module under its diffusers name *and* its runtime names: a layer is
  BF16 when any of them is covered. Both kinds of writer (ModelOpt, SGLang's converter, ours) then agree with the
  runtime on every layer.

Each family's file holds its table (`families/flux1.py`, `families/wan22.py`) and points `Family.sglang_aliases` at
it; everything that decides FP8 vs BF16 (loader, inspect, converter) goes through `keeps_bf16`, built on the one
pattern matcher (`checkpoint.IgnoreRules`).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Protocol

# (diffusers module name regex, runtime name template, why). A regex must match the whole module name; a family's
# table starts with GENERIC_RULES.
RuntimeRule = tuple[str, str, str]

# SGLang's converter canonicalises these for every model class (`_module_name_variants`).
GENERIC_RULES: tuple[RuntimeRule, ...] = (
    (r"(.+\.(?:audio_)?ff)\.net\.0\.proj", r"\1.proj_in", "SGLang's converter names the FF input projection proj_in"),
    (r"(.+\.(?:audio_)?ff)\.net\.2", r"\1.proj_out", "SGLang's converter names the FF output projection proj_out"),
)

@lru_cache(maxsize=None)
def _compiled(rules: tuple[RuntimeRule, ...]) -> tuple[tuple[re.Pattern[str], str], ...]:
    return tuple((re.compile(pattern), template) for pattern, template, _ in rules)


def runtime_names(module_name: str, rules: tuple[RuntimeRule, ...] = GENERIC_RULES) -> list[str]:
    """The names SGLang may know `module_name` by, other than itself (sorted, no duplicates)."""
    out = {regex.sub(template, module_name) for regex, template in _compiled(rules) if regex.fullmatch(module_name)}
    out.discard(module_name)
    return sorted(out)


def generic_runtime_names(module_name: str) -> list[str]:
    return runtime_names(module_name, GENERIC_RULES)


class Matcher(Protocol):
    """What `keeps_bf16` needs from the ignore list: `checkpoint.IgnoreRules`."""

    def matches(self, name: str) -> bool: ...


def names_checked(module_name: str, aliases: Callable[[str], list[str]] | None) -> list[str]:
    """The module's own name, then every runtime name SGLang may use for it."""
    return [module_name] + list((aliases or generic_runtime_names)(module_name))


def keeps_bf16(rules: Matcher, module_name: str, aliases: Callable[[str], list[str]] | None = None) -> bool:
    """SGLang's decision for one linear layer: BF16 when `ignore` covers it under any of its names.

    `aliases` is the family's `sglang_aliases`; None (family unknown) uses SGLang's converter canonicalisation,
    which it applies to every model class.
    """
    return any(rules.matches(name) for name in names_checked(module_name, aliases))


class HasRules(Protocol):
    """What `bf16_decider` reads from a `checkpoint.QuantInfo`: its `IgnoreRules`."""

    rules: Matcher


def bf16_decider(info: HasRules | None, aliases: Callable[[str], list[str]] | None) -> Callable[[str], bool]:
    """SGLang's BF16 decision for the linear layers of one checkpoint: `keeps_bf16` with the `sglang_aliases` of the
    family its `_class_name` names (`families.sglang_aliases_for`; None: the converter's generic names). The
    caller passes the aliases in, so this module imports neither the checkpoint format nor the registry (both
    import it). No quantization config: nothing is kept."""
    if info is None:
        return lambda name: False
    rules = info.rules
    return lambda name: keeps_bf16(rules, name, aliases)
