"""Folder layouts around the FP8 transformer: what a path holds, and the full diffusers repo others load.

Layouts read (`detect_layout`):

    transformer         one model folder with an FP8 `quantization_config` (ours, or a ModelOpt transformer export)
    sglang-transformer  the same, as SGLang's own converter writes it (`quant_type`, [1] scales, no stats file)
    modelopt-repo       a whole pipeline: `model_index.json` at the top, FP8 transformer component folder(s)
                        beside the BF16 ones (`export_hf_checkpoint(pipeline)`; NVIDIA publishes this form, e.g.
                        nvidia/Wan2.2-T2V-A14B-Diffusers-FP8: `transformer/` and `transformer_2/` with 0-d scales)
    fp8cookbook-repo    the same form, written by `write_full_repo` (its FP8 components carry our stats file)
    pipeline            a pipeline with no FP8 component (a base model)

Every component folder gets a kind (`fp8`, `bf16`, `fp8-unmarked`, `other-quant`, `config-only`, `unreadable`)
and a note in words, so a folder that cannot be judged is reported as such, never passed.

Written (`write_full_repo`): the base pipeline's components linked or copied, its `model_index.json`, each FP8
transformer in its component folder, and a model card with Hugging Face front matter. `sglang generate
--model-path <repo>` serves it with no `--transformer-path`, and `fp8cookbook.load_pipeline(<repo>)` loads it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .checkpoint import (FP8_DTYPE, INPUT_SCALE, STATS_NAME, WEIGHT_SCALE, inspect_checkpoint, read_config,
                         read_quant_info, scan_tensors)
from .errors import Fp8CookbookError
from .files import current_umask, plain_modes, staged_dir

MODEL_INDEX = "model_index.json"
CARD_NAME = "README.md"
LINK_MODES = ("hardlink", "symlink", "copy")

# component kinds
FP8 = "fp8"  # quantization_config with quant_algo FP8: checked by inspect_checkpoint
BF16 = "bf16"  # weights, none of them FP8, no scales, no quantization_config
FP8_UNMARKED = "fp8-unmarked"  # FP8 weights or scale tensors but no quantization_config: loads as garbage elsewhere
OTHER_QUANT = "other-quant"  # a quantization_config this project does not read (NVFP4, bitsandbytes, ...)
CONFIG_ONLY = "config-only"  # scheduler, tokenizer, processor: no weights to judge
UNREADABLE = "unreadable"  # a model folder whose config or shards cannot be read


@dataclass
class Component:
    """One folder of a layout: what it is, and in words why, when it cannot be judged."""

    name: str  # the model_index key ("transformer"), or "" for a bare model folder
    path: Path
    kind: str
    class_name: str | None = None
    producer: str | None = None  # for FP8 folders: "fp8cookbook", "sglang-converter" or "modelopt"
    fp8_weights: int = 0
    scale_tensors: int = 0
    note: str = ""
    error: Fp8CookbookError | None = None  # why an unreadable folder could not be read, to re-raise for one folder

    @property
    def is_fp8(self) -> bool:
        return self.kind == FP8


@dataclass
class Layout:
    """What a path holds: its layout name and its components (one, named "", for a bare model folder)."""

    path: Path
    layout: str
    pipeline_class: str | None = None
    components: dict[str, Component] = field(default_factory=dict)

    @property
    def is_repo(self) -> bool:
        return self.layout in ("modelopt-repo", "fp8cookbook-repo", "pipeline")

    def fp8_components(self) -> list[str]:
        """Names of the FP8 components, in model_index order ("" for a bare FP8 folder)."""
        return [n for n, c in self.components.items() if c.is_fp8]


# ------------------------------------------------------------------------------------------------ reading
def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    safetensors = sorted(folder.glob("*.safetensors"))
    other = sorted(p for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf") for p in folder.glob(ext))
    return safetensors, other


def classify_folder(folder: str | Path, name: str = "") -> Component:
    """Judge one model folder from its config.json and safetensors headers (no tensor data is read)."""
    folder = Path(folder)
    comp = Component(name, folder, UNREADABLE)
    config_path = folder / "config.json"
    safetensors, other = _weight_files(folder)
    if not config_path.is_file():
        if safetensors or other:
            comp.note = f"{config_path}: missing, but the folder holds weights; cannot tell what model it is"
            return comp
        comp.kind = CONFIG_ONLY
        comp.note = "no config.json and no weights (scheduler, tokenizer or processor): nothing to check"
        return comp
    try:
        config = read_config(folder)
        info = read_quant_info(config, str(config_path))
    except Fp8CookbookError as e:
        comp.note, comp.error = str(e), e
        return comp
    comp.class_name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if not safetensors:
        if other:
            comp.note = (f"weights only in {', '.join(p.name for p in other)}: not safetensors, so their dtypes "
                         "cannot be checked here")
        else:
            comp.kind = CONFIG_ONLY
            comp.note = "config.json but no weight files: nothing to check"
        return comp
    try:
        tensors = scan_tensors(folder)
    except Fp8CookbookError as e:
        comp.note, comp.error = str(e), e
        return comp
    comp.fp8_weights = sum(1 for n, t in tensors.items() if t.dtype == FP8_DTYPE and n.endswith(".weight"))
    comp.scale_tensors = sum(1 for n in tensors if n.endswith((f".{WEIGHT_SCALE}", f".{INPUT_SCALE}")))
    qc = config.get("quantization_config")
    if info is None:
        if comp.fp8_weights or comp.scale_tensors:
            comp.kind = FP8_UNMARKED
            comp.note = (f"{comp.fp8_weights} FP8 weight(s) and {comp.scale_tensors} scale tensor(s) but no "
                         f"quantization_config in {config_path}: diffusers, SGLang and this loader would read the "
                         "FP8 codes as BF16 values (scales dropped)")
        else:
            comp.kind = BF16
            comp.note = "no FP8 tensors"
        return comp
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if info.quant_algo != "FP8" or (method not in (None, "modelopt")):
        comp.kind = OTHER_QUANT
        comp.note = (f"quantization_config is quant_method={method!r}, quant_algo={info.quant_algo!r}: not the "
                     "static FP8 format this project checks")
        return comp
    comp.kind = FP8
    comp.producer = _producer(folder, qc if isinstance(qc, dict) else {}, tensors)
    comp.note = {"fp8cookbook": "FP8 checkpoint written by fp8cookbook",
                 "sglang-converter": "FP8 checkpoint in SGLang's converter form",
                 "modelopt": "FP8 ModelOpt export"}[comp.producer]
    return comp


def _producer(folder: Path, qc: dict[str, Any], tensors: dict) -> str:
    """Who wrote an FP8 folder: our stats file; else SGLang's converter ([1] scales, `quant_type`); else ModelOpt."""
    if (folder / STATS_NAME).is_file():
        return "fp8cookbook"
    scales = [t for n, t in tensors.items() if n.endswith(f".{WEIGHT_SCALE}")]
    if "quant_type" in qc and scales and all(t.shape == (1,) for t in scales):
        return "sglang-converter"
    return "modelopt"


