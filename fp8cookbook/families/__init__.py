"""Model families: the one registry. Each family's file (`flux1.py`, `flux2.py`, `wan22.py`) holds everything the
library knows about it, so that adding a family touches nothing else (docs/architecture.md, skills/add-model-family).

An entry is data: the real model's config, a tiny config of the same class that runs on CPU in milliseconds, the
BF16 fallback profile the converter applies (spec section 4), the sensitive layers that calibration leaves alone,
how to build dummy transformer inputs, the tiny pipeline and its settings, the sampler facts the benchmark needs
(flow shift, forwards per step), SGLang serving flags, and which FP8 layers the fast path may fuse. Every pattern
carries the reason it is there.
"""

from __future__ import annotations

from .registry import (ALIASES, FAMILIES, REDUCED_VOCAB, Family, InputMaker, LayerRule, StandinComponent, StandinParts,
                       TinySettings, all_fusion_rules, build_transformer, family_for_class, get_family, register,
                       sglang_aliases_for)

__all__ = ["LayerRule", "InputMaker", "TinySettings", "Family", "FAMILIES", "ALIASES", "register", "get_family",
           "family_for_class", "sglang_aliases_for", "all_fusion_rules", "build_transformer", "StandinComponent", "StandinParts",
           "REDUCED_VOCAB"]

# The family files register themselves; the order is the order users see.
from . import flux1, flux2, wan22  # noqa: E402,F401
