"""Complete diffusers pipelines per family: tiny offline ones for tests, and one loader for tiny and real checkpoints.

Why tiny pipelines: the converter, calibration and benchmark code must be exercised end to end (text encoder ->
transformer(s) -> VAE) on a CPU with no network. So every family gets a pipeline of the *real* diffusers and
transformers classes, with random weights at tiny size, built from a fixed seed, saved once with `save_pretrained`
and then loaded through exactly the `from_pretrained` path that a real checkpoint takes.

Each family's file builds its tiny pipeline (`Family.build_tiny_pipeline`); the shared tokenizers are in
`families/tiny.py`. This module caches and loads pipelines and builds generation kwargs.

One substitution (FLUX.2): the real `tokenizer` component of FLUX.2-dev is a `PixtralProcessor`. That class needs
torchvision (transformers replaces it with a placeholder otherwise), which the CPU environment does not have. The
tiny pipeline therefore stores the processor's inner tokenizer class, `PreTrainedTokenizerFast` (saved under its
transformers-5 name `TokenizersBackend`), carrying a Mistral-style chat template. For text prompts `Flux2Pipeline`
only calls `tokenizer.apply_chat_template(...)`, which the bare tokenizer implements with the same arguments and
result; only prompt upsampling with images (`caption_upsample_temperature` + `image`) would need the processor.
The text encoder is the real `Mistral3ForConditionalGeneration`, with 30 tiny layers so that the pipeline's default
hidden-state layers (10, 20, 30) exist.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import Fp8CookbookError
from .families import Family, get_family
from .files import plain_modes, staged_dir, temp_name, to_jsonable

TINY_VERSION = "v1"  # bump when the tiny build changes, so stale caches are not reused


def build_tiny_pipeline(family_name: str):
    """A tiny random pipeline of the family's real classes, in BF16 (like the real checkpoints), not saved."""
    family = get_family(family_name)
    import diffusers

    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # silence "keep in float32" advice: from_pretrained applies it
    try:
        return family.build_tiny_pipeline(family).to(torch.bfloat16)
    finally:
        diffusers.utils.logging.set_verbosity(level)


# ------------------------------------------------------------------------------------------------- caching
def _cache_root(cache_dir: str | Path | None) -> Path:
    root = cache_dir or os.environ.get("FP8COOKBOOK_CACHE") or Path.home() / ".cache" / "fp8cookbook"
    return Path(root).expanduser()


def _is_current(folder: Path, family: Family) -> bool:
    """A cached tiny pipeline is reused only if complete and built from today's tiny_config."""
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text())
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    wanted = to_jsonable(family.tiny_config)  # tuples -> lists, as config.json stores them
    return (all(config.get(k) == v for k, v in wanted.items())
            and index.get("boundary_ratio", family.boundary_ratio) == family.boundary_ratio)


def tiny_pipeline_dir(family_name: str, cache_dir: str | Path | None = None) -> Path:
    """Folder holding the family's tiny pipeline; built and saved on first use.

    Saved (not kept in memory) so tests load it through the same `from_pretrained` path as a real checkpoint.
    The folder is written beside its final place and renamed in, so concurrent callers never see half a pipeline.
    """
    family = get_family(family_name)
    final = _cache_root(cache_dir) / "tiny" / f"{family.name}-{TINY_VERSION}"
    if _is_current(final, family):
        return final
    if final.exists() and not _is_current(final, family):  # stale (tiny_config changed): moved aside under a temporary name, then removed
        aside = final.parent / temp_name()
        with contextlib.suppress(FileNotFoundError):  # another caller moved it first
            final.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
    try:
        with staged_dir(final) as tmp:  # of racing builders exactly one publishes; the others find it current
            build_tiny_pipeline(family.name).save_pretrained(tmp)
            plain_modes(tmp)  # safetensors writes 0600 files; the cache may be shared
    except Fp8CookbookError:
        if not _is_current(final, family):  # not just "another caller got there first"
            raise
    return final


