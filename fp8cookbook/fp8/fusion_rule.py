"""`FusionRule`: which FP8 layers of a diffusers module read one input (data only, no torch), so the families
registry can name its rules without importing torch; `fusion.py` does the fusing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import nn

Groups = list[tuple[str, tuple[str, ...]]]  # (fused layer name, the shard layer names it replaces)


@dataclass(frozen=True)
class FusionRule:
    """How to fuse one diffusers module class: attention `groups`, or a whole-block `fuse_block` (run first)."""

    class_name: str
    groups: Callable[[nn.Module], Groups] | None = None
    fuse_block: Callable[[nn.Module], list[str]] | None = None
