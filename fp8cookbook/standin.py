"""Full-size stand-ins for a download: a family's real pipeline configs with seeded random weights.

Why: time, GPU memory, host memory and disk of every stage depend on the shapes, not on the values, so a folder of
the real configs with random weights tests a GPU, a disk and a setup before a 60 GB download, and lets the project
measure the real job without the real weights. `write_standin` writes a complete diffusers pipeline folder (every
component's config and weights, tokenizers built offline, scheduler, `model_index.json`) that `load_pipeline` and
`model_path` take exactly like a download; `build_standin_pipeline` builds the same pipeline in memory (for the
models whose folder plus outputs do not fit a disk).

Sizes come from the configs on the meta device (nothing allocated), so the size table is printed before anything
is written. Weights are streamed: each tensor is drawn in fixed 64 MiB slices, each slice from its own generator
seeded by (seed, component, tensor, slice), so the values do not depend on thread count or order, and a folder is
never more than a few slices in memory. Safetensors shards are written tensor by tensor into a staging folder
beside the target, renamed into place only when everything is written.

Values: matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.02), other vectors N(0, 0.02); buffers (e.g. the FLUX.2
VAE's batch-norm statistics) keep the values the class initialises them with. Stored in BF16, like the real
checkpoints.

Deviations from the real folders, none of which changes a tensor shape: tokenizers are the offline ones of the
tiny pipelines (small vocabularies inside the real embedding sizes), so the text encoders' special-token ids are
set to that tokenizer's; FLUX.2's `tokenizer` is the `PixtralProcessor`'s inner tokenizer (see pipelines.py).

`size="reduced"` keeps the classes and config keys with small widths and few layers, for CPU tests of this very
code path (every component, sharding, index files, loading).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .checkpoint import StreamingShardWriter, keeps_float32
from .errors import Fp8CookbookError
from .families import Family, StandinComponent, get_family
from .files import OWNER_NAME, staged_dir

SIZES = ("full", "reduced")
SLICE_BYTES = 64 * 2**20  # fixed: the values depend on it (one generator per slice)
SHARD_BYTES = 5 * 10**9  # what `save_pretrained(max_shard_size="5GB")` writes
MARKER = "fp8cookbook_standin.json"
DTYPE = torch.bfloat16

# --------------------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """Everything `write_standin` writes for one family at one size."""

    family: Family
    size: str
    components: tuple[StandinComponent, ...]
    scheduler: tuple[str, dict[str, Any]]
    tokenizers: dict[str, Callable[[], Any]]
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)  # boundary_ratio, expand_timesteps

    def component(self, name: str) -> StandinComponent:
        return next(c for c in self.components if c.name == name)


def _with_layers(family: Family, config: dict[str, Any], layers: int | None) -> dict[str, Any]:
    """The transformer config with `layers` blocks of each kind (FLUX: double and single; Wan: blocks)."""
    config = dict(config)
    if layers is not None:
        for key in ("num_layers", "num_single_layers"):
            if key in config:
                config[key] = layers
    return config


def recipe(family_name: str, size: str = "full", *, layers: int | None = None) -> Recipe:
    """The family's pipeline as classes and configs: real ones (`full`) or small ones of the same classes."""
    family = get_family(family_name)
    if size not in SIZES:
        raise Fp8CookbookError(f"unknown stand-in size {size!r}; use one of {', '.join(SIZES)}")
    if layers is not None and (isinstance(layers, bool) or int(layers) != layers or layers < 1):
        raise Fp8CookbookError(f"layers must be a positive integer, got {layers!r}")
    full = size == "full"
    tf = _with_layers(family, family.full_config if full else family.tiny_config, layers)
    repo = family.hub_id
    transformers = tuple(StandinComponent(name, "diffusers", family.class_name, tf, source=f"{repo} {name}/config.json")
                         for name in family.experts)
    if family.standin is None:
        raise Fp8CookbookError(f"no stand-in recipe for {family.title} ({family.pipeline_class})")
    parts = family.standin(family, full, tf)  # the family's file: the real configs of its other components
    return Recipe(family, size, transformers + parts.components, parts.scheduler, parts.tokenizers,
                  parts.pipeline_kwargs)