# ------------------------------------------------------------------------------------------------- loading
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _family_or_none(name: Any) -> Family | None:
    """The family a first argument names, or None when it is a folder or a hub id (a folder wins over a name)."""
    if not isinstance(name, str) or Path(name).expanduser().exists():
        return None
    try:
        return get_family(name)
    except Fp8CookbookError:
        return None


def load_pipeline(family_or_source: str | Path | None = None, model_path: str | Path | None = None, *,
                  fp8: str | Path | dict[str, str | Path] | None = None, dtype: torch.dtype = torch.bfloat16,
                  device: str | torch.device = "cpu", **fp8_options: Any):
    """A diffusers pipeline, BF16 or with fp8cookbook's FP8 transformers, in one call.

        load_pipeline("flux1")                                    the tiny test pipeline (BF16)
        load_pipeline("flux1", "black-forest-labs/FLUX.1-dev")    a family's pipeline from a folder or hub id
        load_pipeline("black-forest-labs/FLUX.1-dev", fp8=folder) a base plus an FP8 folder, repo or {name: folder}
        load_pipeline("wan22-fp8-repo")                           a repo with FP8 components (ours, NVIDIA's)

    Any FP8 component (in the source, or given as `fp8`) is loaded by `load_fp8_transformer`
    (`loader.load_fp8_pipeline`; `fp8_options` are its offload and `fp8_attention` options, DiT offload refused); a
    component holding FP8 codes without a quantization_config is refused, never loaded as BF16. Tiny and real take
    the same `from_pretrained` path, so what the tests exercise is what users run. The per-step progress bar is off
    (re-enable with `pipe.set_progress_bar_config(disable=False)`).
    """
    import diffusers

    from .loader import load_fp8_pipeline
    from .repo import MODEL_INDEX, detect_layout

    family = _family_or_none(family_or_source)
    if family is None:
        if family_or_source is None:
            raise Fp8CookbookError("load_pipeline: give a family name, a pipeline folder or a hub id")
        if model_path is not None:
            raise Fp8CookbookError(f"load_pipeline({family_or_source!r}, {model_path!r}): {family_or_source!r} is "
                                   "not a family name; pass the family first, or the pipeline alone")
        source = str(family_or_source)
    else:
        source = str(tiny_pipeline_dir(family.name) if model_path is None else model_path)
    local = Path(source).expanduser()
    absent: dict[str, None] = {}
    if local.exists():
        if not (local / MODEL_INDEX).is_file():
            raise Fp8CookbookError(f"{source}: not a diffusers pipeline folder (no model_index.json)")
        try:
            entries = json.loads((local / MODEL_INDEX).read_text())
            class_name = entries.get("_class_name")
        except ValueError as e:
            raise Fp8CookbookError(f"{source}: unreadable model_index.json ({e})") from e
        if family is not None and class_name != family.pipeline_class:
            raise Fp8CookbookError(f"{source}: model_index.json names {class_name}, but {family.title} needs "
                                   f"{family.pipeline_class}")
        source = str(local)
        # Components listed as [null, null] (e.g. a stand-in written with --components) load as None.
        absent = {k: None for k, v in entries.items() if not k.startswith("_") and v == [None, None]}
        holds_fp8 = bool(detect_layout(local).fp8_components())
    elif not _HUB_ID.fullmatch(source):
        hint = f" like {family.hub_id}" if family is not None else " like owner/name, nor a family name"
        raise Fp8CookbookError(f"{source}: no such folder (and not a hub id{hint})")
    else:
        holds_fp8, class_name = False, None
    if fp8 is not None or holds_fp8:
        return load_fp8_pipeline(source, fp8, dtype=dtype, device=str(device), **fp8_options)
    if fp8_options:
        raise Fp8CookbookError(f"load_pipeline: {', '.join(sorted(fp8_options))} apply to FP8 components only, and "
                               f"{source} has none (pass fp8=<FP8 folder or repo>)")
    if local.exists():  # a BF16 pipeline; a component with FP8 codes but no quantization_config must not load
        from .repo import FP8_UNMARKED

        bad = [c for c in detect_layout(local).components.values() if c.kind == FP8_UNMARKED]
        if bad:
            raise Fp8CookbookError(f"{local / bad[0].name}: {bad[0].note}")
    cls = getattr(diffusers, family.pipeline_class if family is not None else str(class_name), None)
    if cls is None:  # a hub id without a family: let diffusers read model_index.json
        cls = diffusers.DiffusionPipeline
    title = family.title if family is not None else cls.__name__
    try:
        pipe = cls.from_pretrained(source, dtype=dtype, **absent)
    except Exception as e:  # noqa: BLE001 - whatever the hub or a broken folder raises, say which path failed
        if not local.exists():  # a hub id: offline, unknown or gated, in one short line
            from .repo import hub_error

            raise hub_error(source, e) from e
        raise Fp8CookbookError(f"cannot load {title} pipeline from {source}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def require_components(pipe, family: Family, purpose: str) -> None:
    """Refuse, in one line, a pipeline whose needed components are None (a stand-in written with --components or
    --transformer-only loads so): `purpose` says what needs them."""
    optional = set(getattr(pipe, "_optional_components", [])) - set(family.experts)  # Wan: TI2V-5B's transformer_2
    absent = [n for n, m in pipe.components.items() if m is None and n not in optional]
    if absent:
        raise Fp8CookbookError(f"the {family.title} pipeline has no {', '.join(absent)} (a folder written with "
                               f"--components or --transformer-only?): {purpose} runs the whole pipeline")


def transformer_names(pipe) -> list[str]:
    """The denoiser components to quantize/calibrate: "transformer", plus "transformer_2" for Wan2.2 A14B."""
    return [name for name in ("transformer", "transformer_2") if getattr(pipe, name, None) is not None]


# ---------------------------------------------------------------------------------------------- generation
def default_tiny_settings(family_name: str) -> dict[str, Any]:
    """height, width, num_frames, num_inference_steps, guidance_scale for the tiny pipeline (splat into
    `generation_kwargs`); the values are the family's `tiny_settings`."""
    return get_family(family_name).tiny_settings.as_dict()


def _text_tokenizer(pipe):
    """The tokenizer whose length limit bounds `max_sequence_length` (T5 for FLUX.1; a processor's inner one)."""
    tok = getattr(pipe, "tokenizer_2", None) or pipe.tokenizer
    return getattr(tok, "tokenizer", tok)


def generation_kwargs(family: Family | str, pipe, *, prompt: str = "a photo of a red house", height: int | None = None,
                      width: int | None = None, num_frames: int | None = None, num_inference_steps: int | None = None,
                      guidance_scale: float | None = None, seed: int = 0, output_type: str = "pt",
                      max_sequence_length: int | None = None) -> dict[str, Any]:
    """Keyword arguments for `pipe(**kwargs)`, the same way for every family.

    Unset values take the real model's defaults from the registry. The generator is a CPU one seeded with `seed`,
    so a run is reproducible on any device. `max_sequence_length` defaults to the family's text length, capped by
    the tokenizer's own limit (which is what makes the tiny pipelines use short prompts).
    """
    family = get_family(family) if isinstance(family, str) else family
    if max_sequence_length is None:
        max_sequence_length = min(family.text_len, int(_text_tokenizer(pipe).model_max_length))
    kwargs: dict[str, Any] = dict(
        prompt=prompt,
        height=height or family.height,
        width=width or family.width,
        num_inference_steps=num_inference_steps or family.num_steps,
        guidance_scale=family.guidance_scale if guidance_scale is None else guidance_scale,
        generator=torch.Generator(device="cpu").manual_seed(seed),
        output_type=output_type,
        max_sequence_length=max_sequence_length,
    )
    if family.is_video:
        kwargs["num_frames"] = num_frames or family.num_frames
    return kwargs
