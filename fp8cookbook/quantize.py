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
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .checkpoint import STATS_NAME, scan_tensors, shard_files, write_json_atomic
from .convert import ConvertStats, convert_checkpoint, peak_rss_mb
from .errors import Fp8CookbookError
from .families import Family, build_transformer, get_family
from .pipelines import default_tiny_settings, generation_kwargs, transformer_names
from .stages import StageLog

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
    bad = _missing_amaxes(model)
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


LEAN_STATE_KEY = "fp8cookbook_weights_omitted"  # in a state file written with weights=False


def save_modelopt_state(model: nn.Module, path: str | Path, *, weights: bool = True) -> Path:
    """`mto.save`'s layout: ModelOpt's state (quantizer config) and `model_state_dict` with the amaxes
    (`M.*_quantizer._amax`, model dtype).

    `weights=True` is `mto.save` itself, with a full copy of the weights. `weights=False` keeps only the quantizer
    tensors: when the export holds the FP8 weights and the base folder the BF16 ones, a third copy is waste (FLUX.2:
    64 GB); `load_fake_quant` then reads the weights from the base folder. A BF16-flavour export (no FP8 weights)
    needs the full file: there the state is the only record of the calibrated model besides the export.
    """
    _, mto = _modelopt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
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
    state = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
    with _quiet():
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
    save_modelopt_state(model, paths["state"], weights=bf16_export)  # the full copy only where it is needed
    export_transformer(model, paths["export"])
    if bf16_export:
        _bf16_flavour(paths["export"], paths["base"])
    return paths


# ------------------------------------------------------------------------------- whole-pipeline quantization
PROMPTS_FILE = Path(__file__).parent / "data" / "calibration_prompts.txt"

# Calibration defaults for real checkpoints (tiny pipelines use `default_tiny_settings`). ModelOpt's example
# suggests 128-256 prompts at 20 steps for images; video prompts cost ~100x more each, so fewer.
REAL_CALIB_STEPS = 20
DEFAULT_NUM_PROMPTS = {"tiny": 4, "image": 64, "video": 16}


def calibration_prompts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """Calibration prompts, one per line (blank lines and `#` comments skipped); the shipped file when `path` is None.

    `limit` takes the first N: the shipped file is ordered so that any prefix is varied. Asking for more prompts
    than the file has is an error, not a silent shortfall.
    """
    source = PROMPTS_FILE if path is None else Path(path).expanduser()
    if limit is not None and limit < 1:
        raise Fp8CookbookError(f"the number of calibration prompts must be at least 1, got {limit}")
    hint = "expected a UTF-8 text file with one prompt per line"
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Fp8CookbookError(f"{source}: prompts file does not exist") from None
    except IsADirectoryError:
        raise Fp8CookbookError(f"{source}: is a folder; {hint}") from None
    except UnicodeDecodeError as e:
        raise Fp8CookbookError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start}); {hint}") from None
    except OSError as e:
        raise Fp8CookbookError(f"{source}: cannot read prompts file ({e.strerror or e})") from None
    if "\x00" in text:
        raise Fp8CookbookError(f"{source}: contains NUL bytes (a binary file?); {hint}")
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise Fp8CookbookError(f"{source}: no prompts in the file; {hint} ('#' lines are comments)")
    if limit is not None:
        if limit > len(prompts):
            raise Fp8CookbookError(f"{source}: {limit} calibration prompts asked for, the file has {len(prompts)}")
        prompts = prompts[:limit]
    return prompts


