"""Compare two denoising trajectories of one pipeline: reference transformer(s) against candidate ones.

Both runs go through the *same* pipeline object, so prompt encoding, scheduler, VAE, seed and settings are identical
by construction and only the swapped transformer(s) differ. The latents after every step are compared (cosine, MAE,
MSE, RMSE, max-abs, L2 and relative L2 of the difference, as SGLang's trajectory tool does), then the decoded uint8
frames (the same plus PSNR and SSIM) for the first, middle and all frames. The JSON form is documented in
docs/compare-report-schema.md; bump SCHEMA_VERSION on any change a reader could notice.

Memory: the reference trajectory is kept (on the CPU, in the latents' dtype); candidate latents are compared as they
arrive and dropped, so only one trajectory is ever held.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .version import __version__
from .errors import Fp8CookbookError
from .files import to_jsonable
from .families import Family, get_family
from .offload import module_device, one_expert_resident

SCHEMA_VERSION = 1


# ------------------------------------------------------------------------------------------------- metrics
def tensor_metrics(reference: torch.Tensor | np.ndarray, candidate: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Cosine similarity, MAE, MSE, RMSE, max-abs, L2 and relative L2 (||c - r|| / ||r||) of the difference.

    Computed in float64 over all elements, so BF16 latents do not round the metric itself. Conventions for the
    degenerate cases: two zero tensors have cosine 1; a zero and a nonzero one cosine 0; relative L2 against a zero
    reference is 0 when the candidate is zero too, else inf.
    """
    r = torch.as_tensor(reference).detach().to("cpu", torch.float64).flatten()
    c = torch.as_tensor(candidate).detach().to("cpu", torch.float64).flatten()
    if r.shape != c.shape:
        raise Fp8CookbookError(f"cannot compare tensors of {r.numel()} and {c.numel()} elements")
    d = c - r
    nr, nc, nd = r.norm().item(), c.norm().item(), d.norm().item()
    if nr == 0 or nc == 0:
        cosine = 1.0 if nr == nc else 0.0
    else:
        cosine = (r @ c).item() / (nr * nc)
    mse = d.square().mean().item()
    return {
        "cosine": cosine,
        "mae": d.abs().mean().item(),
        "mse": mse,
        "rmse": math.sqrt(mse) if mse >= 0 else math.nan,
        "max_abs": d.abs().max().item(),
        "l2": nd,
        "rel_l2": nd / nr if nr else (0.0 if nd == 0 else math.inf),
    }


def psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """PSNR of uint8 images, 20·log10(255) − 10·log10(MSE) (SGLang's formula); inf when identical."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(candidate, np.float64)) ** 2))
    return math.inf if mse == 0 else 20 * math.log10(255.0) - 10 * math.log10(mse)


def ssim(reference: np.ndarray, candidate: np.ndarray) -> float:
    """SSIM of two uint8 H x W x C frames (scikit-image, data_range 255).

    The window is 7 (scikit-image's default) or, for images smaller than that, the largest odd size that fits, so
    tiny test images work too.
    """
    from skimage.metrics import structural_similarity

    side = min(reference.shape[0], reference.shape[1])
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        raise Fp8CookbookError(f"SSIM needs frames of at least 3x3 pixels, got {reference.shape[0]}x{reference.shape[1]}")
    return float(structural_similarity(reference, candidate, channel_axis=-1, data_range=255, win_size=win))


def to_uint8_frames(output: torch.Tensor) -> np.ndarray:
    """Pipeline output (output_type="pt", values in [0, 1]) as uint8 frames F x H x W x C, rounded like diffusers.

    Images come as B x C x H x W, videos as B x F x C x H x W; batch and frames are flattened into one frame axis.
    """
    x = torch.as_tensor(output).detach().float().cpu()
    if x.dim() == 4:
        x = x.permute(0, 2, 3, 1)
    elif x.dim() == 5:
        x = x.permute(0, 1, 3, 4, 2).flatten(0, 1)
    else:
        raise Fp8CookbookError(f"expected decoded images (B,C,H,W) or video (B,F,C,H,W), got shape {list(x.shape)}")
    return (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def frame_sets(num_frames: int) -> dict[str, list[int]]:
    """Frame indices of the first, middle and all frames (for an image all three are frame 0)."""
    return {"first": [0], "middle": [num_frames // 2], "all": list(range(num_frames))}


def frame_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Decoded-output metrics: per frame PSNR/SSIM, and per frame set all latent metrics plus PSNR and SSIM.

    A set's PSNR comes from the MSE pooled over its frames; its SSIM is the mean of its frames' SSIM.
    """
    if reference.shape != candidate.shape:
        raise Fp8CookbookError(f"decoded outputs differ in shape: {list(reference.shape)} vs {list(candidate.shape)}")
    n = reference.shape[0]
    per_frame_ssim = [ssim(reference[i], candidate[i]) for i in range(n)]
    sets = {}
    for name, idx in frame_sets(n).items():
        m: dict[str, Any] = {"frames": idx, **tensor_metrics(reference[idx], candidate[idx])}
        m["psnr"] = psnr(reference[idx], candidate[idx])
        m["ssim"] = float(np.mean([per_frame_ssim[i] for i in idx]))
        sets[name] = m
    return {
        "num_frames": n,
        "height": int(reference.shape[1]),
        "width": int(reference.shape[2]),
        "frame_sets": sets,
        "per_frame": {"psnr": [psnr(reference[i], candidate[i]) for i in range(n)], "ssim": per_frame_ssim},
    }


# ---------------------------------------------------------------------------------------------- thresholds
@dataclass(frozen=True)
class Thresholds:
    """Pass/fail bounds; None leaves a metric unchecked. A NaN value misses every bound it is checked against."""

    min_cosine: float | None = None  # cosine of the final latents
    min_step_cosine: float | None = None  # cosine of the latents after every step
    max_rel_l2: float | None = None  # relative L2 of the final latents
    min_psnr: float | None = None  # dB, every frame set (first, middle, all)
    min_ssim: float | None = None  # every frame set

    def as_dict(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# The defaults of `fp8cookbook compare` and of the notebooks' parameters cells (generated from these): gates against
# broken FP8, set below SGLang's published checks; video (more steps, more tokens) drifts further than images.
IMAGE_THRESHOLDS = Thresholds(min_cosine=0.98, min_step_cosine=0.95, max_rel_l2=0.2, min_psnr=22.0, min_ssim=0.8)
VIDEO_THRESHOLDS = Thresholds(min_cosine=0.95, min_step_cosine=0.9, max_rel_l2=0.3, min_psnr=20.0, min_ssim=0.7)
IMAGE_PROMPT = "a photo of a red house by a lake at sunset"
VIDEO_PROMPT = "a fox walking through neon rain"


def default_thresholds(family: str | Family) -> Thresholds:
    """The bounds a comparison of this family is held to unless the user sets others."""
    fam = get_family(family) if isinstance(family, str) else family
    return VIDEO_THRESHOLDS if fam.is_video else IMAGE_THRESHOLDS


def default_prompt(family: str | Family) -> str:
    """The prompt a comparison of this family uses unless the user gives one."""
    fam = get_family(family) if isinstance(family, str) else family
    return VIDEO_PROMPT if fam.is_video else IMAGE_PROMPT


# -------------------------------------------------------------------------------------------------- report
@dataclass
class CompareReport:
    """Everything one comparison measured. `to_dict()` is the JSON document; the frames stay out of it."""

    family: str
    settings: dict[str, Any]
    reference: dict[str, Any]  # {"seconds": float, "components": {name: component info}}
    candidate: dict[str, Any]
    steps: list[dict[str, Any]]  # {"step", "timestep", "experts", "latents": {metric: value}}
    decoded: dict[str, Any]  # frame_metrics(...)
    environment: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    reference_frames: np.ndarray | None = field(default=None, repr=False)
    candidate_frames: np.ndarray | None = field(default=None, repr=False)

    @property
    def final_latents(self) -> dict[str, float]:
        return self.steps[-1]["latents"]

    def failures(self, thresholds: Thresholds) -> list[str]:
        """One line per missed bound, naming the metric, the step or frame set, the value and the bound."""
        out = []

        def check(what: str, value: float, bound: float | None, name: str, lower: bool) -> None:
            if bound is None:
                return
            ok = value >= bound if lower else value <= bound  # False for NaN
            if not ok:
                out.append(f"{what} = {_fmt(value, 10)} {'<' if lower else '>'} {name} {bound:.10g}")

        last = self.steps[-1]
        check(f"final latent cosine (step {last['step']})", last["latents"]["cosine"], thresholds.min_cosine,
              "min_cosine", True)
        check(f"final latent rel_l2 (step {last['step']})", last["latents"]["rel_l2"], thresholds.max_rel_l2,
              "max_rel_l2", False)
        for s in self.steps:
            check(f"latent cosine at step {s['step']}", s["latents"]["cosine"], thresholds.min_step_cosine,
                  "min_step_cosine", True)
        for name, m in _distinct_sets(self.decoded["frame_sets"]):
            where = f"frame{'s' if len(m['frames']) > 1 else ''} {_span(m['frames'])} ({name})"
            check(f"PSNR over {where}", m["psnr"], thresholds.min_psnr, "min_psnr", True)
            check(f"SSIM over {where}", m["ssim"], thresholds.min_ssim, "min_ssim", True)
        return out

    def to_dict(self, thresholds: Thresholds | None = None) -> dict[str, Any]:
        """The JSON document (schema in docs/compare-report-schema.md); inf and NaN become null."""
        thresholds = thresholds or Thresholds()
        return to_jsonable({
            "schema_version": SCHEMA_VERSION,
            "tool": f"fp8cookbook {__version__}",
            "created": self.created,
            "family": self.family,
            "settings": self.settings,
            "environment": self.environment,
            "reference": self.reference,
            "candidate": self.candidate,
            "steps": self.steps,
            "final_latents": self.final_latents,
            "decoded": self.decoded,
            "thresholds": thresholds.as_dict(),
            "failures": self.failures(thresholds),
        })

    def summary_lines(self) -> list[str]:
        """A table for the terminal: every step's latent metrics, then each frame set's PSNR and SSIM."""
        lines = [f"{'step':>4s} {'timestep':>9s} {'expert':14s} {'cosine':>12s} {'rel_l2':>10s} {'mae':>10s} "
                 f"{'max_abs':>10s}"]
        for s in self.steps:
            m = s["latents"]
            lines.append(f"{s['step']:4d} {s['timestep']:9.2f} {'+'.join(s['experts']) or '-':14s} "
                         f"{_fmt(m['cosine'], 8):>12s} {_fmt(m['rel_l2']):>10s} {_fmt(m['mae']):>10s} "
                         f"{_fmt(m['max_abs']):>10s}")
        d = self.decoded
        lines.append(f"decoded {d['num_frames']} frame(s) of {d['width']}x{d['height']}")
        for name, m in _distinct_sets(d["frame_sets"]):
            p = "inf (identical)" if m["psnr"] == math.inf else f"{m['psnr']:.2f} dB"
            lines.append(f"  {name:6s} {_span(m['frames']):>8s}  PSNR {p:>15s}  SSIM {_fmt(m['ssim'])}")
        lines.append(f"time    reference {self.reference['seconds']:.2f} s, candidate {self.candidate['seconds']:.2f} s "
                     "(wall; the first run also pays warm-up: not a benchmark)")
        for side in ("reference", "candidate"):
            for name, c in getattr(self, side)["components"].items():
                if c["fp8_layers"]:
                    lines.append(f"FP8     {side} {name}: {c['fp8_layers_ran']}/{c['fp8_layers']} FP8 layers ran"
                                 + (f", FP8 attention in {c['fp8_attention_layers']} modules"
                                    if c.get("fp8_attention_layers") else ""))
        return lines


def _distinct_sets(sets: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Frame sets with distinct frames: an image's first, middle and all are one frame, reported once as "all"."""
    out: dict[tuple[int, ...], tuple[str, dict[str, Any]]] = {}
    for name, m in sets.items():
        out[tuple(m["frames"])] = (name, m)  # later wins: "all" over "first" for one frame
    return list(out.values())


def _fmt(x: float, digits: int = 6) -> str:
    return "nan" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.{digits}g}")


def _span(frames: list[int]) -> str:
    return str(frames[0]) if len(frames) == 1 else f"{frames[0]}-{frames[-1]}"


# ------------------------------------------------------------------------------------------------- running
def _component_info(module: nn.Module, own: bool, ran: dict[str, int]) -> dict[str, Any]:
    from .fp8.attention_diffusers import fp8_attention_modules
    from .fp8.linear import fp8_modules

    load_report = getattr(module, "fp8_load_report", None)
    source = load_report.path if load_report else (getattr(module, "config", None) or {}).get("_name_or_path")
    return {
        "class": type(module).__name__,
        "source": None if source is None else str(source),  # from_pretrained may keep a Path
        "pipeline_component": own,
        "fp8_layers": len(fp8_modules(module)),
        "fp8_layers_ran": len(ran),
        "fp8_attention_layers": len(fp8_attention_modules(module)),
    }


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _check_compatible(side: str, name: str, own: nn.Module, module: nn.Module, family: Family) -> None:
    """A swapped-in transformer must have the pipeline's architecture, or the run fails deep inside a matmul."""
    if type(module).__name__ != type(own).__name__:
        raise Fp8CookbookError(f"{side} {name} is a {type(module).__name__}, the pipeline's is a {type(own).__name__}")
    a, b = dict(own.config), dict(getattr(module, "config", {}))
    diff = [f"{k} {_norm(b.get(k))} vs {_norm(a.get(k))}" for k in family.tiny_config if _norm(a.get(k)) != _norm(b.get(k))]
    if diff:
        raise Fp8CookbookError(f"{side} {name} does not fit the pipeline ({side} vs pipeline): " + ", ".join(diff))


def _run(pipe, modules: dict[str, nn.Module], kwargs: dict[str, Any], label: str, progress: bool,
         on_step: Callable[[int, torch.Tensor], None]) -> tuple[np.ndarray, list[dict[str, Any]], float, dict[str, dict]]:
    """One generation with `modules` swapped in; restores the pipeline's own components and progress settings."""
    from .console import ProgressLines, progress_style
    from .fp8.linear import count_fp8_calls

    style = progress_style(progress)
    lines = ProgressLines(f"{label} step", kwargs["num_inference_steps"]) if style == "lines" else None
    own = {name: getattr(pipe, name) for name in modules}
    active: set[str] = set()
    meta: list[dict[str, Any]] = []

    def callback(_pipe, i: int, t, tensors: dict[str, torch.Tensor]) -> dict:
        on_step(i, tensors["latents"])
        if lines is not None:
            lines(i + 1)
        meta.append({"step": int(i), "timestep": float(t), "experts": sorted(active)})
        active.clear()
        return {}

    saved_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    with contextlib.ExitStack() as stack:
        for name, module in modules.items():
            setattr(pipe, name, module)
            stack.callback(setattr, pipe, name, own[name])
            handle = module.register_forward_pre_hook(lambda mod, args, name=name: active.add(name))
            stack.callback(handle.remove)
        ran = {name: stack.enter_context(count_fp8_calls(module)) for name, module in modules.items()}
        stack.callback(setattr, pipe, "_progress_bar_config", saved_bar)
        pipe.set_progress_bar_config(**{**saved_bar, "disable": style != "bar", "desc": label})
        t0 = time.perf_counter()
        output = pipe(**kwargs, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
        frames = to_uint8_frames(output.frames if hasattr(output, "frames") else output.images)  # .cpu() syncs
        seconds = time.perf_counter() - t0
    return frames, meta, seconds, ran


def _move(modules: dict[str, nn.Module], device: torch.device | str) -> None:
    for module in modules.values():
        module.to(device)


def compare_trajectories(
    pipe,
    reference: dict[str, nn.Module],
    candidate: dict[str, nn.Module],
    *,
    family: str | Family,
    prompt: str = "a photo of a red house",
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
    offload_idle: bool = False,
) -> CompareReport:
    """Run the reference, then the candidate, through `pipe` with identical settings, and measure the difference.

    `reference` and `candidate` map pipeline component names ("transformer", and "transformer_2" for Wan2.2 A14B) to
    modules; a name left out uses the pipeline's own component, so `{}` means the pipeline's BF16 model. Settings left
    None take the family's defaults. `offload_idle` keeps whichever side is not running on the CPU, so a BF16 and an
    FP8 copy of a large model never share the GPU; with two experts (Wan2.2 A14B) only the one running is on the GPU
    (`offload.one_expert_resident`), so the BF16 side needs 28.6 GB of weights there, not 57.3 GB. Afterwards the
    pipeline's own components are back on the devices they were on.
    """
    from .pipelines import generation_kwargs, require_components, transformer_names

    fam = get_family(family) if isinstance(family, str) else family
    if not fam.is_video and num_frames not in (None, 1):
        raise Fp8CookbookError(f"{fam.title} makes images; num_frames does not apply")
    require_components(pipe, fam, "a comparison")
    names = transformer_names(pipe)
    own = {name: getattr(pipe, name) for name in names}
    for side, mods in (("reference", reference), ("candidate", candidate)):
        for name, module in mods.items():
            if name not in own:
                raise Fp8CookbookError(f"{side}: the {fam.title} pipeline has no component {name!r} (it has {', '.join(names)})")
            _check_compatible(side, name, own[name], module, fam)
    runs = {"reference": {**own, **reference}, "candidate": {**own, **candidate}}
    device = pipe._execution_device

    def kwargs() -> dict[str, Any]:  # a fresh generator per run: the same noise both times
        return generation_kwargs(fam, pipe, prompt=prompt, height=height, width=width, num_frames=num_frames,
                                 num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed, output_type="pt")

    ref_latents: list[torch.Tensor] = []
    step_metrics: list[dict[str, float]] = []

    def keep(i: int, latents: torch.Tensor) -> None:
        ref_latents.append(latents.detach().to("cpu", copy=True))

    def measure(i: int, latents: torch.Tensor) -> None:
        if i >= len(ref_latents):
            raise Fp8CookbookError(f"candidate ran more steps than the reference ({i + 1} > {len(ref_latents)})")
        step_metrics.append(tensor_metrics(ref_latents[i], latents))

    results = {}
    entry = {name: module_device(module) for name, module in own.items()}
    for side, on_step in (("reference", keep), ("candidate", measure)):
        with contextlib.ExitStack() as stack:
            if offload_idle:
                other = "candidate" if side == "reference" else "reference"
                _move({n: m for n, m in runs[other].items() if m is not runs[side][n]}, "cpu")
                if len(runs[side]) > 1:  # Wan2.2 A14B: one expert at a time, as it runs
                    _move(runs[side], "cpu")  # entered from the CPU, so the context leaves them there too
                    stack.enter_context(one_expert_resident(runs[side], device))
                else:
                    _move(runs[side], device)
            results[side] = _run(pipe, runs[side], kwargs(), side, progress, on_step)
    if offload_idle:  # the pipeline's own components back where they were
        for name, module in own.items():
            if entry[name] is not None:
                module.to(entry[name])
    ref_frames, ref_meta, ref_seconds, ref_ran = results["reference"]
    cand_frames, _, cand_seconds, cand_ran = results["candidate"]
    if len(step_metrics) != len(ref_latents):
        raise Fp8CookbookError(f"candidate ran {len(step_metrics)} steps, the reference {len(ref_latents)}")

    settings = kwargs()
    return CompareReport(
        family=fam.name,
        settings={"prompt": prompt, "seed": seed, "height": settings["height"], "width": settings["width"],
                  "num_frames": settings.get("num_frames"), "steps": settings["num_inference_steps"],
                  "guidance_scale": settings["guidance_scale"],
                  "max_sequence_length": settings["max_sequence_length"]},
        reference={"seconds": ref_seconds, "components": {
            n: _component_info(m, m is own[n], ref_ran[n]) for n, m in runs["reference"].items()}},
        candidate={"seconds": cand_seconds, "components": {
            n: _component_info(m, m is own[n], cand_ran[n]) for n, m in runs["candidate"].items()}},
        steps=[{**meta, "latents": m} for meta, m in zip(ref_meta, step_metrics)],
        decoded=frame_metrics(ref_frames, cand_frames),
        environment=_environment(pipe),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        reference_frames=ref_frames,
        candidate_frames=cand_frames,
    )


def _environment(pipe) -> dict[str, Any]:
    """The same versions and hardware description as `fp8cookbook bench` records, plus the device that ran."""
    from .bench import environment

    device = pipe._execution_device
    # dtype: what the pipeline ran in (notebooks and CLI: float32 on CPU, bfloat16 on CUDA unless asked otherwise)
    return {"device": str(device), "dtype": str(pipe.dtype).replace("torch.", ""), **environment(device)}


# ------------------------------------------------------------------------------------------ loading, output
def load_transformer(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                     fp8_attention: bool | str = "auto") -> nn.Module:
    """A transformer folder: an FP8 checkpoint (config.json has quantization_config) or a plain diffusers one.

    `fp8_attention` is the loader's ("auto", "on", "off"; only FP8 checkpoints have attention scales).
    """
    from .checkpoint import read_config
    from .loader import load_fp8_transformer

    path = Path(path)
    config = read_config(path)
    if "quantization_config" in config:
        return load_fp8_transformer(path, device=device, dtype=dtype, fp8_attention=fp8_attention)[0]
    from .fp8.attention_mode import AttentionMode

    if AttentionMode.parse(fp8_attention).mode == "on":
        raise Fp8CookbookError(f"{path}: FP8 attention is for FP8 checkpoints; this is a plain diffusers folder")
    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if cls is None:
        raise Fp8CookbookError(f"{path / 'config.json'}: unknown _class_name {config.get('_class_name')!r}")
    try:
        model = cls.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise Fp8CookbookError(f"cannot load {path}: {e}") from e
    return model.to(device).eval().requires_grad_(False)


REPORT_NAME, METRICS_PLOT_NAME, IMAGES_PLOT_NAME = "compare.json", "compare_metrics.png", "compare_images.png"


def write_outputs(report: CompareReport, output_dir: str | Path, thresholds: Thresholds | None = None) -> list[Path]:
    """compare.json and the two figures; each file is written beside its final name and renamed in."""
    from .files import write_json_atomic
    from .plots import plot_images, plot_step_metrics, save_figure

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / REPORT_NAME, out / METRICS_PLOT_NAME, out / IMAGES_PLOT_NAME]
    write_json_atomic(paths[0], report.to_dict(thresholds))
    save_figure(plot_step_metrics(report, thresholds), paths[1])
    save_figure(plot_images(report), paths[2])
    return paths
