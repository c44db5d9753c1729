"""Shared-input fusion: FP8 layers that read the same activation become one FP8 GEMM (the fast path's third lever).

The shards' weights are requantised to one common scale (the largest of the shard scales, so nothing saturates)
and the largest input scale is kept; SGLang does the same for its fused QKV. Which layers of which diffusers module
read one input is family knowledge: each family lists its `FusionRule`s (`Family.fusion_rules`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .linear import FP8Linear
from .numerics import quantize_fp8
from .fusion_rule import FusionRule, Groups  # noqa: F401 - the rule lives torch-free

__all__ = ["FusionRule", "fuse_layers", "all_fp8", "fuse_attention", "fuse_fp8_projections"]

def fuse_layers(layers: list[nn.Module]) -> FP8Linear:
    """One FP8Linear computing all `layers` on a shared input: weights requantised to the largest weight scale."""
    first = layers[0]
    device = first.weight.device
    w_scale = torch.stack([m.weight_scale.float().reshape(()) for m in layers]).amax().reshape(1)
    in_scale = torch.stack([m.input_scale.float().reshape(()) for m in layers]).amax().reshape(1)
    has_bias = any(m.bias is not None for m in layers)
    dtype = next((m.bias.dtype for m in layers if m.bias is not None), torch.bfloat16)
    n_out = sum(m.out_features for m in layers)
    fused = FP8Linear(first.in_features, n_out, has_bias, device=device, dtype=dtype)
    fused.fast = first.fast
    with torch.no_grad():
        fused.weight_scale.copy_(w_scale)
        fused.input_scale.copy_(in_scale)
        row = 0
        for m in layers:
            rows = slice(row, row + m.out_features)
            if torch.equal(m.weight_scale.float().reshape(1), w_scale):
                fused.weight[rows].copy_(m.weight)  # already on the common scale: keep the bytes
            else:
                fused.weight[rows].copy_(quantize_fp8(m.weight.float() * m.weight_scale.float(), w_scale))
            if has_bias:
                fused.bias[rows].copy_(m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=dtype))
            row += m.out_features
    return fused


def all_fp8(modules: list[Any]) -> bool:
    """All FP8 layers with one input width: a group fusion may merge."""
    return bool(modules) and all(isinstance(m, FP8Linear) for m in modules) and \
        len({m.in_features for m in modules}) == 1


def fuse_attention(attn: nn.Module, groups: Groups) -> list[str]:
    """Fuse each group into `attn.<fused name>` and turn on diffusers' own fused-projection path, or do nothing."""
    shards = [[getattr(attn, s, None) for s in names] for _, names in groups]
    if not groups or not all(all_fp8(g) for g in shards):
        return []  # all or nothing: diffusers' fused path expects every fused projection of the module
    for (fused_name, names), layers in zip(groups, shards):
        setattr(attn, fused_name, fuse_layers(layers))
        for s in names:
            delattr(attn, s)
    attn.fused_projections = True
    return [fused_name for fused_name, _ in groups]


def fuse_fp8_projections(model: nn.Module, rules: tuple[FusionRule, ...] | list[FusionRule]) -> list[str]:
    """Fuse FP8 layers that read the same input into one FP8 GEMM each, in place; returns the fused layers' names.

    `rules` are the family's (`Family.fusion_rules`). Groups with a BF16 member (fallback or sensitive layers) stay
    as they are.
    """
    by_class = {r.class_name: r for r in rules}
    fused: list[str] = []
    handled: set[int] = set()
    modules = list(model.named_modules())
    for name, module in modules:
        rule = by_class.get(type(module).__name__)
        if rule is not None and rule.fuse_block is not None:
            got = rule.fuse_block(module)
            if got:
                handled.update(id(m) for m in module.modules())
                fused += [f"{name}.{g}" for g in got]
    for name, module in modules:
        if id(module) in handled or getattr(module, "fused_projections", False):
            continue
        rule = by_class.get(type(module).__name__)
        groups = rule.groups(module) if rule is not None and rule.groups is not None else []
        if groups:
            fused += [f"{name}.{g}" for g in fuse_attention(module, groups)]
    return fused
