"""Saving what ModelOpt calibrated: its state, its HF export, a fake-quant reference, and tiny exports for tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import scan_tensors, shard_files
from ..errors import Fp8CookbookError
from ..files import plain_modes
from ..families import Family, build_transformer, get_family
from .recipe import TINY_CALIB, check_amaxes, quantize_transformer, quiet_modelopt, require_modelopt

LEAN_STATE_KEY = "fp8cookbook_weights_omitted"  # in a state file written with weights=False


def save_modelopt_state(model: nn.Module, path: str | Path, *, weights: bool = True) -> Path:
    """`mto.save`'s layout: ModelOpt's state (quantizer config) and `model_state_dict` with the amaxes
    (`M.*_quantizer._amax`, model dtype).

    `weights=True` is `mto.save` itself, with a full copy of the weights. `weights=False` keeps only the quantizer
    tensors: when the export holds the FP8 weights and the base folder the BF16 ones, a third copy is waste (FLUX.2:
    64 GB); `load_fake_quant` then reads the weights from the base folder. A BF16-flavour export (no FP8 weights)
    needs the full file: there the state is the only record of the calibrated model besides the export.
    """
    _, mto = require_modelopt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_modelopt():
        if weights:
            mto.save(model, path)
        else:
            quantizers = {k: v for k, v in model.state_dict().items() if "_quantizer." in k}
            torch.save({"modelopt_state": mto.modelopt_state(model), "model_state_dict": quantizers,
                        LEAN_STATE_KEY: True}, path)
    return path


def export_has_fp8_weights(export_dir: str | Path) -> bool:
    """The export holds FP8 weights (ModelOpt's usual flavour), not BF16 ones with the amaxes left in the state."""
    return any(t.dtype == torch.float8_e4m3fn for t in scan_tensors(Path(export_dir)).values())


@torch.no_grad()
def _round_weights_to_fake_quant(model: nn.Module) -> int:
    """Replace FP8 per-tensor weights by their fake-quant values, so that the export's FP8 codes equal them.

    ModelOpt 0.47 exports `(weight / weight_scale).to(float8)` with a BF16 weight and a 0-d fp32 scale, which
    PyTorch computes in BF16: the quotient is rounded to BF16 first, and on ties the FP8 code lands one step
    away from fake quant (about 4% of the codes). A weight already on the FP8 grid survives that division.
    """
    count = 0
    for module in model.modules():
        wq = getattr(module, "weight_quantizer", None)
        if (isinstance(module, nn.Linear) and not module.weight.is_meta and wq is not None and wq.is_enabled
                and wq.num_bits == (4, 3) and not wq.block_sizes and wq.amax is not None and wq.amax.numel() == 1):
            module.weight.copy_(wq(module.weight))
            count += 1
    return count


def export_transformer(model: nn.Module, export_dir: str | Path, dtype: torch.dtype = torch.bfloat16, *,
                       exact_weights: bool = True) -> Path:
    """`export_hf_checkpoint` of the bare transformer: config.json with flat quantization_config, FP8 weights,
    0-d fp32 `weight_scale`/`input_scale`.

    ModelOpt converts the weights to FP8 in place, so the model cannot run fake-quant afterwards: save the
    state file first. `exact_weights` makes the FP8 codes those of ModelOpt's fake quant (see
    `_round_weights_to_fake_quant`); False keeps ModelOpt's own rounding.
    """
    require_modelopt()
    from modelopt.torch.export import export_hf_checkpoint

    check_amaxes(model)  # ModelOpt's own failure on a missing amax is far less helpful
    export_dir = Path(export_dir)
    if exact_weights:
        _round_weights_to_fake_quant(model)
    with quiet_modelopt(), torch.no_grad():
        export_hf_checkpoint(model, dtype=dtype, export_dir=export_dir)
    if not (export_dir / "config.json").is_file():
        raise Fp8CookbookError(f"ModelOpt wrote no config.json to {export_dir}: was a diffusers transformer passed?")
    plain_modes(export_dir)  # its safetensors files are 0600
    return export_dir


def load_fake_quant(base_dir: str | Path, state_path: str | Path, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """ModelOpt's fake-quant model (the reference an FP8 checkpoint must reproduce), from base config + state.

    Built like `build_transformer` (plain `.to(dtype)`, no fp32-kept modules), so its forward matches the
    model that was calibrated; the amaxes come from the state file, the weights too unless it was written without
    them (`save_modelopt_state(weights=False)`): then from the base folder.
    """
    _, mto = require_modelopt()
    import diffusers

    config = json.loads((Path(base_dir) / "config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    state = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
    with quiet_modelopt():
        model = cls.from_config(config).to(dtype).eval().requires_grad_(False)
        if not state.get(LEAN_STATE_KEY):
            mto.restore(model, str(state_path))
            return model.to(dtype)
        from safetensors.torch import load_file  # a state without weights: they are the base folder's

        loaded: set[str] = set()
        for shard in shard_files(Path(base_dir)):
            tensors = load_file(shard)
            model.load_state_dict(tensors, strict=False)
            loaded |= tensors.keys()
        lacking = [k for k in model.state_dict() if k not in loaded]
        if lacking:
            raise Fp8CookbookError(f"{base_dir}: lacks {lacking[0]} (+{len(lacking) - 1} more); {state_path} holds no "
                                   "weights, so the base folder must hold them all")
        model = mto.restore_from_modelopt_state(model, state["modelopt_state"])
        result = model.load_state_dict(state["model_state_dict"], strict=False)
    missing = [k for k in result.missing_keys if "_quantizer." in k]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise Fp8CookbookError(f"{state_path}: quantizer state does not fit {base_dir} ({bad})")
    return model.to(dtype)


# ------------------------------------------------------------------------------------------- tiny exports
def tiny_calibration_inputs(family: Family | str, *, seed: int = 0, batches: int = 2,
                            expert: str = "transformer") -> list[dict[str, Any]]:
    """Seeded dummy batches for the tiny model; Wan2.2 A14B experts get timesteps of their own noise range."""
    family = get_family(family) if isinstance(family, str) else family
    config = family.tiny_config
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        inputs = family.make_inputs(config, generator=g, **TINY_CALIB)
        if family.boundary_ratio is not None:
            boundary = int(family.boundary_ratio * 1000)
            lo, hi = (boundary, 1000) if expert == family.experts[0] else (0, boundary)
            inputs["timestep"] = torch.randint(lo, hi, (inputs["timestep"].shape[0],), generator=g)
        out.append(inputs)
    return out


def _bf16_flavour(export_dir: Path, base_dir: Path) -> None:
    """Rewrite an export as CPU-offloaded calibration leaves it: BF16 weights from the base, no scales."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base: dict[str, torch.Tensor] = {}
    for shard in sorted(base_dir.glob("*.safetensors")):
        base.update(load_file(shard))
    weight_map: dict[str, str] = {}
    total = 0
    for shard in sorted(export_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            metadata = f.metadata() or {"format": "pt"}
        tensors = {}
        for name, t in load_file(shard).items():
            if name.endswith((".weight_scale", ".input_scale")):
                continue
            if t.dtype == torch.float8_e4m3fn:
                t = base[name].to(torch.bfloat16)
            tensors[name] = t
            weight_map[name] = shard.name
            total += t.numel() * t.element_size()
        save_file(tensors, shard, metadata=metadata)
    plain_modes(export_dir)
    for index in export_dir.glob("*.safetensors.index.json"):
        data = json.loads(index.read_text())
        data["weight_map"] = weight_map
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=2))


def make_tiny_export(family_name: str, out_dir: str | Path, *, seed: int = 0, quantize_mha: bool = False,
                     bf16_export: bool = False, expert: str = "transformer") -> dict[str, Path]:
    """A real ModelOpt export of a tiny transformer, for tests and the converter's round trip.

    Writes `base/` (BF16 `save_pretrained`), `<expert>.pt` (`mto.save` state) and `export/`. `expert` picks the
    Wan2.2 A14B expert: different weights (seed + expert index) and calibration timesteps of its noise range;
    use one out_dir per expert. `bf16_export=True` gives the other export flavour (BF16 weights, no scales,
    quantization_config kept; the amaxes are only in the state file). ModelOpt's fake-quant reference:
    `load_fake_quant(paths["base"], paths["state"])`.
    """
    family = get_family(family_name)
    if expert not in family.experts:
        raise Fp8CookbookError(f"{family.name} has experts {family.experts}, not {expert!r}")
    out_dir = Path(out_dir)
    paths = {"base": out_dir / "base", "export": out_dir / "export", "state": out_dir / f"{expert}.pt"}
    with quiet_modelopt():
        model = build_transformer(family, "tiny", seed=seed + family.experts.index(expert))
    model.save_pretrained(paths["base"])
    plain_modes(paths["base"])
    batches = tiny_calibration_inputs(family, seed=seed, expert=expert)

    def forward_loop(m: nn.Module) -> None:
        for inputs in batches:
            m(**inputs)

    model = quantize_transformer(model, family, forward_loop, quantize_mha=quantize_mha)
    save_modelopt_state(model, paths["state"], weights=bf16_export)  # the full copy only where it is needed
    export_transformer(model, paths["export"])
    if bf16_export:
        _bf16_flavour(paths["export"], paths["base"])
    return paths