def read_model_index(folder: Path) -> dict[str, Any]:
    """model_index.json of a pipeline folder, with errors that name the file."""
    path = Path(folder) / MODEL_INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Fp8CookbookError(f"{path}: unreadable ({e})") from None
    if not isinstance(index, dict):
        raise Fp8CookbookError(f"{path}: expected a JSON object, found {type(index).__name__}")
    return index


def pipeline_components(index: dict[str, Any]) -> dict[str, tuple[str | None, str | None]]:
    """Component name -> (library, class) for the entries of a model_index.json (`[null, null]` kept as None)."""
    out = {}
    for key, value in index.items():
        if key.startswith("_") or not (isinstance(value, list) and len(value) == 2):
            continue
        out[key] = (value[0], value[1])
    return out


def detect_layout(path: str | Path) -> Layout:
    """What `path` holds (see the module docstring); raises only when it is none of the layouts."""
    path = Path(path)
    if not path.exists():
        raise Fp8CookbookError(f"{path}: does not exist")
    if not path.is_dir():
        raise Fp8CookbookError(f"{path}: not a folder (expected a model folder or a diffusers repo)")
    if (path / MODEL_INDEX).is_file():
        index = read_model_index(path)
        layout = Layout(path, "pipeline", index.get("_class_name"))
        for name, (library, cls) in pipeline_components(index).items():
            folder = path / name
            if library is None and cls is None:
                continue  # an optional component the pipeline does not use
            if not folder.is_dir():
                layout.components[name] = Component(name, folder, UNREADABLE, cls,
                                                    note=f"{MODEL_INDEX} lists {name} ({library}.{cls}) but "
                                                         f"{folder} does not exist")
                continue
            comp = classify_folder(folder, name)
            comp.class_name = comp.class_name or cls
            layout.components[name] = comp
        fp8 = [c for c in layout.components.values() if c.is_fp8]
        if fp8:
            layout.layout = ("fp8cookbook-repo" if all(c.producer == "fp8cookbook" for c in fp8) else "modelopt-repo")
        return layout
    if (path / "config.json").is_file():
        comp = classify_folder(path)
        name = "sglang-transformer" if comp.producer == "sglang-converter" else "transformer"
        return Layout(path, name, components={"": comp})
    subs = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file())
    hint = f" (it holds {', '.join(subs)}: pass one of them)" if subs else ""
    raise Fp8CookbookError(f"{path}: neither a model folder (config.json) nor a diffusers repo ({MODEL_INDEX}){hint}")