@dataclass
class QuantizeResult:
    """What `quantize_pipeline` wrote (final paths) and how it calibrated; `lines()` is the printed summary."""

    family: str
    output_dir: Path
    paths: dict[str, dict[str, Path]]  # per transformer name: {"base", "state", "export", "fp8"}
    convert_stats: dict[str, ConvertStats]
    calibration: dict[str, Any]  # prompts, steps, seeds, size, guidance, forward calls and timesteps per transformer
    seconds: float
    peak_memory_mb: float  # CPU: this process's VmHWM (reset at the start where Linux allows)
    peak_cuda_memory_mb: float | None = None  # torch.cuda.max_memory_allocated, when the transformers are on CUDA

    def lines(self) -> list[str]:
        c = self.calibration
        n = len(c["prompts"])
        size = f"{c['width']}x{c['height']}" + (f"x{c['num_frames']}f" if c.get("num_frames") else "")
        seeds = f"seed {c['seed']}" if n == 1 else f"seeds {c['seed']}..{c['seed'] + n - 1}"
        out = [
            f"family           {self.family}",
            f"calibration      {n} prompt(s) x {c['num_inference_steps']} steps, {seeds}, {size}, "
            f"guidance {c['guidance_scale']}, {c['dtype']} on {c['device']}" + (", +MHA" if c.get("quantize_mha") else ""),
            "forward calls    " + ", ".join(f"{name} {calls}" for name, calls in c["forward_calls"].items()),
        ]
        for name, p in self.paths.items():
            s = self.convert_stats[name]
            out.append(f"{name:16s} {s.quantized_weights} FP8 layers, {s.bf16_fallback_weights} BF16 fallback, "
                       f"{s.preserved_ignored_weights} other BF16 -> {p['fp8']}")
        out.append(f"output           {self.output_dir}")
        out.append(f"time             {self.seconds:.1f} s")
        memory = f"peak memory      {self.peak_memory_mb:.0f} MB CPU (VmHWM)"
        if self.peak_cuda_memory_mb is not None:
            memory += f", {self.peak_cuda_memory_mb:.0f} MB CUDA (max allocated)"
        out.append(memory)
        return out


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def _is_tiny(model: nn.Module, family: Family) -> bool:
    """The tiny test transformer, recognised by its config (so the tiny calibration defaults apply)."""
    config = dict(model.config)
    return all(_as_json(config.get(k)) == v for k, v in _as_json(family.tiny_config).items())


def _calibration_settings(family: Family, tiny: bool, *, num_inference_steps: int | None, height: int | None,
                          width: int | None, num_frames: int | None, guidance_scale: float | None) -> dict[str, Any]:
    """height, width, num_frames, num_inference_steps, guidance_scale: given values over tiny or real defaults."""
    if num_frames is not None and not family.is_video:
        raise Fp8CookbookError(f"{family.title} makes images: num_frames (--frames) applies to the Wan2.2 families")
    if tiny:
        settings = default_tiny_settings(family.name)
    else:
        settings = dict(height=family.height, width=family.width, num_frames=family.num_frames,
                        num_inference_steps=min(REAL_CALIB_STEPS, family.num_steps), guidance_scale=family.guidance_scale)
    given = dict(height=height, width=width, num_frames=num_frames, num_inference_steps=num_inference_steps,
                 guidance_scale=guidance_scale)
    for key, value in given.items():
        if value is None:
            continue
        if key != "guidance_scale" and (isinstance(value, bool) or int(value) != value or value < 1):
            raise Fp8CookbookError(f"{key} must be a positive integer, got {value!r}")
        settings[key] = value
    return settings


def _local_base(model: nn.Module) -> Path | None:
    """The folder the transformer was loaded from, if it can serve as the converter's BF16 base: a local folder
    with config.json of the same class whose tensors are all BF16 and match the model's names and shapes."""
    source = model.config.get("_name_or_path") if hasattr(model.config, "get") else None
    if not source:
        return None
    folder = Path(str(source)).expanduser()
    try:
        if not (folder / "config.json").is_file():
            return None
        config = json.loads((folder / "config.json").read_text())
        tensors = scan_tensors(folder)
    except (OSError, ValueError, Fp8CookbookError):
        return None
    if config.get("_class_name") != type(model).__name__:
        return None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if set(shapes) != set(tensors) or any(tensors[k].shape != s for k, s in shapes.items()):
        return None
    if any(t.dtype.is_floating_point and t.dtype != torch.bfloat16 for t in tensors.values()):
        return None
    return folder.resolve()


