"""Peers: the FP8 library a diffusers user would pick instead of ours, timed on the same layers in the same process.

torchao's float8 inference (`Float8DynamicActivationFloat8WeightConfig`: each activation scaled at run time, weights
scaled per output row or per tensor) goes through `torchao.quantization.quantize_` with a `filter_fn` that keeps
exactly the layers our static FP8 path quantises (the calibrated `fp8_candidates`, the family's BF16 fallbacks left
alone), so a ratio between the two measures the kernels and scaling, not a different choice of layers.

torchao is an optional extra (`pip install 'fp8cookbook[torchao]'`) and its float8 needs a CUDA GPU of compute
capability 8.9 or newer; both are checked in `check_peers`, before any work.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import Fp8CookbookError
from ..fp8.numerics import fp8_gemm_supported

# peer name -> torchao weight granularity (the class name in torchao.quantization)
PEERS: dict[str, str] = {"torchao-rowwise": "PerRow", "torchao-tensorwise": "PerTensor"}


def parse_peers(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """`--peer a,b` (or a sequence) -> known peer names, in order, without repeats."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(x).strip() for x in items if str(x).strip()]
    for name in names:
        if name not in PEERS:
            raise Fp8CookbookError(f"--peer: unknown peer {name!r}; choose from {', '.join(PEERS)}")
    return tuple(dict.fromkeys(names))


def check_peers(peers: tuple[str, ...], device: torch.device) -> None:
    """Refuse before any work: torchao's float8 runs only on CUDA with SM 8.9+, and torchao must be installed."""
    if not peers:
        return
    what = f"--peer {','.join(peers)}"
    if not fp8_gemm_supported(device):
        where = (f"{torch.cuda.get_device_name(device)} (compute capability "
                 f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))})" if device.type == "cuda"
                 else device.type)
        raise Fp8CookbookError(f"{what}: torchao's float8 needs a CUDA GPU with compute capability >= 8.9; "
                               f"this run is on {where}")
    if importlib.util.find_spec("torchao") is None:
        raise Fp8CookbookError(f"{what}: torchao is not installed (pip install 'fp8cookbook[torchao]')")


def peer_filter(names: Iterable[str]) -> Callable[[nn.Module, str], bool]:
    """torchao's `filter_fn(module, fqn)`: the plain nn.Linear layers named in `names` (the ones our FP8 path swaps)."""
    chosen = frozenset(names)
    return lambda m, fqn: type(m) is nn.Linear and fqn in chosen


def torchao_config(peer: str) -> Any:
    """The peer's torchao config, built here and passed explicitly.

    `set_inductor_config=False`: torchao's default changes Inductor's process-wide settings, which would also change
    how our FP8 side and BF16 compile; every side of one report compiles under the same settings.
    """
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

    granularity = {"PerRow": PerRow, "PerTensor": PerTensor}[PEERS[peer]]()
    return Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False)


@torch.no_grad()
def quantize_peer(model: nn.Module, peer: str, names: Iterable[str]) -> int:
    """torchao's `quantize_` on the named layers, in place; returns how many layers now hold torchao weights."""
    from torchao.quantization import quantize_

    quantize_(model, torchao_config(peer), filter_fn=peer_filter(names))
    return count_peer_layers(model)


def count_peer_layers(model: nn.Module) -> int:
    """nn.Linear layers whose weight is a torchao tensor subclass (what `quantize_` replaced)."""
    return sum(1 for m in model.modules() if isinstance(m, nn.Linear) and type(m.weight).__module__.startswith("torchao"))


def peer_info(peer: str) -> dict[str, Any]:
    """What the report records about a peer: library, version, the config as torchao prints it."""
    import torchao

    return {"library": "torchao", "version": torchao.__version__, "granularity": PEERS[peer],
            "config": repr(torchao_config(peer)),
            "activation_scaling": "dynamic, " + ("one scale per token (row)" if PEERS[peer] == "PerRow"
                                                 else "one scale per tensor") + ", computed at run time"}