def repo_problems(layout: Layout) -> dict[str, list[str]]:
    """Per component, what is wrong: inspect_checkpoint's problems for FP8 folders, the note for ones that fail."""
    out: dict[str, list[str]] = {}
    for name, comp in layout.components.items():
        if comp.kind == FP8:
            out[name] = inspect_checkpoint(comp.path).problems
        elif comp.kind in (FP8_UNMARKED, UNREADABLE):
            out[name] = [comp.note]
        else:
            out[name] = []
    return out


# ------------------------------------------------------------------------------------------------ writing
def read_card_metadata(folder: str | Path) -> dict[str, Any]:
    """The YAML front matter of a folder's README.md (a Hugging Face model card); {} when there is none."""
    path = Path(folder) / CARD_NAME
    if not path.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(path) or {}
    except Exception:  # noqa: BLE001 - a malformed card must not stop a conversion; it only loses the license
        return {}


def license_fields(base: str | Path | None) -> dict[str, Any]:
    """`license` (with `license_name`/`license_link` for "other") from the base model's card, when it has one."""
    if base is None:
        return {}
    meta = read_card_metadata(base)
    return {k: meta[k] for k in ("license", "license_name", "license_link") if meta.get(k)}


def serve_commands(*, repo: str | None = None, base: str | None = None, transformer: str | None = None,
                   extra_flags: Iterable[str] = ()) -> list[str]:
    """The SGLang command lines for a full repo (`--model-path` alone) or a base plus an FP8 transformer folder."""
    extra = "".join(f" {f}" for f in extra_flags)
    prompt = ' --prompt "a photo of a red house"'
    out = []
    if repo is not None:
        out.append(f"sglang generate --model-path {repo}{extra}{prompt}")
    if base is not None and transformer is not None:
        out.append(f"sglang generate --model-path {base} --transformer-path {transformer}{extra}{prompt}")
    return out


