"""Quantize a diffusers transformer to FP8 with NVIDIA ModelOpt, and export it.

The recipe is ModelOpt's diffusers `--format fp8` recipe restricted to what SGLang can serve: per-tensor E4M3
weight and static input quantizers on nn.Linear layers only, calibrated with `max`, the family's sensitive layers
left alone. ModelOpt is imported lazily so that the rest of the package works without it.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import Fp8CookbookError
from .families import Family, build_transformer, get_family

log = logging.getLogger(__name__)

ForwardLoop = Callable[[nn.Module], Any]

_E4M3 = {"num_bits": (4, 3), "axis": None}  # FP8 E4M3, one scale per tensor
_INSTALL_HINT = "pip install 'fp8cookbook[modelopt]'"

# Shapes of the tiny calibration batches: small enough for a CPU test, large enough to reach every layer.
TINY_CALIB = dict(height=64, width=64, num_frames=5, text_len=8)


def _modelopt() -> tuple[Any, Any]:
    """Import ModelOpt's quantization and opt packages, or say how to install them."""
    try:
        import modelopt.torch.opt as mto
        import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise Fp8CookbookError(f"NVIDIA ModelOpt is needed for this ({e}); install it: {_INSTALL_HINT}") from e
    return mtq, mto


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ModelOpt prints progress and warns about its internals, diffusers about dtypes: keep that at debug level."""
    from diffusers.utils import logging as diffusers_logging  # imported first: its import resets the level

    out = io.StringIO()
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32" on `.to(bf16)`
    with warnings.catch_warnings(), contextlib.redirect_stdout(out):
        warnings.filterwarnings("ignore", category=UserWarning, module=r"modelopt\.")
        try:
            yield
        finally:
            diffusers_logging.set_verbosity(level)
            if out.getvalue().strip():
                log.debug("modelopt: %s", out.getvalue().strip())


def fp8_diffusion_quant_cfg(quantize_mha: bool = False) -> dict:
    """ModelOpt 0.47 list-form config (last match wins): FP8 weights and static inputs of nn.Linear only.

    Unlike `mtq.FP8_DEFAULT_CFG` this leaves Conv (Wan's patch_embedding) and LayerNorm inputs alone, which
    calibration would otherwise spend amaxes on that never reach the checkpoint. `quantize_mha` adds FP8
    Q/K/V inputs of attention (ModelOpt's `--quantize-mha`); SGLang keeps attention in BF16 and ignores them.
    """
    quant_cfg: list[dict[str, Any]] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "parent_class": "nn.Linear", "cfg": dict(_E4M3)},
        {"quantizer_name": "*input_quantizer", "parent_class": "nn.Linear", "cfg": dict(_E4M3)},
        {"quantizer_name": "*output_quantizer", "enable": False},
    ]
    if quantize_mha:
        quant_cfg.append({"quantizer_name": "*[qkv]_bmm_quantizer", "cfg": dict(_E4M3)})
    return {"quant_cfg": quant_cfg, "algorithm": "max"}


def _skip_entries(model: nn.Module, family: Family) -> list[dict[str, Any]]:
    """One `enable: False` entry per topmost skipped module; a skipped module takes its submodules with it."""
    config = dict(model.config)
    entries: list[dict[str, Any]] = []
    covered: list[str] = []
    for name, _ in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in covered):
            continue
        if family.skip_in_calibration(name, config):
            covered.append(name)
            entries.append({"quantizer_name": glob.escape(name) + ".*", "enable": False})
    return entries


def _tensor_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return ((n, m) for n, m in model.named_modules() if isinstance(m, TensorQuantizer))


def check_amaxes(model: nn.Module) -> None:
    """Every enabled quantizer needs a finite positive amax, or export fails (or writes garbage scales)."""
    bad = []
    for name, q in _tensor_quantizers(model):
        if not q.is_enabled:
            continue
        amax = q.amax
        if amax is None or not bool(torch.isfinite(amax).all()) or not bool((amax > 0).all()):
            bad.append(f"{name} (amax={None if amax is None else amax.float().tolist()})")
    if bad:
        raise Fp8CookbookError(
            f"{len(bad)} enabled quantizer(s) got no usable amax from calibration: {', '.join(bad)}. "
            "The calibration data never reached these layers (or only produced zeros); calibrate with more "
            "steps/prompts (for Wan2.2 A14B, make sure the denoising steps reach this expert's timesteps)."
        )


def quantize_transformer(model: nn.Module, family: Family | str, forward_loop: ForwardLoop, *,
                         quantize_mha: bool = False, config: dict | None = None) -> nn.Module:
    """Insert FP8 quantizers, disable the family's sensitive layers, calibrate with `forward_loop`, check amaxes.

    The sensitive layers are disabled by config entries, before calibration, so they get no amax at all and the
    state file records why they are BF16. The model is changed in place and returned.
    """
    mtq, _ = _modelopt()
    family = get_family(family) if isinstance(family, str) else family
    cfg = dict(config or fp8_diffusion_quant_cfg(quantize_mha))
    if not isinstance(cfg.get("quant_cfg"), list):
        raise Fp8CookbookError("quant_cfg must be ModelOpt's list form (>= 0.44); dict-form configs are re-ordered "
                               "and can end with no weight quantizer enabled")
    cfg["quant_cfg"] = cfg["quant_cfg"] + _skip_entries(model, family)
    user_stdout = sys.stdout

    def loop(m: nn.Module) -> None:
        with contextlib.redirect_stdout(user_stdout):  # the caller's own progress output stays visible
            forward_loop(m)

    with _quiet(), torch.no_grad():
        model = mtq.quantize(model, cfg, loop)
    if quantize_mha and not any(n.endswith("_bmm_quantizer") and q.is_enabled for n, q in _tensor_quantizers(model)):
        raise Fp8CookbookError("quantize_mha found no attention quantizers: ModelOpt's diffusers plugin did not "
                               f"load (it needs `onnx`); install it: {_INSTALL_HINT}")
    check_amaxes(model)
    return model


def save_modelopt_state(model: nn.Module, path: str | Path) -> Path:
    """`mto.save`: the amaxes (`M.*_quantizer._amax`, model dtype) plus a full copy of the weights."""
    _, mto = _modelopt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        mto.save(model, path)
    return path


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
    _modelopt()
    from modelopt.torch.export import export_hf_checkpoint

    check_amaxes(model)  # ModelOpt's own failure on a missing amax is far less helpful
    export_dir = Path(export_dir)
    if exact_weights:
        _round_weights_to_fake_quant(model)
    with _quiet(), torch.no_grad():
        export_hf_checkpoint(model, dtype=dtype, export_dir=export_dir)
    if not (export_dir / "config.json").is_file():
        raise Fp8CookbookError(f"ModelOpt wrote no config.json to {export_dir}: was a diffusers transformer passed?")
    return export_dir


def load_fake_quant(base_dir: str | Path, state_path: str | Path, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """ModelOpt's fake-quant model (the reference an FP8 checkpoint must reproduce), from base config + state.

    Built like `build_transformer` (plain `.to(dtype)`, no fp32-kept modules), so its forward matches the
    model that was calibrated; all weights and amaxes come from the state file.
    """
    _, mto = _modelopt()
    import diffusers

    config = json.loads((Path(base_dir) / "config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    with _quiet():
        model = cls.from_config(config).to(dtype).eval().requires_grad_(False)
        mto.restore(model, str(state_path))
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
    with _quiet():
        model = build_transformer(family, "tiny", seed=seed + family.experts.index(expert))
    model.save_pretrained(paths["base"])
    batches = tiny_calibration_inputs(family, seed=seed, expert=expert)

    def forward_loop(m: nn.Module) -> None:
        for inputs in batches:
            m(**inputs)

    model = quantize_transformer(model, family, forward_loop, quantize_mha=quantize_mha)
    save_modelopt_state(model, paths["state"])
    export_transformer(model, paths["export"])
    if bf16_export:
        _bf16_flavour(paths["export"], paths["base"])
    return paths
