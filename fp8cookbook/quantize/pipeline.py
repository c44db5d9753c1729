"""`quantize_pipeline`: calibrate every transformer of a pipeline with ModelOpt and write the state, the ModelOpt
export and the SGLang FP8 checkpoint of each, atomically (a temporary folder renamed in at the end).
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..checkpoint import STATS_NAME, keeps_float32, scan_tensors, write_json_atomic
from ..convert import ConvertStats, convert_checkpoint, peak_rss_mb
from ..errors import Fp8CookbookError
from ..files import plain_modes, staged_dir
from ..offload import release_memory
from ..fp8.linear import FP8Linear
from ..fp8.quantize import fp8_candidates
from ..families import Family, get_family
from ..pipelines import require_components, transformer_names
from ..stages import StageLog
from .calibration import (DEFAULT_NUM_PROMPTS, calibrate_together, calibration_settings, is_tiny,
                          no_amax_message, calibration_prompts)
from .export import export_has_fp8_weights, export_transformer, save_modelopt_state
from .recipe import missing_amaxes, quiet_modelopt, fp8_diffusion_quant_cfg, require_modelopt, tensor_quantizers

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
    repo: Path | None = None  # the full diffusers repo (`full_repo=True`): `sglang generate --model-path` alone

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
        if self.repo is not None:
            out.append(f"full repo        {self.repo}")
        out.append(f"output           {self.output_dir}")
        out.append(f"time             {self.seconds:.1f} s")
        memory = f"peak memory      {self.peak_memory_mb:.0f} MB CPU (VmHWM)"
        if self.peak_cuda_memory_mb is not None:
            memory += f", {self.peak_cuda_memory_mb:.0f} MB CUDA (max allocated)"
        out.append(memory)
        return out


def _local_base(model: nn.Module) -> Path | None:
    """The folder the transformer was loaded from, if it can serve as the converter's BF16 base: a local folder
    with config.json of the same class whose tensors match the model's names and shapes and are BF16 (float32
    where `from_pretrained` keeps them so: `keeps_float32`). Anything else gets a BF16 copy written."""
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
    def as_loaded(name: str, dtype: torch.dtype) -> bool:  # a real Wan2.2 download: float32 time embedders
        return dtype == torch.bfloat16 or (dtype == torch.float32 and keeps_float32(model, name))

    if any(t.dtype.is_floating_point and not as_loaded(k, t.dtype) for k, t in tensors.items()):
        return None
    return folder.resolve()


@torch.no_grad()
def _save_bf16(model: nn.Module, folder: Path) -> Path:
    """`save_pretrained` layout in BF16 (the converter copies fallback layers from here as they are)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    with quiet_modelopt():
        if all(t.dtype == torch.bfloat16 for t in floats):
            model.save_pretrained(folder)
        else:  # e.g. a float32 pipeline on CPU: cast per tensor, never the model itself
            model.save_config(folder)
            state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).detach().cpu().contiguous()
                     for k, v in model.state_dict().items()}
            save_file(state, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    plain_modes(folder)  # safetensors writes 0600 files
    return folder


def _reset_peak_memory(device: torch.device) -> None:
    try:  # Linux: "5" resets VmHWM to the current RSS, so the peak is this call's
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def quantize_pipeline(family: str | Family, pipe, output_dir: str | Path, *, prompts: list[str] | None = None,
                      num_prompts: int | None = None, num_inference_steps: int | None = None, seed: int = 0,
                      height: int | None = None, width: int | None = None, num_frames: int | None = None,
                      guidance_scale: float | None = None, quantize_mha: bool = True, overwrite: bool = False,
                      progress: bool = True, stages: StageLog | None = None, full_repo: bool = False,
                      link: str = "hardlink", keep_pipeline: bool = True, keep_export: bool = True) -> QuantizeResult:
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
          repo/              only with `full_repo`: a complete diffusers repo (`repo.write_full_repo`): the
                             pipeline's other components (`link`: hard links, symbolic links or copies), its
                             model_index.json, each FP8 transformer in its component folder, a model card;
                             `sglang generate --model-path output_dir/repo` serves it alone
          quantize.json      calibration settings, paths, conversion stats, time and memory

    `<name>` is `transformer` (and `transformer_2` for Wan2.2 A14B). The caller's pipeline is left as it was:
    calibration and export run on copies of the transformers swapped in for the call (on a GPU the originals wait
    on the CPU meanwhile, so the GPU holds one set), and the originals go back afterwards, also on failure.

    `keep_pipeline=False` quantizes the pipeline's own transformers instead of copies and leaves None in their place
    (also on failure): for a caller that reloads the BF16 pipeline anyway (the notebook, the CLI), it saves holding
    the originals in host memory meanwhile (57 GB for Wan2.2 T2V-A14B, 64 GB for FLUX.2-dev) and the copy's time.
    `keep_export=False` removes each ModelOpt export once its FP8 checkpoint is written (`paths[name]` then has no
    "export"): the export is the second FP8 copy of the weights on disk, needed only to convert again (`keep_bf16`).

    `stages` records the steps (base, calibrate, state, export, convert: time, peak memory, bytes written; see
    `fp8cookbook.stages`) into that log and quantize.json; an out-of-memory in one is one line naming it.
    """
    t0 = time.perf_counter()
    family = get_family(family) if isinstance(family, str) else family
    require_modelopt()
    models = _checked_models(family, pipe)
    names = list(models)
    tiny = is_tiny(models[names[0]], family)
    prompts = _chosen_prompts(prompts, num_prompts, DEFAULT_NUM_PROMPTS["tiny" if tiny else "video" if family.is_video
                                                                        else "image"])
    settings = calibration_settings(family, tiny, num_inference_steps=num_inference_steps, height=height,
                                     width=width, num_frames=num_frames, guidance_scale=guidance_scale)
    output_dir = Path(output_dir).expanduser()
    bases = {n: _local_base(model) for n, model in models.items()}
    _check_output_dir(output_dir, bases, overwrite)
    repo_base = _repo_base(pipe, link) if full_repo else None  # refused before calibrating, not after

    # ModelOpt and its export change modules in place: copies, unless the caller gives its transformers up
    with _working_copies(pipe, names) if keep_pipeline else _given_up(pipe, names):
        models = {n: getattr(pipe, n) for n in names}
        first = next(models[names[0]].parameters())
        _reset_peak_memory(first.device)
        # staged beside output_dir with the umask's modes (not mkdtemp's 0700), renamed in on success (an old
        # output swapped out in one step), removed with the parents it created on failure
        with staged_dir(output_dir, overwrite=overwrite) as tmp:
            paths: dict[str, dict[str, Path]] = {}
            for n, model in models.items():  # BF16 base first: quantization changes the weights
                if bases[n] is None:
                    with _stage(stages, _named("base", n, names), output=tmp / "base" / n):
                        base = _save_bf16(model, tmp / "base" / n)
                else:
                    base = bases[n]
                paths[n] = {"base": base, "state": tmp / f"{n}.pt", "export": tmp / "export" / n, "fp8": tmp / "fp8" / n}
            with _stage(stages, "calibrate", hint=_CALIBRATE_HINT, prompts=len(prompts), **settings):
                calls, timesteps = calibrate_together(pipe, family, names, prompts, settings, seed=seed,
                                                      quantize_mha=quantize_mha, progress=progress)
            calibration: dict[str, Any] = dict(
                prompts=list(prompts), seed=seed, **settings, quantize_mha=quantize_mha,
                dtype=str(first.dtype).replace("torch.", ""), device=str(first.device), tiny=tiny,
                forward_calls=calls, timesteps=timesteps)
            problems = [no_amax_message(family, n, bad, calibration)
                        for n in names if (bad := missing_amaxes(getattr(pipe, n)))]
            if problems:
                raise Fp8CookbookError(" | ".join(problems))
            stats = _write_checkpoints(pipe, family, names, paths, progress, stages, keep_export)
            paths = _final_paths(paths, stats, tmp, output_dir, stages)
            result = QuantizeResult(family.name, output_dir, paths, stats, calibration, 0.0, 0.0)
            if repo_base is not None:
                _write_repo(repo_base, pipe, family, names, tmp, link, tiny)
                result.repo = output_dir / "repo"
            result.seconds = time.perf_counter() - t0
            result.peak_memory_mb = peak_rss_mb()
            if first.device.type == "cuda":
                result.peak_cuda_memory_mb = torch.cuda.max_memory_allocated(first.device) / 2**20
            summary = _summary(result)
            if stages is not None:
                summary["stages"] = stages.as_dicts()
            write_json_atomic(tmp / "quantize.json", summary)
        return result


def _repo_base(pipe, link: str) -> Path:
    """The pipeline's own folder (local, or its hub id in the local cache): a full repo takes its other components."""
    from ..repo import LINK_MODES, local_pipeline_dir

    if link not in LINK_MODES:
        raise Fp8CookbookError(f"link must be one of {', '.join(LINK_MODES)}, got {link!r}")
    source = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if not source:
        raise Fp8CookbookError("full_repo needs the pipeline's own folder (load it with from_pretrained / "
                               "load_pipeline); this pipeline was built in memory")
    return local_pipeline_dir(source)


def _write_repo(base: Path, pipe, family: Family, names: list[str], tmp: Path, link: str, tiny: bool) -> None:
    from ..repo import write_full_repo

    source = str(getattr(pipe, "name_or_path", "") or "")
    hub_id = source if not Path(source).expanduser().exists() and "/" in source else None
    write_full_repo(base, {n: tmp / "fp8" / n for n in names}, tmp / "repo", link=link,
                    base_model=hub_id or (None if tiny else family.hub_id), family_title=family.title,
                    video=family.is_video, extra_flags=family.sglang_extra_flags)


@contextlib.contextmanager
def _working_copies(pipe, names: list[str]) -> Iterator[None]:
    """Deep copies of `pipe`'s transformers swapped in for the block, the caller's own put back afterwards.

    ModelOpt turns nn.Linear layers into QuantLinear in place and its export writes FP8 weights in place, and it
    has no call that undoes either: so they happen to copies. Originals on a GPU wait on the CPU meanwhile (one set
    of weights on the GPU, as before) and return to their device, success or failure.
    """
    own = {n: getattr(pipe, n) for n in names}
    devices = {n: next(m.parameters()).device for n, m in own.items()}
    try:
        for n, model in own.items():
            if devices[n].type != "cpu":
                model.to("cpu")
            setattr(pipe, n, copy.deepcopy(model).to(devices[n]))
        yield
    finally:
        for n, model in own.items():
            setattr(pipe, n, model)  # the copies are dropped here, before the originals return to the GPU
        if any(d.type == "cuda" for d in devices.values()):
            torch.cuda.empty_cache()
        for n, model in own.items():
            model.to(devices[n])


@contextlib.contextmanager
def _given_up(pipe, names: list[str]) -> Iterator[None]:
    """The pipeline's own transformers are quantized in place and set to None afterwards, success or failure: an
    exported transformer holds FP8 weights in BF16 modules and must not run again."""
    try:
        yield
    finally:
        for n in names:
            setattr(pipe, n, None)
        release_memory()


def _checked_models(family: Family, pipe) -> dict[str, nn.Module]:
    """The pipeline's transformers by name, refused unless they are the family's, of its class, not quantized yet."""
    require_components(pipe, family, "calibration")
    names = transformer_names(pipe)
    if names != list(family.experts):
        raise Fp8CookbookError(f"the pipeline has transformers {names}, but {family.title} has {list(family.experts)}")
    models = {n: getattr(pipe, n) for n in names}
    for n, model in models.items():
        if type(model).__name__ != family.class_name:
            raise Fp8CookbookError(f"pipe.{n} is a {type(model).__name__}; {family.title} needs {family.class_name}")
        if any(True for _ in tensor_quantizers(model)):
            raise Fp8CookbookError(f"pipe.{n} already holds ModelOpt quantizers: reload the pipeline and quantize once")
        if any(isinstance(m, FP8Linear) for m in model.modules()):
            raise Fp8CookbookError(f"pipe.{n} already holds FP8 layers (an FP8 checkpoint): quantize the BF16 pipeline")
        if not fp8_candidates(model, family):  # else ModelOpt stops after the base copy with a raw RuntimeError
            rules = "; ".join(r.why for r in family.sensitive(dict(model.config)))
            raise Fp8CookbookError(f"pipe.{n}: no Linear layer may become FP8: every one is kept BF16 by "
                                   f"{family.title}'s rules ({rules}); a model this shallow has nothing to quantize")
    return models


def _chosen_prompts(prompts: list[str] | None, num_prompts: int | None, shipped_default: int) -> list[str]:
    """The calibration prompts: the shipped file's first `shipped_default`, or the given ones; `num_prompts` cuts."""
    if prompts is None:
        prompts = calibration_prompts()
        default_n = shipped_default
    else:
        prompts = [str(p) for p in prompts]
        default_n = len(prompts)
        if not prompts or not all(p.strip() for p in prompts):
            raise Fp8CookbookError("calibration prompts must be a non-empty list of non-empty strings")
    if num_prompts is None:
        return prompts[:default_n]
    if isinstance(num_prompts, bool) or int(num_prompts) != num_prompts or num_prompts < 1:
        raise Fp8CookbookError(f"num_prompts must be a positive integer, got {num_prompts!r}")
    if num_prompts > len(prompts):
        raise Fp8CookbookError(f"{num_prompts} calibration prompts asked for, {len(prompts)} available")
    return prompts[:num_prompts]


def _check_output_dir(output_dir: Path, bases: dict[str, Path | None], overwrite: bool) -> None:
    """Refuse, before any slow work, an output folder that holds the pipeline's weights or exists unasked."""
    target = output_dir.resolve()
    for n, base in bases.items():
        if base is not None and (target == base or target in base.parents):
            raise Fp8CookbookError(f"{output_dir}: holds the pipeline's own {n} weights ({base}); choose another folder")
    if output_dir.exists() and not overwrite:
        raise Fp8CookbookError(f"{output_dir}: already exists (pass --overwrite / overwrite=True to replace it)")
    if output_dir.exists() and not output_dir.is_dir():
        raise Fp8CookbookError(f"{output_dir}: exists and is not a folder")


def _write_checkpoints(pipe, family: Family, names: list[str], paths: dict[str, dict[str, Path]],
                       progress: bool, stages: StageLog | None = None,
                       keep_export: bool = True) -> dict[str, ConvertStats]:
    """Per transformer: the ModelOpt state, the ModelOpt export, then the SGLang checkpoint converted from it.

    The state goes without the weights: the export holds them in FP8 and the base in BF16. An export without FP8
    weights (BF16 flavour, left by offloaded calibration) did not convert the model in place, so the full state
    is written then. Without `keep_export`, each export is removed once its checkpoint is written, so the disk
    holds at most one export at a time (and the export's model is released before the next one is written).
    """
    stats: dict[str, ConvertStats] = {}
    for n in names:
        model = getattr(pipe, n)
        with _stage(stages, _named("state", n, names), output=paths[n]["state"]):
            save_modelopt_state(model, paths[n]["state"], weights=False)
        with _stage(stages, _named("export", n, names), output=paths[n]["export"], hint=_EXPORT_HINT):
            export_transformer(model, paths[n]["export"])  # FP8 in place: the model cannot run afterwards
        if not export_has_fp8_weights(paths[n]["export"]):
            with _stage(stages, _named("state-full", n, names), output=paths[n]["state"]):
                save_modelopt_state(model, paths[n]["state"], weights=True)
        with _stage(stages, _named("convert", n, names), output=paths[n]["fp8"]):
            stats[n] = convert_checkpoint(paths[n]["export"], paths[n]["fp8"], state_file=paths[n]["state"],
                                          base_transformer=paths[n]["base"], family=family.name, progress=progress)
        if not keep_export:
            export = paths[n].pop("export")
            shutil.rmtree(export)
            if not any(export.parent.iterdir()):  # export/ itself, after the last expert
                export.parent.rmdir()
    return stats


_CALIBRATE_HINT = ("calibrate at a smaller size (--height/--width, --frames for video) or keep the text encoders on "
                   "the CPU; the transformer(s) must fit the GPU")
_EXPORT_HINT = "export converts the transformer in place on its device: free GPU memory held by other components"


def _stage(log: StageLog | None, name: str, **kwargs: Any):
    """`log.stage(...)`, or nothing when no log was given."""
    return contextlib.nullcontext() if log is None else log.stage(name, **kwargs)


def _named(stage: str, expert: str, names: list[str]) -> str:
    return stage if len(names) == 1 else f"{stage}-{expert}"


def _final_paths(paths: dict[str, dict[str, Path]], stats: dict[str, ConvertStats], tmp: Path,
                 output_dir: Path, stages: StageLog | None = None) -> dict[str, dict[str, Path]]:
    """The paths as they will be after the rename; the converter's stats files are rewritten to say so."""
    def final(p: Path) -> Path:
        return output_dir / p.relative_to(tmp) if p.is_relative_to(tmp) else p

    paths = {n: {k: final(p) for k, p in entry.items()} for n, entry in paths.items()}
    for n, s in stats.items():  # the converter recorded the temporary folder's paths
        # the export it came from, also where keep_export=False removed it (quantize.json's paths then lack it)
        s.export_dir, s.output_dir = str(final(Path(s.export_dir))), str(paths[n]["fp8"])
        write_json_atomic(tmp / "fp8" / n / STATS_NAME, asdict(s))
    for record in stages.records if stages is not None else []:  # they name the temporary folder too
        record.output = [str(final(Path(o))) for o in record.output]
    return paths


def _summary(result: QuantizeResult) -> dict[str, Any]:
    import modelopt

    from ..version import __version__

    def rel(p: Path) -> str:
        return str(p.relative_to(result.output_dir)) if p.is_relative_to(result.output_dir) else str(p)

    return {
        "family": result.family,
        "producer": {"fp8cookbook": __version__, "modelopt": getattr(modelopt, "__version__", None),
                     "torch": torch.__version__},
        "quant_cfg": fp8_diffusion_quant_cfg(result.calibration["quantize_mha"]),
        "calibration": result.calibration,
        "paths": {n: {k: rel(p) for k, p in entry.items()} for n, entry in result.paths.items()},
        "repo": rel(result.repo) if result.repo is not None else None,
        "convert_stats": {n: asdict(s) for n, s in result.convert_stats.items()},
        "seconds": round(result.seconds, 3),
        "peak_memory_mb": round(result.peak_memory_mb, 1),
        "peak_cuda_memory_mb": result.peak_cuda_memory_mb,
    }