def model_card(*, title: str, base_model: str | None, family_title: str | None, fp8_components: list[str],
               license: dict[str, Any], serve: list[str], load_python: str, details: Iterable[str] = (),
               video: bool = False) -> str:
    """README.md with Hugging Face front matter (base_model, library_name, tags, license) and how to serve it."""
    import yaml

    meta: dict[str, Any] = {}
    if base_model:
        meta["base_model"] = base_model
        meta["base_model_relation"] = "quantized"
    meta["library_name"] = "diffusers"
    meta["pipeline_tag"] = "text-to-video" if video else "text-to-image"
    meta["tags"] = ["fp8", "modelopt", "sglang", "diffusers", "fp8cookbook"]
    meta.update(license)
    front = yaml.safe_dump(meta, sort_keys=False).strip()
    lines = [
        "---", front, "---", "", f"# {title}", "",
        f"Static per-tensor FP8 (E4M3) weights and activations{f' of {family_title}' if family_title else ''}, "
        "calibrated with NVIDIA ModelOpt and written by fp8cookbook in SGLang's ModelOpt FP8 checkpoint format "
        f"(`quant_method: modelopt`, `quant_algo: FP8`). FP8 components: {', '.join(f'`{c}`' for c in fp8_components)}.",
        "",
        "## Serve with SGLang", "",
        "No `--quantization` flag is needed; keep DiT CPU offload off (SGLang turns it off for this format).", "",
        "```bash", *serve, "```", "",
        "## Load with diffusers and fp8cookbook", "",
        "```python", "import fp8cookbook", "", load_python, "```", "",
    ]
    details = list(details)
    if details:
        lines += ["## Details", ""] + [f"- {d}" for d in details] + [""]
    return "\n".join(lines)


def local_pipeline_dir(source: str | Path) -> Path:
    """A local folder for a pipeline given as a folder or as a hub id already in the Hugging Face cache."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / MODEL_INDEX).is_file():
            raise Fp8CookbookError(f"{path}: not a diffusers pipeline folder (no {MODEL_INDEX})")
        return path
    import re

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(source)):
        raise Fp8CookbookError(f"{source}: no such folder (and not a hub id like owner/name)")
    from huggingface_hub import snapshot_download

    try:  # the local cache first; then the hub, as diffusers' from_pretrained would
        path = Path(snapshot_download(str(source), local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: try the hub
        path = None
    try:
        path = path or Path(snapshot_download(str(source)))
        if not (path / MODEL_INDEX).is_file():
            raise Fp8CookbookError(f"{source}: not a diffusers pipeline repo (no {MODEL_INDEX})")
        return path
    except Fp8CookbookError:
        raise
    except Exception as e:  # noqa: BLE001 - offline, unknown id, gated: one message
        raise hub_error(source, e) from None


def hub_error(source: str | Path, error: BaseException) -> Fp8CookbookError:
    """One short line for a hub id that failed to load. Offline or no network (the usual case on a cluster node)
    says so and that a local folder works; anything else (unknown id, gated) keeps the first line of the hub's
    own message, cut short: diffusers' text runs to 500 characters and points at a trace the CLI never shows."""
    if _hub_unreachable(error):
        return Fp8CookbookError(f"{source}: the Hugging Face Hub cannot be reached for this id (offline, not "
                                f"cached); a local pipeline folder works (hf download {source} --local-dir DIR)")
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return Fp8CookbookError(f"{source}: no such folder, and the hub did not give it ({type(error).__name__}: "
                            f"{text[:160]})")


def _hub_unreachable(error: BaseException) -> bool:
    """True when the chain of `error` holds a network failure or huggingface_hub's offline/not-cached error."""
    import socket

    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    network: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, socket.gaierror,
                                                OfflineModeIsEnabled, LocalEntryNotFoundError)
    try:
        import httpx

        network += (httpx.TransportError,)
    except ImportError:  # huggingface_hub < 1.0 talks through requests
        pass
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, network):
            return True
        error = error.__cause__ or error.__context__
    return False


def _place(src: Path, dst: Path, link: str) -> None:
    """One file: hard link (falls back to a copy across file systems), symbolic link (absolute), or copy.

    A hard link shares its input's modes; an input that others may not read although the umask would let them
    (safetensors >= 0.8 writes 0600, so a ModelOpt export's files are) is copied instead, so the repo is readable
    by an SGLang container running as another user. Copies get a plain write's modes (`files.plain_modes`).
    """
    if link == "symlink":
        os.symlink(src.resolve(), dst)
        return
    if link == "hardlink":
        readable = 0o444 & ~current_umask()
        if os.stat(src).st_mode & readable == readable:
            try:
                os.link(src.resolve(), dst)
                return
            except OSError:
                pass  # another file system, or links not allowed: copy
    shutil.copyfile(src, dst)
    plain_modes(dst)