@torch.no_grad()
def _save_bf16(model: nn.Module, folder: Path) -> Path:
    """`save_pretrained` layout in BF16 (the converter copies fallback layers from here as they are)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    with _quiet():
        if all(t.dtype == torch.bfloat16 for t in floats):
            model.save_pretrained(folder)
        else:  # e.g. a float32 pipeline on CPU: cast per tensor, never the model itself
            model.save_config(folder)
            state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).detach().cpu().contiguous()
                     for k, v in model.state_dict().items()}
            save_file(state, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    return folder


def _missing_amaxes(model: nn.Module) -> list[str]:
    """Enabled quantizers without a finite positive amax, by module name."""
    bad = []
    for name, q in _tensor_quantizers(model):
        amax = q.amax
        if q.is_enabled and (amax is None or not bool(torch.isfinite(amax).all()) or not bool((amax > 0).all())):
            bad.append(name)
    return bad


def _no_amax_message(family: Family, name: str, bad: list[str], calibration: dict[str, Any]) -> str:
    shown = ", ".join(bad[:6]) + (f", ... (+{len(bad) - 6} more)" if len(bad) > 6 else "")
    head = f"{name}: {len(bad)} enabled quantizer(s) got no amax from calibration: {shown}. "
    calls = calibration["forward_calls"][name]
    steps = calibration["num_inference_steps"]
    if calls == 0 and family.boundary_ratio is not None and len(family.experts) > 1:
        boundary = family.boundary_ratio * 1000
        seen = sorted({t for ts in calibration["timesteps"].values() for t in ts}, reverse=True)
        side = f"at or above {boundary:g}" if name == family.experts[0] else f"below {boundary:g}"
        return (head + f"This expert never ran: the {steps} calibration step(s) had timesteps {seen}, and {name} only "
                f"runs at timesteps {side} (boundary_ratio {family.boundary_ratio}). Calibrate with more steps "
                "(--calib-steps / num_inference_steps) so that the schedule reaches both experts.")
    if calls == 0:
        return head + "The transformer never ran during calibration."
    return (head + f"The transformer ran {calls} time(s) but these layers never saw non-zero input; calibrate "
            "with more prompts or steps.")


def _calibrate_together(pipe, family: Family, names: list[str], prompts: list[str], settings: dict[str, Any], *,
                        seed: int, quantize_mha: bool, progress: bool) -> tuple[dict[str, int], dict[str, list[float]]]:
    """Insert quantizers into every transformer, then run the pipeline once over all prompts calibrating them all.

    `mtq.quantize` calls its forward loop between inserting quantizers and reading the amaxes, so nesting one call
    per transformer inside the previous one's loop has all of them collecting statistics during the same
    pipeline runs: Wan2.2 A14B's experts each see exactly the steps the pipeline routes to them.
    """
    from tqdm.auto import tqdm

    mtq, _ = _modelopt()
    calls = {n: 0 for n in names}
    timesteps: dict[str, set[float]] = {n: set() for n in names}
    user_stdout = sys.stdout

    def count(name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls[name] += 1
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if isinstance(t, torch.Tensor) and t.numel():
            timesteps[name].add(round(float(t.detach().float().max()), 4))

    def run() -> None:
        from transformers.utils import logging as transformers_logging

        hooks = [getattr(pipe, n).register_forward_pre_hook(lambda m, a, k, n=n: count(n, m, a, k), with_kwargs=True)
                 for n in names]
        level = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # "sequence longer than 77": CLIP truncates long prompts, as meant
        try:
            with contextlib.redirect_stdout(user_stdout), tqdm(prompts, desc="calibrate", unit="prompt",
                                                               disable=not progress) as bar:
                for i, prompt in enumerate(bar):
                    pipe(**generation_kwargs(family, pipe, prompt=prompt, seed=seed + i, output_type="latent",
                                             **settings))
                    bar.set_postfix(calls)
        finally:
            transformers_logging.set_verbosity(level)
            for h in hooks:
                h.remove()

    def nest(i: int) -> None:
        if i == len(names):
            run()
            return
        model = getattr(pipe, names[i])
        cfg = fp8_diffusion_quant_cfg(quantize_mha)
        cfg["quant_cfg"] = cfg["quant_cfg"] + _skip_entries(model, family)
        with _quiet():
            quantized = mtq.quantize(model, cfg, lambda _m: nest(i + 1))
        if quantized is not model:
            setattr(pipe, names[i], quantized)

    with torch.no_grad():
        nest(0)
    if quantize_mha:
        for n in names:
            if not any(q.endswith("_bmm_quantizer") and m.is_enabled for q, m in _tensor_quantizers(getattr(pipe, n))):
                raise Fp8CookbookError("quantize_mha found no attention quantizers: ModelOpt's diffusers plugin did "
                                       f"not load (it needs `onnx`); install it: {_INSTALL_HINT}")
    return calls, {n: sorted(ts, reverse=True) for n, ts in timesteps.items()}


def _reset_peak_memory(device: torch.device) -> None:
    try:  # Linux: "5" resets VmHWM to the current RSS, so the peak is this call's
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _move_into_place(tmp: Path, output_dir: Path) -> None:
    if not output_dir.exists():
        os.replace(tmp, output_dir)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
    try:
        os.replace(output_dir, trash / "old")
        try:
            os.replace(tmp, output_dir)
        except OSError:
            os.replace(trash / "old", output_dir)  # put the previous output back
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


_CALIBRATE_HINT = ("calibrate at a smaller size (--height/--width, --frames for video) or keep the text encoders on "
                   "the CPU; the transformer(s) must fit the GPU")
_EXPORT_HINT = "export converts the transformer in place on its device: free GPU memory held by other components"


def _stage(log: StageLog | None, name: str, **kwargs: Any):
    """`log.stage(...)`, or nothing when no log was given."""
    return contextlib.nullcontext() if log is None else log.stage(name, **kwargs)


def _named(stage: str, expert: str, names: list[str]) -> str:
    return stage if len(names) == 1 else f"{stage}-{expert}"


def quantize_pipeline(family: str | Family, pipe, output_dir: str | Path, *, prompts: list[str] | None = None,
                      num_prompts: int | None = None, num_inference_steps: int | None = None, seed: int = 0,
                      height: int | None = None, width: int | None = None, num_frames: int | None = None,
                      guidance_scale: float | None = None, quantize_mha: bool = True, overwrite: bool = False,
                      progress: bool = True, stages: StageLog | None = None) -> QuantizeResult:
    """Quantize every transformer of a diffusers pipeline to FP8 with ModelOpt, calibrating on the real pipeline,
    and write each as a ModelOpt state, a ModelOpt export and an SGLang FP8 checkpoint.

    Calibration runs `pipe` over the prompts (prompt i with seed `seed + i`, latents only, no VAE decode) after
    FP8 quantizers (`fp8_diffusion_quant_cfg`, the family's sensitive layers disabled) have been inserted into all
    transformers, so one pass calibrates them all: Wan2.2 A14B's `transformer` sees the steps at or above the
    boundary, `transformer_2` those below. Any enabled quantizer left without an amax stops the run with an error
    naming it (and, for an expert that never ran, the timesteps that were used). `quantize_mha` (on by default)
    also calibrates the attention Q/K/V inputs; their scales go to the side file that fp8cookbook's FP8 attention
    reads (SGLang does not).

    Defaults when None: `prompts` = the shipped `calibration_prompts()`; `num_prompts` = all given prompts, or of the
    shipped file 4 (tiny pipeline), 64 (image) or 16 (video); size, steps and guidance = `default_tiny_settings`
    for the tiny pipelines, else the family's size and guidance with `REAL_CALIB_STEPS` (20) steps.

    Output layout (written into a temporary folder beside `output_dir`, renamed in only when everything
    succeeded; an existing `output_dir` is refused unless `overwrite`)::

        output_dir/
          <name>.pt          ModelOpt state (`save_modelopt_state`): quantizer config and amaxes, without the
                             weights (the export has them in FP8, base/ in BF16) unless the export is BF16-flavour;
                             the fake-quant reference is `load_fake_quant(paths[name]["base"], <name>.pt)`
          export/<name>/     ModelOpt export (`export_hf_checkpoint`): FP8 weights, 0-d scales, quantization_config
          fp8/<name>/        SGLang FP8 checkpoint (`convert_checkpoint`): `--transformer-path` for SGLang
          base/<name>/       BF16 weights saved before quantizing, only when the pipeline's own transformer folder
                             (`config._name_or_path`, BF16) is not available; that folder is the base otherwise
          quantize.json      calibration settings, paths, conversion stats, time and memory

    `<name>` is `transformer` (and `transformer_2` for Wan2.2 A14B). The transformers are changed in place and
    hold FP8 export weights afterwards: reload the pipeline to generate with it.

    `stages` records the steps (base, calibrate, state, export, convert: time, peak memory, bytes written; see
    `fp8cookbook.stages`) into that log and quantize.json; an out-of-memory in one is one line naming it.
    """
    t0 = time.perf_counter()
    family = get_family(family) if isinstance(family, str) else family
    _modelopt()
    names = transformer_names(pipe)
    if names != list(family.experts):
        raise Fp8CookbookError(f"the pipeline has transformers {names}, but {family.title} has {list(family.experts)}")
    models = {n: getattr(pipe, n) for n in names}
    for n, model in models.items():
        if type(model).__name__ != family.class_name:
            raise Fp8CookbookError(f"pipe.{n} is a {type(model).__name__}; {family.title} needs {family.class_name}")
        if any(True for _ in _tensor_quantizers(model)):
            raise Fp8CookbookError(f"pipe.{n} already holds ModelOpt quantizers: reload the pipeline and quantize once")

    tiny = _is_tiny(models[names[0]], family)
    if prompts is None:
        prompts = calibration_prompts()
        default_n = DEFAULT_NUM_PROMPTS["tiny" if tiny else "video" if family.is_video else "image"]
    else:
        prompts = [str(p) for p in prompts]
        default_n = len(prompts)
        if not prompts or not all(p.strip() for p in prompts):
            raise Fp8CookbookError("calibration prompts must be a non-empty list of non-empty strings")
    if num_prompts is None:
        prompts = prompts[:default_n]
    elif isinstance(num_prompts, bool) or int(num_prompts) != num_prompts or num_prompts < 1:
        raise Fp8CookbookError(f"num_prompts must be a positive integer, got {num_prompts!r}")
    elif num_prompts > len(prompts):
        raise Fp8CookbookError(f"{num_prompts} calibration prompts asked for, {len(prompts)} available")
    else:
        prompts = prompts[:num_prompts]
    settings = _calibration_settings(family, tiny, num_inference_steps=num_inference_steps, height=height,
                                     width=width, num_frames=num_frames, guidance_scale=guidance_scale)

    output_dir = Path(output_dir).expanduser()
    bases = {n: _local_base(model) for n, model in models.items()}
    target = output_dir.resolve()
    for n, base in bases.items():
        if base is not None and (target == base or target in base.parents):
            raise Fp8CookbookError(f"{output_dir}: holds the pipeline's own {n} weights ({base}); choose another folder")
    if output_dir.exists() and not overwrite:
        raise Fp8CookbookError(f"{output_dir}: already exists (pass --overwrite / overwrite=True to replace it)")
    if output_dir.exists() and not output_dir.is_dir():
        raise Fp8CookbookError(f"{output_dir}: exists and is not a folder")

    first = next(models[names[0]].parameters())
    _reset_peak_memory(first.device)
    created = [p for p in output_dir.absolute().parents if not p.exists()]  # removed again on failure
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        paths: dict[str, dict[str, Path]] = {}
        for n, model in models.items():  # BF16 base first: quantization changes the weights
            if bases[n] is None:
                with _stage(stages, _named("base", n, names), output=tmp / "base" / n):
                    base = _save_bf16(model, tmp / "base" / n)
            else:
                base = bases[n]
            paths[n] = {"base": base, "state": tmp / f"{n}.pt", "export": tmp / "export" / n, "fp8": tmp / "fp8" / n}

        with _stage(stages, "calibrate", hint=_CALIBRATE_HINT, prompts=len(prompts), **settings):
            calls, timesteps = _calibrate_together(pipe, family, names, prompts, settings, seed=seed,
                                                   quantize_mha=quantize_mha, progress=progress)
        calibration: dict[str, Any] = dict(
            prompts=list(prompts), seed=seed, **settings, quantize_mha=quantize_mha,
            dtype=str(first.dtype).replace("torch.", ""), device=str(first.device), tiny=tiny,
            forward_calls=calls, timesteps=timesteps)
        problems = [_no_amax_message(family, n, bad, calibration)
                    for n in names if (bad := _missing_amaxes(getattr(pipe, n)))]
        if problems:
            raise Fp8CookbookError(" | ".join(problems))

        stats: dict[str, ConvertStats] = {}
        for n in names:
            model = getattr(pipe, n)
            # Without the weights: the export holds them in FP8 and the base in BF16. An export without FP8 weights
            # (BF16 flavour, left by offloaded calibration) did not convert the model in place: the full state then.
            with _stage(stages, _named("state", n, names), output=paths[n]["state"]):
                save_modelopt_state(model, paths[n]["state"], weights=False)
            with _stage(stages, _named("export", n, names), output=paths[n]["export"], hint=_EXPORT_HINT):
                export_transformer(model, paths[n]["export"])  # FP8 in place: the model cannot run afterwards
            if not export_has_fp8_weights(paths[n]["export"]):
                with _stage(stages, _named("state-full", n, names), output=paths[n]["state"]):
                    save_modelopt_state(model, paths[n]["state"], weights=True)
            with _stage(stages, _named("convert", n, names), output=paths[n]["fp8"]):
                stats[n] = convert_checkpoint(paths[n]["export"], paths[n]["fp8"], state_file=paths[n]["state"],
                                              base_transformer=paths[n]["base"], family=family.name,
                                              progress=progress)

        def final(p: Path) -> Path:
            return output_dir / p.relative_to(tmp) if p.is_relative_to(tmp) else p

        paths = {n: {k: final(p) for k, p in entry.items()} for n, entry in paths.items()}
        for n, s in stats.items():  # the converter recorded the temporary folder's paths
            s.export_dir, s.output_dir = str(paths[n]["export"]), str(paths[n]["fp8"])
            write_json_atomic(tmp / "fp8" / n / STATS_NAME, asdict(s))
        result = QuantizeResult(family.name, output_dir, paths, stats, calibration, 0.0, 0.0)
        result.seconds = time.perf_counter() - t0
        result.peak_memory_mb = peak_rss_mb()
        if first.device.type == "cuda":
            result.peak_cuda_memory_mb = torch.cuda.max_memory_allocated(first.device) / 2**20
        summary = _summary(result)
        if stages is not None:
            for record in stages.records:  # they name the temporary folder
                record.output = [str(final(Path(o))) for o in record.output]
            summary["stages"] = stages.as_dicts()
        write_json_atomic(tmp / "quantize.json", summary)
        _move_into_place(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # deepest first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    return result


def _summary(result: QuantizeResult) -> dict[str, Any]:
    import modelopt

    from . import __version__

    def rel(p: Path) -> str:
        return str(p.relative_to(result.output_dir)) if p.is_relative_to(result.output_dir) else str(p)

    return {
        "family": result.family,
        "producer": {"fp8cookbook": __version__, "modelopt": getattr(modelopt, "__version__", None),
                     "torch": torch.__version__},
        "quant_cfg": fp8_diffusion_quant_cfg(result.calibration["quantize_mha"]),
        "calibration": result.calibration,
        "paths": {n: {k: rel(p) for k, p in entry.items()} for n, entry in result.paths.items()},
        "convert_stats": {n: asdict(s) for n, s in result.convert_stats.items()},
        "seconds": round(result.seconds, 3),
        "peak_memory_mb": round(result.peak_memory_mb, 1),
        "peak_cuda_memory_mb": result.peak_cuda_memory_mb,
    }
