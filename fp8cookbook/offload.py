"""Device placement for a pipeline that holds FP8 transformers (spec section 7).

DiT CPU offload and layer-wise offload rebuild weights contiguously and lose the column-major view of the FP8
weight that the FP8 GEMM needs, so for FP8 transformers both are turned off with a warning that says why, and
offload hooks already attached to them are removed. Text-encoder and VAE offload stay allowed.
"""

from __future__ import annotations

import gc
import warnings

import torch
from torch import nn

from .fp8.linear import FP8Linear

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder")

OFFLOAD_WARNING = ("{what} disabled for the FP8 transformer: offload rebuilds weights contiguously and loses the "
                   "column-major FP8 weight view that torch._scaled_mm needs; text-encoder and VAE offload stay allowed")


def release_memory() -> None:
    """Free what dropped models held: Python's cyclic garbage first (diffusers modules hold reference cycles, so a
    model set to None stays allocated until a collection), then the CUDA cache. Call it before the next big model
    arrives: without the collection, a pipeline benchmark measured the FP8 side with the BF16 transformer still on
    the GPU (FLUX.1-dev: 48.3 GB allocated at the start instead of about 25)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def refuse_dit_offload(dit_cpu_offload: bool, dit_layerwise_offload: bool) -> list[str]:
    """Turn the two DiT offload modes off with a warning that says why; returns what was turned off."""
    off = []
    for flag, what in ((dit_cpu_offload, "DiT CPU offload"), (dit_layerwise_offload, "DiT layer-wise offload")):
        if flag:
            warnings.warn(OFFLOAD_WARNING.format(what=what), UserWarning, stacklevel=3)
            off.append(what)
    return off


def is_fp8(module: object) -> bool:
    return isinstance(module, nn.Module) and any(isinstance(m, FP8Linear) for m in module.modules())


def transformer_components(pipe) -> dict[str, nn.Module]:
    return {name: m for name, m in pipe.components.items() if name.startswith("transformer") and isinstance(m, nn.Module)}


def has_offload_hooks(module: nn.Module) -> bool:
    """accelerate hooks (`_hf_hook`) or diffusers hooks (group offload, layer-wise casting) anywhere in the module."""
    return any(hasattr(m, "_hf_hook") or getattr(m, "_diffusers_hook", None) is not None for m in module.modules())


def strip_offload_hooks(module: nn.Module) -> bool:
    """Remove every offload hook from a module tree; True if there was one."""
    found = has_offload_hooks(module)
    if not found:
        return False
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(module, recurse=True)
    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None:
            for name in list(getattr(registry, "hooks", {})):
                registry.remove_hook(name, recurse=False)
            del m._diffusers_hook
    return True


def place_pipeline(pipe, device: str | torch.device, *, dit_cpu_offload: bool = False, dit_layerwise_offload: bool = False,
                   text_encoder_cpu_offload: bool = False, vae_cpu_offload: bool = False) -> list[str]:
    """Put a pipeline on `device` with the requested offload, refusing DiT offload for FP8 transformers.

    Returns what was turned off, each with its component, so notebooks can show it.
    """
    device = torch.device(device)
    transformers = transformer_components(pipe)
    fp8_names = [n for n, m in transformers.items() if is_fp8(m)]
    turned_off: list[str] = []
    if fp8_names:
        turned_off = [f"{what} ({', '.join(fp8_names)})" for what in refuse_dit_offload(dit_cpu_offload, dit_layerwise_offload)]
        dit_cpu_offload = dit_layerwise_offload = False
        for name in fp8_names:
            if strip_offload_hooks(transformers[name]):
                what = f"offload hooks already on {name}"
                warnings.warn(OFFLOAD_WARNING.format(what=what), UserWarning, stacklevel=2)
                turned_off.append(what)

    from accelerate import cpu_offload_with_hook

    hook = None
    offload = {name for name in TEXT_ENCODERS if text_encoder_cpu_offload} | ({"vae"} if vae_cpu_offload else set())
    if dit_cpu_offload:
        offload |= set(transformers)
    for name, module in pipe.components.items():
        if not isinstance(module, nn.Module):
            continue
        if name in offload:
            _, hook = cpu_offload_with_hook(module, device, prev_module_hook=hook)
        elif name in transformers and dit_layerwise_offload:
            module.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="leaf_level")
        else:
            module.to(device)
    return turned_off
