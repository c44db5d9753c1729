"""Calibrating a whole pipeline: the prompts, the settings, one pass over all transformers, and the checks that
every enabled quantizer got an amax (an expert that never ran is named, with the timesteps used).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import Fp8CookbookError
from ..families import Family
from ..files import to_jsonable
from ..params import read_prompts_file
from ..pipelines import default_tiny_settings, generation_kwargs
from .recipe import (INSTALL_HINT, fp8_diffusion_quant_cfg, quiet_modelopt, require_modelopt,
                     skip_entries, tensor_quantizers)

PROMPTS_FILE = Path(__file__).parent.parent / "data" / "calibration_prompts.txt"

# Calibration defaults for real checkpoints (tiny pipelines use `default_tiny_settings`). ModelOpt's example
# suggests 128-256 prompts at 20 steps for images; video prompts cost ~100x more each, so fewer.
REAL_CALIB_STEPS = 20
DEFAULT_NUM_PROMPTS = {"tiny": 4, "image": 64, "video": 16}


def calibration_prompts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """Calibration prompts, one per line (blank lines and `#` comments skipped); the shipped file when `path` is None.

    `limit` takes the first N: the shipped file is ordered so that any prefix is varied. Asking for more prompts
    than the file has is an error, not a silent shortfall.
    """
    return read_prompts_file(PROMPTS_FILE if path is None else path, limit)


def is_tiny(model: nn.Module, family: Family) -> bool:
    """The tiny test transformer, recognised by its config (so the tiny calibration defaults apply)."""
    config = dict(model.config)
    return all(to_jsonable(config.get(k)) == v for k, v in to_jsonable(family.tiny_config).items())


def calibration_settings(family: Family, tiny: bool, *, num_inference_steps: int | None, height: int | None,
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


def no_amax_message(family: Family, name: str, bad: list[str], calibration: dict[str, Any]) -> str:
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


def calibrate_together(pipe, family: Family, names: list[str], prompts: list[str], settings: dict[str, Any], *,
                        seed: int, quantize_mha: bool, progress: bool) -> tuple[dict[str, int], dict[str, list[float]]]:
    """Insert quantizers into every transformer, then run the pipeline once over all prompts calibrating them all.

    `mtq.quantize` calls its forward loop between inserting quantizers and reading the amaxes, so nesting one call
    per transformer inside the previous one's loop has all of them collecting statistics during the same
    pipeline runs: Wan2.2 A14B's experts each see exactly the steps the pipeline routes to them.
    """
    from tqdm.auto import tqdm

    from ..console import ProgressLines, progress_style

    mtq, _ = require_modelopt()
    style = progress_style(progress)
    lines = ProgressLines("calibrate prompt", len(prompts)) if style == "lines" else None
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
                                                               disable=style != "bar") as bar:
                for i, prompt in enumerate(bar):
                    pipe(**generation_kwargs(family, pipe, prompt=prompt, seed=seed + i, output_type="latent",
                                             **settings))
                    bar.set_postfix(calls)
                    if lines is not None:
                        lines(i + 1)
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
        cfg["quant_cfg"] = cfg["quant_cfg"] + skip_entries(model, family)
        with quiet_modelopt():
            quantized = mtq.quantize(model, cfg, lambda _m: nest(i + 1))
        if quantized is not model:
            setattr(pipe, names[i], quantized)

    with torch.no_grad():
        nest(0)
    if quantize_mha:
        for n in names:
            if not any(q.endswith("_bmm_quantizer") and m.is_enabled for q, m in tensor_quantizers(getattr(pipe, n))):
                raise Fp8CookbookError("quantize_mha found no attention quantizers: ModelOpt's diffusers plugin did "
                                       f"not load (it needs `onnx`); install it: {INSTALL_HINT}")
    return calls, {n: sorted(ts, reverse=True) for n, ts in timesteps.items()}