# ------------------------------------------------------------------------------------------- meta models
def _meta_model(component: StandinComponent) -> nn.Module:
    """The component's model with parameters on the meta device and buffers as the class initialises them."""
    from accelerate import init_empty_weights

    import diffusers
    import transformers

    with init_empty_weights(include_buffers=False):
        if component.library == "diffusers":
            return getattr(diffusers, component.class_name)(**component.config)
        config = getattr(transformers, component.config_class)(**component.config)
        config.dtype = "bfloat16"
        model = getattr(transformers, component.class_name)(config)
    model.tie_weights()  # transformers ties embeddings on load, so a checkpoint holds them once
    return model


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    buffer: torch.Tensor | None = None  # a buffer's own value (written as it is), None for a random parameter

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def tensor_specs(model: nn.Module, dtype: torch.dtype = DTYPE, *, keep_fp32: bool = False) -> list[TensorSpec]:
    """What `save_pretrained` writes: the state dict, tied tensors once (the first name, as transformers keeps), floats
    in `dtype`, and with `keep_fp32` the `_keep_in_fp32_modules` in float32 (diffusers saves a loaded model so: the
    Wan2.2 repos hold their time embedders in float32)."""
    seen: set[int] = set()
    specs = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if not t.is_floating_point():
            dtype_here = t.dtype
        else:
            dtype_here = torch.float32 if keep_fp32 and keeps_float32(model, name) else dtype
        buffer = None if isinstance(t, nn.Parameter) else t.detach()
        specs.append(TensorSpec(name, tuple(t.shape), dtype_here, buffer))
    return specs


def _specs(component: StandinComponent, model: nn.Module) -> list[TensorSpec]:
    return tensor_specs(model, getattr(torch, component.dtype), keep_fp32=component.library == "diffusers")


@dataclass
class StandinComponentSize:
    name: str
    class_name: str
    parameters: int
    nbytes: int
    tensors: int
    source: str

    def as_dict(self) -> dict[str, Any]:
        return dict(name=self.name, class_name=self.class_name, parameters=self.parameters, bytes=self.nbytes,
                    tensors=self.tensors, source=self.source)


def size_table(plan: Recipe, components: list[str] | None = None,
               models: dict[str, nn.Module] | None = None) -> list[StandinComponentSize]:
    """Per weight component: parameter count and bytes as stored, from the configs on the meta device."""
    out = []
    for c in plan.components:
        if components is not None and c.name not in components:
            continue
        specs = _specs(c, models[c.name] if models else _meta_model(c))
        out.append(StandinComponentSize(c.name, c.class_name, sum(math.prod(s.shape) for s in specs),
                                 sum(s.nbytes for s in specs), len(specs), c.source))
    return out


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.2f} MB"


def size_lines(plan: Recipe, sizes: list[StandinComponentSize]) -> list[str]:
    """The size table: one line per component and the total."""
    lines = [f"{plan.family.title} stand-in ({plan.size} size): weights",
             f"  {'component':16s} {'class':34s} {'parameters':>14s} {'size':>10s}"]
    for s in sizes:
        lines.append(f"  {s.name:16s} {s.class_name:34s} {s.parameters:14,d} {_gb(s.nbytes):>10s}")
    total = sum(s.nbytes for s in sizes)
    lines.append(f"  {'total':16s} {'':34s} {sum(s.parameters for s in sizes):14,d} {_gb(total):>10s}")
    return lines


