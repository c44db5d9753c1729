"""Device placement for a pipeline that holds FP8 transformers (spec section 7).

DiT CPU offload and layer-wise offload rebuild weights contiguously and lose the column-major view of the FP8
weight that the FP8 GEMM needs, so for FP8 transformers both are turned off with a warning that says why, and
offload hooks already attached to them are removed. Text-encoder and VAE offload stay allowed.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import warnings
from collections.abc import Iterator, Mapping

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


@contextlib.contextmanager
def one_expert_resident(experts: Mapping[str, nn.Module], device: str | torch.device,
                        offload_device: str | torch.device = "cpu") -> Iterator[list[str]]:
    """Keep only the expert that is running on `device`; the others wait on `offload_device`.

    Wan2.2 A14B runs its high-noise expert above the boundary and its low-noise one below it, never both in one step,
    so a BF16 pipeline needs 28.6 GB of expert weights on the GPU instead of 57.3 GB (an 80 GB card then has room for
    activations and the VAE decode). Each expert moves in when it is first called after the other ran: two transfers
    per switch, one switch per generation. Yields the list of moves made ("name->device"), for reports and tests.
    On exit every expert goes back to the device it was on when entered.
    """
    device, offload_device = _indexed(device), _indexed(offload_device)
    before = {name: module_device(m) for name, m in experts.items()}
    moves: list[str] = []
    resident: list[str] = []  # the one expert on `device`, or none yet

    def bring(name: str) -> None:
        if resident == [name]:
            return
        for other in resident:
            experts[other].to(offload_device)
            moves.append(f"{other}->{offload_device}")
        resident.clear()
        release_memory()  # the other expert's blocks go back to the driver before this one arrives
        experts[name].to(device)
        moves.append(f"{name}->{device}")
        resident.append(name)

    handles = [module.register_forward_pre_hook(lambda mod, args, name=name: bring(name))
               for name, module in experts.items()]
    try:
        for name, module in experts.items():
            if before[name] != offload_device:
                module.to(offload_device)
        release_memory()
        yield moves
    finally:
        for handle in handles:
            handle.remove()
        # back where each was: those going to the offload device first, so the GPU never holds more than on entry
        for name in sorted(experts, key=lambda n: before[n] != offload_device):
            now = device if name in resident else offload_device
            if before[name] is not None and before[name] != now:
                experts[name].to(before[name])
                moves.append(f"{name}->{before[name]}")


def _indexed(device: str | torch.device) -> torch.device:
    """"cuda" as the "cuda:N" that tensors report, so devices compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def module_device(module: nn.Module) -> torch.device | None:
    """The device of a module's first parameter or buffer (None when it has neither)."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return None if tensor is None else tensor.device