def _place_tree(src: Path, dst: Path, link: str, skip: Iterable[str] = ()) -> None:
    skip = set(skip)
    dst.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        if entry.name in skip or entry.name.startswith(".cache"):
            continue
        if entry.is_dir():
            _place_tree(entry, dst / entry.name, link)
        else:
            _place(entry, dst / entry.name, link)


def write_full_repo(base: str | Path, fp8: dict[str, str | Path], output_dir: str | Path, *, link: str = "hardlink",
                    base_model: str | None = None, family_title: str | None = None, video: bool = False,
                    extra_flags: Iterable[str] = (), license: dict[str, Any] | None = None,
                    overwrite: bool = False) -> Layout:
    """A complete diffusers repo: `base`'s components (linked or copied), its model_index.json, and each FP8
    transformer of `fp8` ({component name: FP8 checkpoint folder}) in its component folder, plus a model card.

    `license` defaults to the license fields of the base's model card. Everything is checked before any byte is
    written: each FP8 folder must pass `inspect_checkpoint` and have the
    class the base's model_index.json names for that component. The repo is written beside `output_dir` and
    renamed in only when complete (and re-read with `detect_layout` first).
    """
    if link not in LINK_MODES:
        raise Fp8CookbookError(f"link must be one of {', '.join(LINK_MODES)}, got {link!r}")
    base_dir = local_pipeline_dir(base)
    output_dir = Path(output_dir).expanduser()
    if not fp8:
        raise Fp8CookbookError("write_full_repo: no FP8 component given")
    index = read_model_index(base_dir)
    components = pipeline_components(index)
    for name, folder in fp8.items():
        if name not in components:
            raise Fp8CookbookError(f"{base_dir / MODEL_INDEX}: has no component {name!r} "
                                   f"(components: {', '.join(sorted(components))})")
        comp = classify_folder(folder, name)
        if comp.kind != FP8:
            raise Fp8CookbookError(f"{folder}: not an FP8 checkpoint ({comp.note})")
        problems = inspect_checkpoint(folder).problems
        if problems:
            raise Fp8CookbookError(f"{folder}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
        want = components[name][1]
        if comp.class_name != want:
            raise Fp8CookbookError(f"{Path(folder) / 'config.json'}: _class_name {comp.class_name!r}, but "
                                   f"{base_dir / MODEL_INDEX} names {want!r} for {name}")
    target = output_dir.resolve()
    if target == base_dir.resolve() or base_dir.resolve() in target.parents or target in base_dir.resolve().parents:
        raise Fp8CookbookError(f"{output_dir}: must be outside the base pipeline folder {base_dir}")
    if output_dir.exists() and not overwrite:
        raise Fp8CookbookError(f"{output_dir}: already exists (pass overwrite=True / --overwrite to replace it)")

    # staged beside output_dir (the umask's modes, not mkdtemp's 0700), renamed in only when complete
    with staged_dir(output_dir, overwrite=overwrite) as tmp:
        for entry in sorted(base_dir.iterdir()):
            if entry.name in fp8 or entry.name in (CARD_NAME,) or entry.name.startswith("."):
                continue
            if entry.is_dir():
                _place_tree(entry, tmp / entry.name, link)
            else:
                _place(entry, tmp / entry.name, link)
        for name, folder in fp8.items():  # never symbolic: the FP8 folders may be temporary
            _place_tree(Path(folder), tmp / name, "copy" if link == "copy" else "hardlink", skip=(CARD_NAME,))
        repo_name = output_dir.name
        card = model_card(
            title=f"{repo_name}: FP8 {family_title or index.get('_class_name')}", base_model=base_model,
            family_title=family_title, fp8_components=list(fp8),
            license=license_fields(base_dir) if license is None else license,
            serve=serve_commands(repo=f"<path or hub id of {repo_name}>", extra_flags=extra_flags),
            load_python=f'pipe = fp8cookbook.load_pipeline("<path or hub id of {repo_name}>")', video=video,
            details=[f"base pipeline: {base_model or base_dir}", f"pipeline class: {index.get('_class_name')}"])
        (tmp / CARD_NAME).write_text(card)
        layout = detect_layout(tmp)
        missing = [n for n in fp8 if n not in layout.fp8_components()]
        if missing:
            raise Fp8CookbookError(f"{output_dir}: written repo does not read back FP8 for {', '.join(missing)}")
    return detect_layout(output_dir)


# ------------------------------------------------------------------------------------ saving a loaded model
def transformer_card(class_name: str | None, *, base_model: str | None, family_title: str | None,
                     license: dict[str, Any], details: Iterable[str] = (), video: bool = False,
                     extra_flags: Iterable[str] = ()) -> str:
    """The model card of one FP8 transformer folder: served next to its base model with `--transformer-path`."""
    base = base_model or "<base model>"
    return model_card(
        title=f"FP8 transformer ({class_name})", base_model=base_model, family_title=family_title,
        fp8_components=["transformer"], license=license,
        serve=serve_commands(base=base, transformer="<this folder>", extra_flags=extra_flags),
        load_python=f'pipe = fp8cookbook.load_pipeline("{base}", fp8="<this folder>")', details=details,
        video=video)


def _saved_card(model: Any, config: dict[str, Any]) -> str:
    """The card of a saved FP8 transformer: base_model and license from the card of the folder it was loaded
    from (else the family's hub id and no license), the family's serve flags."""
    from .families import family_for_class

    meta = getattr(model, "fp8_card_metadata", None) or {}
    cls = config.get("_class_name")
    fam = family_for_class(cls) if isinstance(cls, str) else None
    base_model = meta.get("base_model") if isinstance(meta.get("base_model"), str) else (fam.hub_id if fam else None)
    return transformer_card(cls, base_model=base_model, family_title=fam.title if fam else None,
                            license={k: meta[k] for k in ("license", "license_name", "license_link") if meta.get(k)},
                            video=bool(fam and fam.is_video), extra_flags=fam.sglang_extra_flags if fam else (),
                            details=["saved by fp8cookbook from a loaded FP8 transformer (save_pretrained)"])


def save_fp8_transformer(model: Any, save_directory: str | Path, *, overwrite: bool = False,
                         max_shard_size: int | str = "10GB", push_to_hub: bool = False, **_: Any) -> Path:
    """Write a transformer loaded by `load_fp8_transformer` as a complete FP8 checkpoint in SGLang's format.

    This is what `model.save_pretrained` does for such a model (the loader installs it): config.json with the
    `quantization_config` the model was loaded with, FP8 weights with their [1] scales, shard metadata, index,
    the Q/K/V side file when the source had one, and a model card. A plain diffusers `save_pretrained` would drop
    the quantization_config, and every reader would take the FP8 codes for BF16 weights. Written beside the
    target and renamed in after `inspect_checkpoint` passes. `max_shard_size` and the other diffusers keywords
    are accepted for compatibility; one shard is written.
    """
    from .checkpoint import (ATTENTION_SCALES_NAME, INDEX_NAME, StreamingShardWriter, shard_metadata,
                             write_json_atomic)

    if push_to_hub:
        raise Fp8CookbookError("save_pretrained(push_to_hub=True) is not supported for FP8 transformers: save, "
                               "then upload the folder (huggingface-cli upload)")
    qc = getattr(model, "fp8_quantization_config", None)
    if not isinstance(qc, dict):
        raise Fp8CookbookError("this model was not loaded by fp8cookbook.load_fp8_transformer: no FP8 "
                               "quantization_config to save with it")
    out = Path(save_directory).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise Fp8CookbookError(f"{out}: already exists and is not empty (pass overwrite=True to replace it)")
    state = {k: v for k, v in model.state_dict().items()}
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in sorted(state.items())]
    # staged beside `out` (the umask's modes, not mkdtemp's 0700); an existing empty folder is replaced, as
    # diffusers' save_pretrained writes into one
    with staged_dir(out, overwrite=out.exists()) as tmp:
        model.save_config(tmp)  # diffusers' own config.json (class, version, hyper-parameters)
        config = json.loads((tmp / "config.json").read_text())
        config["quantization_config"] = qc
        shard = "diffusion_pytorch_model.safetensors"
        meta = shard_metadata(qc)
        meta.update({"_class_name": str(config.get("_class_name")), "config": json.dumps(config, sort_keys=True)})
        with StreamingShardWriter(tmp / shard, layout, meta) as writer:
            for name, _, _ in layout:
                writer.write(name, state[name])
            total = writer.total_bytes
        write_json_atomic(tmp / INDEX_NAME, {"metadata": {"total_size": total},
                                             "weight_map": {name: shard for name, _, _ in layout}}, sort_keys=True)
        write_json_atomic(tmp / "config.json", config, sort_keys=True)
        side = getattr(model, "fp8_attention_scales_text", None)
        if side:
            (tmp / ATTENTION_SCALES_NAME).write_text(side)
        (tmp / CARD_NAME).write_text(_saved_card(model, config))
        problems = inspect_checkpoint(tmp).problems
        if problems:
            raise Fp8CookbookError(f"{out}: the saved checkpoint is inconsistent: {problems[0]}")
    return out