# ------------------------------------------------------------------------------------------------- values
def _slice_seed(seed: int, component: str, tensor: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{component}/{tensor}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _slices(spec: TensorSpec) -> list[tuple[int, int]]:
    """Row ranges of at most SLICE_BYTES each (a 0-d or 1-d tensor is one slice)."""
    if len(spec.shape) < 2:
        return [(0, spec.shape[0] if spec.shape else 1)]
    row_bytes = math.prod(spec.shape[1:]) * spec.dtype.itemsize
    step = max(1, SLICE_BYTES // row_bytes)
    return [(i, min(i + step, spec.shape[0])) for i in range(0, spec.shape[0], step)]


def _draw(spec: TensorSpec, rows: tuple[int, int], seed: int) -> torch.Tensor:
    """One slice of a tensor's values (see the module docstring for the distribution)."""
    lo, hi = rows
    if spec.buffer is not None:
        t = spec.buffer if spec.buffer.dim() == 0 else spec.buffer[lo:hi]
        return t.to(spec.dtype).contiguous()
    shape = (hi - lo, *spec.shape[1:]) if spec.shape else ()
    g = torch.Generator().manual_seed(seed)
    t = torch.empty(shape, dtype=spec.dtype)
    leaf = spec.name.rsplit(".", 1)[-1]
    if "norm" in spec.name and leaf in ("weight", "gamma"):
        return t.normal_(0.0, 0.02, generator=g).add_(1.0)
    if len(spec.shape) >= 2:
        return t.normal_(0.0, 1.0 / math.sqrt(math.prod(spec.shape[1:])), generator=g)
    return t.normal_(0.0, 0.02, generator=g)


def _stream(component: str, specs: list[TensorSpec], seed: int, workers: int
            ) -> Iterator[tuple[TensorSpec, Iterator[torch.Tensor]]]:
    """Each tensor with an iterator over its slices, drawn by `workers` threads a few slices ahead, in order."""
    jobs = [(spec, rows, _slice_seed(seed, component, spec.name, i))
            for spec in specs for i, rows in enumerate(_slices(spec))]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        position = 0

        def fill() -> None:
            nonlocal position
            while position < len(jobs) and len(pending) < 2 * workers:
                spec, rows, s = jobs[position]
                pending.append((spec, pool.submit(_draw, spec, rows, s)))
                position += 1

        def parts(spec: TensorSpec) -> Iterator[torch.Tensor]:
            for _ in _slices(spec):
                fill()
                got, future = pending.popleft()
                assert got is spec
                yield future.result()

        for spec in specs:
            yield spec, parts(spec)


# ------------------------------------------------------------------------------------------------ writing
def _weights_names(library: str) -> tuple[str, str]:
    """(single-file name, shard stem) as `save_pretrained` names them."""
    return (("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model") if library == "diffusers"
            else ("model.safetensors", "model"))


def _shard(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _write_component(component: StandinComponent, model: nn.Module, folder: Path, seed: int, workers: int,
                     shard_bytes: int, advance: Callable[[int], None]) -> None:
    folder.mkdir(parents=True)
    if component.library == "diffusers":
        model.save_config(folder)
    else:
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(folder)
    specs = _specs(component, model)
    shards = _shard(specs, shard_bytes)
    single, stem = _weights_names(component.library)
    names = ([single] if len(shards) == 1 else
             [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    stream = _stream(component.name, specs, seed, workers)
    for file_name, shard in zip(names, shards):
        layout = [(s.name, s.dtype, s.shape) for s in shard]
        with StreamingShardWriter(folder / file_name, layout, {"format": "pt"}) as writer:
            for spec in shard:
                got, parts = next(stream)
                writer.write_parts(got.name, parts)
                advance(spec.nbytes)
    stream.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: n for n, shard in zip(names, shards) for s in shard}}
        (folder / f"{single}.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _pipeline_object(plan: Recipe, modules: dict[str, Any]):
    """The diffusers pipeline object for `modules` (models, tokenizers, scheduler; absent components as None)."""
    import diffusers

    cls = getattr(diffusers, plan.family.pipeline_class)
    kwargs = {c.name: modules.get(c.name) for c in plan.components}
    kwargs.update({name: modules[name] for name in plan.tokenizers})
    kwargs["scheduler"] = modules["scheduler"]
    return cls(**kwargs, **plan.pipeline_kwargs)


def _scheduler(plan: Recipe):
    import diffusers

    name, config = plan.scheduler
    return getattr(diffusers, name)(**config)


def _check_components(plan: Recipe, components: list[str] | None) -> list[str]:
    names = [c.name for c in plan.components]
    if components is None:
        return names
    unknown = [c for c in components if c not in names]
    if unknown or not components:
        raise Fp8CookbookError(f"{plan.family.title} has components {', '.join(names)}; got {components or '[]'}")
    return [n for n in names if n in components]


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


@dataclass
class StandinResult:
    family: str
    size: str
    output_dir: Path | None
    sizes: list[StandinComponentSize]
    seed: int
    seconds: float = 0.0
    written_bytes: int = 0  # every file under the folder
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(family=self.family, size=self.size, output_dir=str(self.output_dir), seed=self.seed,
                    components=[s.as_dict() for s in self.sizes], seconds=round(self.seconds, 3),
                    written_bytes=self.written_bytes, dry_run=self.dry_run)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != OWNER_NAME)


def write_standin(family_name: str, output_dir: str | Path, *, size: str = "full", layers: int | None = None,
                  components: list[str] | None = None, seed: int = 0, overwrite: bool = False, dry_run: bool = False,
                  workers: int | None = None, shard_bytes: int = SHARD_BYTES, progress: bool | None = None,
                  log: Callable[[str], None] = print) -> StandinResult:
    """Write the family's pipeline folder of real configs (or `reduced` ones) with seeded random weights.

    `components` limits the weight components written (e.g. ["transformer"]); the others are listed as absent
    (`[null, null]`) in model_index.json, so the folder loads with them as None (pass prompt embeddings, or add the
    component yourself). Tokenizers and the scheduler are always written (a few kB). The size table is logged first;
    `dry_run` stops there. The folder is staged beside `output_dir` and renamed in at the end: a failure leaves
    nothing. `progress` None = a bar on a terminal, plain lines otherwise.
    """
    t0 = time.perf_counter()
    plan = recipe(family_name, size, layers=layers)
    wanted = _check_components(plan, components)
    output_dir = Path(output_dir).expanduser()
    if output_dir.exists() and not dry_run:
        if not overwrite:
            raise Fp8CookbookError(f"{output_dir}: already exists (pass --overwrite to replace it)")
        if not output_dir.is_dir():
            raise Fp8CookbookError(f"{output_dir}: exists and is not a folder")
    models = {c.name: _meta_model(c) for c in plan.components if c.name in wanted}
    sizes = size_table(plan, wanted, models)
    total = sum(s.nbytes for s in sizes)
    for line in size_lines(plan, sizes):
        log(line)
    result = StandinResult(plan.family.name, size, output_dir, sizes, seed, dry_run=dry_run)
    if dry_run:
        log("dry run: nothing written")
        result.seconds = time.perf_counter() - t0
        return result
    free = _free_bytes(output_dir.absolute().parent)
    need = total + 64 * 2**20
    if free < need:
        raise Fp8CookbookError(f"{output_dir}: needs {need / 1e9:.2f} GB, the disk has {free / 1e9:.2f} GB free "
                               "(use --components / --transformer-only, or another disk)")

    from tqdm.auto import tqdm

    workers = workers or min(16, os.cpu_count() or 1)
    bar_on = sys.stderr.isatty() if progress is None else progress
    with staged_dir(output_dir, overwrite=overwrite, wrap_os_errors=False) as tmp:  # renamed in at once
        with tqdm(total=total, unit="B", unit_scale=True, desc="stand-in", disable=not bar_on) as bar:
            for c in plan.components:
                if c.name not in wanted:
                    continue
                tc = time.perf_counter()
                _write_component(c, models[c.name], tmp / c.name, seed, workers, shard_bytes, bar.update)
                if not bar_on:
                    n = next(s.nbytes for s in sizes if s.name == c.name)
                    log(f"  wrote {c.name} ({_gb(n)}) in {time.perf_counter() - tc:.1f} s")
        modules: dict[str, Any] = {name: make() for name, make in plan.tokenizers.items()}
        for name, tok in modules.items():
            tok.save_pretrained(tmp / name)
        modules["scheduler"] = _scheduler(plan)
        modules["scheduler"].save_pretrained(tmp / "scheduler")
        modules.update(models)
        _pipeline_object(plan, modules).save_config(tmp)  # model_index.json; absent components are [null, null]
        result.seconds = time.perf_counter() - t0
        result.written_bytes = _folder_bytes(tmp)
        info = dict(result.as_dict(), layers=layers, all_components=[c.name for c in plan.components],
                    note="random weights in the real configs: for time, memory and disk, not for images")
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")  # the whole folder is renamed in at once
    log(f"wrote {output_dir} ({_gb(result.written_bytes)} in {result.seconds:.1f} s)")
    return result


# ---------------------------------------------------------------------------------------------- in memory
def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


@torch.no_grad()
def build_component(component: StandinComponent, *, seed: int = 0, device: str | torch.device = "cpu",
                    workers: int | None = None) -> nn.Module:
    """One component in memory with the same values `write_standin` writes, as `load_pipeline` holds it (BF16, a
    diffusers model's `_keep_in_fp32_modules` float32), drawn slice by slice straight into tensors on `device`."""
    model = _meta_model(component)
    specs = {s.name: s for s in _specs(component, model)}
    params = [(n, p) for n, p in model.named_parameters()]  # tied parameters appear once
    order = [specs[n] for n, _ in params if n in specs]
    for spec, parts in _stream(component.name, order, seed, workers or min(16, os.cpu_count() or 1)):
        # diffusers keeps `_keep_in_fp32_modules` float32 in a BF16 load; transformers 5 does so only for float16
        keep = component.library == "diffusers" and keeps_float32(model, spec.name)
        dtype = torch.float32 if keep else DTYPE if spec.dtype.is_floating_point else spec.dtype
        t = torch.empty(spec.shape, dtype=dtype, device=device)
        row = 0
        for part in parts:
            n = part.shape[0] if part.dim() else 1
            (t if t.dim() == 0 else t[row:row + n]).copy_(part)
            row += n
        _set_param(model, spec.name, t)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for name, b in list(model.named_buffers()):
        if b.is_floating_point() and not (component.library == "diffusers" and keeps_float32(model, name)):
            b.data = b.data.to(DTYPE)
    return model.to(device).eval().requires_grad_(False)


def build_standin_pipeline(family_name: str, *, size: str = "full", layers: int | None = None,
                           components: list[str] | None = None, seed: int = 0, device: str | torch.device = "cpu",
                           component_devices: dict[str, str] | None = None, workers: int | None = None):
    """The stand-in pipeline in memory (no disk): the same values as the folder `write_standin` writes.

    For models whose folder plus outputs do not fit a disk (FLUX.2-dev, Wan2.2 A14B). `component_devices` puts
    single components elsewhere, e.g. {"text_encoder": "cpu"} to keep a text encoder off the GPU; components left
    out of `components` are None.
    """
    plan = recipe(family_name, size, layers=layers)
    wanted = _check_components(plan, components)
    modules: dict[str, Any] = {name: make() for name, make in plan.tokenizers.items()}
    modules["scheduler"] = _scheduler(plan)
    for c in plan.components:
        if c.name in wanted:
            where = (component_devices or {}).get(c.name, device)
            modules[c.name] = build_component(c, seed=seed, device=where, workers=workers)
    pipe = _pipeline_object(plan, modules)
    pipe.set_progress_bar_config(disable=True)
    return pipe