# ---------------------------------------------------------------------------------------------------- inspect
def inspect_path(path: str | Path) -> tuple[list[str], dict[str, Any], bool]:
    """`fp8cookbook inspect` for any layout: report lines, the same as JSON, and whether everything passed.

    A bare FP8 folder gives `inspect_checkpoint`'s report; a repo one line per component plus the report of each
    FP8 one. Anything that holds FP8 codes without a quantization_config, cannot be read, or is in a format this
    project does not check is a failure with its reason; a BF16 component (or a repo's scheduler/tokenizer) is
    named as such.
    """
    from dataclasses import asdict

    layout = detect_layout(path)
    if not layout.is_repo:  # one folder that cannot be read is an input error (exit 2), as for convert and load
        for comp in layout.components.values():
            if comp.error is not None:
                raise comp.error
    ok = True
    lines = [f"path             {layout.path}", f"layout           {layout.layout}"
             + (f" ({layout.pipeline_class})" if layout.pipeline_class else "")]
    data: dict[str, Any] = {"path": str(layout.path), "layout": layout.layout,
                            "pipeline_class": layout.pipeline_class, "components": {}}
    judged_fail = (FP8_UNMARKED, UNREADABLE, OTHER_QUANT) if layout.is_repo else (FP8_UNMARKED, UNREADABLE,
                                                                                   OTHER_QUANT, CONFIG_ONLY)
    if layout.is_repo and not layout.fp8_components():
        ok = False
        lines.append("PROBLEM          no FP8 component: nothing here is an FP8 checkpoint")
    for name, comp in layout.components.items():
        entry: dict[str, Any] = {"kind": comp.kind, "class_name": comp.class_name, "producer": comp.producer,
                                 "note": comp.note}
        if comp.is_fp8:
            report = inspect_checkpoint(comp.path)
            entry["report"] = asdict(report)
            ok = ok and not report.problems
            status = "consistent" if not report.problems else f"{len(report.problems)} problem(s)"
            body = report.lines()
        else:
            failed = comp.kind in judged_fail
            ok = ok and not failed
            status = ("PROBLEM: " if failed else "") + comp.note
            body = []
        data["components"][name or "."] = entry
        if layout.is_repo:
            lines.append(f"  {name:16s} {comp.kind:12s} {comp.class_name or '-':28s} {status}")
            lines += ["      " + line for line in body]
        else:
            lines += [f"kind             {comp.kind}" + (f" ({comp.note})" if comp.is_fp8 else "")]
            lines += body or [f"{'PROBLEM' if comp.kind in judged_fail else 'status':16s} {comp.note}"]
    return lines, data, ok
