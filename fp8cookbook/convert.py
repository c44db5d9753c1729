"""Convert a ModelOpt diffusers export into the FP8 checkpoint SGLang loads (spec sections 3-5).

Streaming by design: the plan is made from safetensors headers alone, then each output tensor is read,
transformed and written before the next is touched, so memory holds one model tensor plus the amax table.
Output goes to a temporary folder beside the target, is checked with `inspect_checkpoint`, and is renamed into
place only when everything succeeded (`files.staged_dir`: exclusive for a new target, an atomic swap with
`overwrite`). No target may be, hold or lie inside an input, symlinks resolved, so an input is never changed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from .version import __version__
from .checkpoint import (FP8_DTYPE, FP8_MAX, INDEX_NAME, INPUT_SCALE, STATS_NAME, WEIGHT_SCALE, IgnoreRules,
                         StreamingShardWriter, TensorReader, inspect_checkpoint, module_of, quant_config, read_config,
                         read_quant_info, shard_metadata, write_attention_scales)
from .console import ProgressLines, progress_style
from .errors import Fp8CookbookError
from .files import (check_scale, check_target, open_regular, staged_dir, write_json_atomic,
                    write_text_atomic)
from .families import Family, family_for_class, get_family
from .fp8.numerics import quantize_fp8
from .repo import (LINK_MODES, classify_folder, detect_layout, license_fields, local_pipeline_dir, transformer_card,
                   write_full_repo)


@dataclass
class ConvertStats:
    """What the converter did; saved as JSON in the output and printed at the end."""

    export_dir: str
    output_dir: str
    family: str | None
    quantized_weights: int = 0  # FP8 layers in the output
    quantized_from_state_file: int = 0  # of those, quantized here from BF16 weights and state-file amaxes
    bf16_fallback_weights: int = 0  # family profile or --keep-bf16, taken from the base transformer
    preserved_ignored_weights: int = 0  # weights that had no scales and stay as exported
    scale_tensors: int = 0
    dropped_quantizer_tensors: int = 0
    attention_scales: int = 0
    shards: int = 0
    total_bytes: int = 0
    ignore: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    dry_run: bool = False

    def lines(self) -> list[str]:
        gbps = self.total_bytes / 1e9 / self.seconds if self.seconds else 0.0
        return [
            f"quantized weights (FP8)       {self.quantized_weights}"
            + (f" ({self.quantized_from_state_file} from state-file amaxes)" if self.quantized_from_state_file else ""),
            f"BF16-fallback weights         {self.bf16_fallback_weights}",
            f"preserved ignored weights     {self.preserved_ignored_weights}",
            f"scale tensors                 {self.scale_tensors}",
            f"dropped _quantizer. tensors   {self.dropped_quantizer_tensors}",
            f"attention scales (side file)  {self.attention_scales}",
            f"ignore patterns               {len(self.ignore)}",
            f"output shards                 {self.shards} ({self.total_bytes / 1e9:.3f} GB)",
        ] + ([] if self.dry_run else [f"time                          {self.seconds:.2f} s ({gbps:.2f} GB/s), peak RSS {self.peak_rss_mb:.0f} MB"])


@dataclass
class _Out:
    """One planned output tensor and how to produce it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]
    shard: str  # output shard file: the export's shard that held the tensor (SGLang keeps the export's layout)
    work: int = 1  # host bytes that making it holds, per output byte (7 when quantized here: BF16 in, float32, out)

    @property
    def held_bytes(self) -> int:
        return self.work * math.prod(self.shape) * self.dtype.itemsize


class _MemoryBudget:
    """Bytes that the shard writers may hold at once; a tensor larger than the whole budget waits to run alone.
    Keeps the converter's peak RSS bounded while shards are written in parallel."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int):
        with self._cond:
            self._cond.wait_for(lambda: self.held == 0 or self.held + nbytes <= self.limit)
            self.held += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.held -= nbytes
                self._cond.notify_all()


WRITERS = 4  # shards written at once: one writer leaves the disk idle while it reads, copies and fsyncs
WRITE_BUDGET = 1 << 30  # bytes of tensors those writers hold at once (the 2 GB peak-RSS target, with torch itself)


def resolve_export_dir(path: str | Path) -> Path:
    """Accept the transformer folder itself or a pipeline export holding exactly one transformer."""
    path = Path(path)
    if not path.exists():
        raise Fp8CookbookError(f"{path}: export folder does not exist")
    if os.path.lexists(path / "config.json"):
        return path  # read_config then refuses anything but a regular file
    subs = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name.startswith("transformer") and (p / "config.json").is_file())
    if len(subs) == 1:
        return path / subs[0]
    if len(subs) > 1:
        raise Fp8CookbookError(f"{path}: holds several transformers ({', '.join(subs)}); convert each folder separately")
    raise Fp8CookbookError(f"{path / 'config.json'}: missing (expected a ModelOpt diffusers export)")


def load_amax_table(state_file: str | Path) -> dict[str, float]:
    """`M.weight_quantizer` / `M.input_quantizer` amaxes from an `mto.save` file, read without running pickled code."""
    path = Path(state_file)
    if not path.exists():
        raise Fp8CookbookError(f"{path}: state file does not exist")
    os.close(open_regular(path))  # a FIFO or a device would block or stream forever
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError for code, RuntimeError for corrupt zip files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Fp8CookbookError(f"{path}: refused as a ModelOpt state file (weights_only load failed: {first})") from None
    sd = state.get("model_state_dict", state) if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        raise Fp8CookbookError(f"{path}: expected a dict with 'model_state_dict', found {type(state).__name__}")
    table: dict[str, float] = {}
    for key, value in sd.items():
        if not (isinstance(key, str) and key.endswith("_quantizer._amax")):
            continue
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            continue  # per-channel amaxes are not per-tensor FP8; such layers stay BF16
        table[key] = float(value.float().reshape(()))
    del state, sd
    return table


MAX_KEEP_BF16 = 64  # --keep-bf16 patterns
MAX_REGEX_LENGTH = 1_000


def compile_keep_bf16(patterns: Iterable[str]) -> list[Any]:
    """--keep-bf16 regexes compiled with RE2, which matches in time linear in the name (no backtracking blow-up
    such as `(a+)+$`); back-references and look-arounds, which need backtracking, are refused by name."""
    import re2

    patterns = list(patterns)
    if len(patterns) > MAX_KEEP_BF16:
        raise Fp8CookbookError(f"--keep-bf16: {len(patterns)} patterns, more than the {MAX_KEEP_BF16} allowed")
    options = re2.Options()
    options.log_errors = False  # RE2 would print its own copy of the error on stderr
    options.max_mem = 8 << 20
    rules = []
    for p in patterns:
        if not isinstance(p, str) or len(p) > MAX_REGEX_LENGTH:
            raise Fp8CookbookError(f"--keep-bf16: pattern longer than {MAX_REGEX_LENGTH} characters")
        try:
            rules.append(re2.compile(p, options))
        except re2.error as e:
            msg = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
            raise Fp8CookbookError(f"--keep-bf16 {p!r}: invalid regex for RE2's linear-time matching ({msg})") from None
    return rules


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def protect_inputs(output_dir: Path, inputs: Iterable[Path | None]) -> None:
    """Refuse an output that is, holds or lies inside an input (after resolving symlinks): writing it, or swapping
    it out with --overwrite, would change or delete that input."""
    out = output_dir.resolve()
    for inp in inputs:
        if inp is None:
            continue
        real = Path(inp).resolve()
        if _within(out, real) or _within(real, out):
            rel = "is" if out == real else ("lies inside" if _within(out, real) else "holds")
            raise Fp8CookbookError(f"{output_dir}: the output {rel} the input {inp}; choose a folder outside the inputs")


def _input_files(reader: TensorReader) -> list[Path]:
    """A folder and every file read from it (shards may be symlinks into a cache elsewhere)."""
    return [reader.folder, reader.folder / "config.json", *{t.file for t in reader.index.values()}]


def _fp8_shape_ok(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and shape[0] % 16 == 0 and shape[1] % 16 == 0


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec, so a
    converter started from a big parent would report the parent's footprint."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 if sys.platform != "darwin" else kb / 1024**2
    except ImportError:  # Windows
        return 0.0


def base_from_quantize_report(export_dir: str | Path) -> Path | None:
    """The BF16 transformer `fp8cookbook quantize` recorded for this export (QUANTIZE_DIR/quantize.json, key
    paths.NAME.base), so that re-converting an export with other --keep-bf16 rules needs no path hunting; None when
    the export did not come from `quantize`."""
    import json

    export_dir = Path(export_dir).resolve()
    report = export_dir.parent.parent / "quantize.json"
    try:
        paths = json.loads(report.read_text())["paths"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for entry in paths.values() if isinstance(paths, dict) else ():
        if isinstance(entry, dict) and entry.get("export") and entry.get("base") \
                and (report.parent / entry["export"]).resolve() == export_dir:
            return (report.parent / entry["base"]).resolve()  # relative entries are relative to quantize.json
    return None


def convert_checkpoint(
    export_dir: str | Path,
    output_dir: str | Path,
    *,
    state_file: str | Path | None = None,
    base_transformer: str | Path | None = None,
    family: str = "auto",
    keep_bf16: Iterable[str] = (),
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = True,
) -> ConvertStats:
    """Write `output_dir` in SGLang's FP8 format from a ModelOpt export; see the module docstring."""
    t0 = time.perf_counter()
    given_export = Path(export_dir)
    export_dir = resolve_export_dir(export_dir)
    output_dir = Path(output_dir)
    protect_inputs(output_dir, [given_export, export_dir, state_file, base_transformer])
    if not dry_run:
        check_target(output_dir, overwrite)
    user_rules = compile_keep_bf16(keep_bf16)  # searched anywhere in the name, like SGLang's --keep-bf16-pattern

    config_path = export_dir / "config.json"
    config = read_config(export_dir)
    info = read_quant_info(config, str(config_path))
    if info is None:
        raise Fp8CookbookError(f"{config_path}: no quantization_config; is this a ModelOpt export?")
    if info.quant_algo != "FP8":
        raise Fp8CookbookError(f"{config_path}: quant_algo is {info.quant_algo!r}; only 'FP8' can be converted")
    fam = _pick_family(family, config.get("_class_name"), config_path)

    export = TensorReader(export_dir)
    base = TensorReader(Path(base_transformer)) if base_transformer else None
    protect_inputs(output_dir, _input_files(export) + (_input_files(base) if base else []))
    if base is not None:
        coded = [n for n, t in base.index.items() if t.dtype == FP8_DTYPE or n.endswith((f".{WEIGHT_SCALE}", f".{INPUT_SCALE}"))]
        if coded:  # fallback layers come from here as BF16: FP8 codes would be copied as if they were weights
            raise Fp8CookbookError(f"{base.folder}: the base transformer must be the original BF16 one, but it holds "
                                   f"FP8 weights or scales ({coded[0]}, {len(coded)} in all)")
        base_class = read_config(base.folder).get("_class_name")
        if base_class != config.get("_class_name"):
            raise Fp8CookbookError(f"{base.folder / 'config.json'}: _class_name {base_class!r} differs from the export's "
                                   f"{config.get('_class_name')!r}")
        for name, t in export.index.items():
            b = base.index.get(name)
            if b is not None and b.shape != t.shape:
                raise Fp8CookbookError(f"{name}: shape {list(t.shape)} in {t.file} but {list(b.shape)} in {b.file}")
    amax = load_amax_table(state_file) if state_file else {}
    for key, value in amax.items():
        check_scale(key, value, state_file)  # type: ignore[arg-type]

    stats = ConvertStats(str(export_dir), str(output_dir), fam.name if fam else None, dry_run=dry_run)
    plan, ignore, attention = _plan(export, base, amax, fam, user_rules, info.rules, stats)
    if stats.quantized_weights == 0:
        hint = "" if state_file else " (a BF16 export needs --state-file with the ModelOpt amaxes)"
        raise Fp8CookbookError(f"{export_dir}: no layer would be FP8{hint}")
    ignore = sorted(set(ignore) | set(info.ignore))
    stats.ignore = ignore
    qconfig = output_quant_config(config["quantization_config"] if "quantization_config" in config else {}, ignore)
    shards: dict[str, list[_Out]] = {}
    for o in plan:
        shards.setdefault(o.shard, []).append(o)
    stats.shards = len(shards)
    stats.total_bytes = sum(math.prod(o.shape) * o.dtype.itemsize for o in plan)
    if dry_run:
        export.close()
        return stats

    try:
        with staged_dir(output_dir, overwrite=overwrite, need_bytes=stats.total_bytes + (1 << 20)) as tmp:
            _write(tmp, shards, qconfig, config, stats, attention, progress, export)
            write_text_atomic(tmp / "README.md", _model_card(config, stats, base_transformer))
            report = inspect_checkpoint(tmp)
            if report.problems:
                raise Fp8CookbookError(f"{output_dir}: converted checkpoint is inconsistent: {report.problems[0]}"
                                       + (f" (+{len(report.problems) - 1} more)" if len(report.problems) > 1 else ""))
            stats.seconds = time.perf_counter() - t0
            stats.peak_rss_mb = peak_rss_mb()
            write_json_atomic(tmp / STATS_NAME, asdict(stats))
    finally:
        export.close()
        if base is not None:
            base.close()
    return stats


def _pick_family(family: str, class_name: str | None, config_path: Path) -> Family | None:
    if family == "none":
        return None
    if family == "auto":
        return family_for_class(class_name)
    fam = get_family(family)
    if class_name is not None and fam.class_name != class_name:
        raise Fp8CookbookError(f"{config_path}: _class_name is {class_name!r}, but family {fam.name} expects {fam.class_name!r}")
    return fam


def _plan(export: TensorReader, base: TensorReader | None, amax: dict[str, float], fam: Family | None,
          user_rules: list[Any], export_ignore: IgnoreRules,
          stats: ConvertStats) -> tuple[list[_Out], list[str], dict[str, float]]:
    """Decide, per module, FP8 (kept or quantized here), BF16 fallback, or preserved; return the output tensors."""
    index = export.index
    modules = sorted({module_of(n) for n in index if n.endswith(".weight")})
    attention: dict[str, float] = {}
    for n in index:
        if "_quantizer." in n:
            stats.dropped_quantizer_tensors += 1
            if n.endswith("_bmm_quantizer._amax"):  # lands in the attention side file: same rule as a scale
                attention[n.removesuffix("._amax")] = check_scale(n, export.get(n), export.index[n].file)
    stats.attention_scales = len(attention)

    # module -> (weight maker, w_scale, x_scale, host bytes per output byte while making it)
    fp8: dict[str, tuple[Callable[[], torch.Tensor], float, float, int]] = {}
    from_base: set[str] = set()
    ignore: list[str] = []
    for m in modules:
        w = index[f"{m}.weight"]
        fallback = (fam is not None and fam.is_fallback(m)) or any(r.search(m) for r in user_rules)
        if fallback:
            if base is None:
                raise Fp8CookbookError(f"{m}: BF16-fallback layer (family profile or --keep-bf16) needs --base-transformer, "
                                       "the original BF16 weights (the export may hold it as FP8 or FP16)")
            if f"{m}.weight" not in base:
                raise Fp8CookbookError(f"{base.folder}: base transformer lacks {m}.weight")
            from_base.add(m)
            stats.bf16_fallback_weights += 1
            ignore += [m] + (fam.sglang_aliases(m) if fam else [])
            continue
        ws_name, xs_name = f"{m}.{WEIGHT_SCALE}", f"{m}.{INPUT_SCALE}"
        if w.dtype == FP8_DTYPE:
            if ws_name not in index:
                raise Fp8CookbookError(f"{w.file}: FP8 weight {m}.weight has no {ws_name}")
            ws = check_scale(ws_name, export.get(ws_name), index[ws_name].file)
            if xs_name in index:
                xs = check_scale(xs_name, export.get(xs_name), index[xs_name].file)
            elif f"{m}.input_quantizer._amax" in amax:
                xs = amax[f"{m}.input_quantizer._amax"] / FP8_MAX
            else:
                raise Fp8CookbookError(f"{w.file}: FP8 weight {m}.weight has no {xs_name}")
            if not _fp8_shape_ok(w.shape):
                raise Fp8CookbookError(f"{w.file}: FP8 weight {m}.weight has shape {list(w.shape)}; K and N must be "
                                       "multiples of 16 (add it to --keep-bf16 with --base-transformer)")
            fp8[m] = (lambda n=f"{m}.weight": export.get(n), ws, xs, 1)
            continue
        wa, xa = amax.get(f"{m}.weight_quantizer._amax"), amax.get(f"{m}.input_quantizer._amax")
        # ModelOpt disables filtered layers after calibration, so their amaxes remain: the export's ignore decides.
        if (wa is not None and xa is not None and _fp8_shape_ok(w.shape) and w.dtype.is_floating_point
                and not export_ignore.matches(m)):
            ws = wa / FP8_MAX
            # The scale is float32 amax/448, exactly what ModelOpt writes; saturation guards bf16 rounding of amax.
            fp8[m] = (lambda n=f"{m}.weight", s=ws: quantize_fp8(export.get(n), torch.tensor(s, dtype=torch.float32)), ws, xa / FP8_MAX, 7)
            stats.quantized_from_state_file += 1
            continue
        stats.preserved_ignored_weights += 1
        ignore += [m] + (fam.sglang_aliases(m) if fam else [])
    stats.quantized_weights = len(fp8)
    stats.scale_tensors = 2 * len(fp8)

    plan: list[_Out] = []
    for name in sorted(index):
        if "_quantizer." in name or name.endswith((f".{WEIGHT_SCALE}", f".{INPUT_SCALE}")) and module_of(name) not in fp8:
            continue
        m = module_of(name)
        if m in fp8 and name.endswith((f".{WEIGHT_SCALE}", f".{INPUT_SCALE}")):
            continue  # re-emitted below as [1] fp32, beside the weight
        if m in fp8 and name == f"{m}.weight":
            make, ws, xs, work = fp8[m]
            shape = index[name].shape
            shard = index[name].file.name
            plan.append(_Out(name, FP8_DTYPE, shape, make, shard, work))
            for suffix, value in ((WEIGHT_SCALE, ws), (INPUT_SCALE, xs)):
                plan.append(_Out(f"{m}.{suffix}", torch.float32, (1,), lambda v=value: torch.tensor([v], dtype=torch.float32), shard))
            continue
        shard = index[name].file.name
        if m in from_base and name in base.index:  # type: ignore[union-attr]
            info = base.index[name]  # type: ignore[union-attr]
            plan.append(_Out(name, info.dtype, info.shape, lambda n=name: base.get(n), shard))  # type: ignore[union-attr]
            continue
        info = index[name]
        plan.append(_Out(name, info.dtype, info.shape, lambda n=name: export.get(n), shard))
    return plan, ignore, attention


def output_quant_config(export_qc: dict, ignore: list[str]) -> dict:
    """The export's flat config as SGLang's converter writes it: `quant_type` added, `ignore` replaced, and
    `kv_cache_scheme` dropped (spec section 3); ModelOpt's `producer` is kept."""
    qc = {k: v for k, v in export_qc.items() if k != "kv_cache_scheme"}
    defaults = quant_config(ignore, __version__)
    for key in ("quant_method", "quant_algo", "config_groups", "producer"):
        qc.setdefault(key, defaults[key])
    qc["quant_type"] = "FP8"
    qc["ignore"] = sorted(set(ignore))
    return qc


def _write(folder: Path, shards: dict[str, list[_Out]], qconfig: dict, config: dict, stats: ConvertStats,
           attention: dict[str, float], progress: bool, export: TensorReader) -> None:
    weight_map: dict[str, str] = {}
    out_config = {k: v for k, v in config.items() if k != "quantization_config"}
    out_config["quantization_config"] = qconfig
    total = sum(len(s) for s in shards.values())
    style = progress_style(progress)
    lines = ProgressLines("convert tensor", total) if style == "lines" else None
    budget, done, lock = _MemoryBudget(WRITE_BUDGET), [0], threading.Lock()

    def write_shard(fname: str, shard: list[_Out], bar: tqdm) -> None:
        meta = dict(export.metadata(fname))
        meta.update(shard_metadata(qconfig))
        meta.update({"_class_name": str(config.get("_class_name")), "config": json.dumps(out_config, sort_keys=True)})
        with StreamingShardWriter(folder / fname, [(o.name, o.dtype, o.shape) for o in shard], meta) as writer:
            for o in shard:
                with budget.hold(o.held_bytes):
                    writer.write(o.name, o.make())
                with lock:
                    done[0] += 1
                    bar.update(1)
                    if lines is not None:
                        lines(done[0])

    # shards in parallel, each written in order by one thread: the same bytes as one writer, in less time
    with tqdm(total=total, desc="convert", unit="tensor", disable=style != "bar") as bar, \
            ThreadPoolExecutor(max_workers=max(1, min(WRITERS, len(shards)))) as pool:
        jobs = [pool.submit(write_shard, fname, shard, bar) for fname, shard in shards.items()]
        try:
            for job in jobs:
                job.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the caller removes the half-written folder
            raise
    weight_map.update({o.name: fname for fname, shard in shards.items() for o in shard})
    index_name = export.index_name or INDEX_NAME
    # sorted keys at every level, as SGLang's converter writes them
    write_json_atomic(folder / index_name, {"metadata": {"total_size": stats.total_bytes}, "weight_map": weight_map}, sort_keys=True)
    write_json_atomic(folder / "config.json", out_config, sort_keys=True)
    if attention:
        write_attention_scales(folder, attention)


def _model_card(config: dict, stats: ConvertStats, base_transformer: str | Path | None) -> str:
    """The folder's model card, with Hugging Face front matter; the license is the base model's, when its card (in
    the base transformer folder or the pipeline folder above it) has one."""
    fam = get_family(stats.family) if stats.family else None
    license = {}
    if base_transformer is not None:
        license = license_fields(base_transformer) or license_fields(Path(base_transformer).parent)
    return transformer_card(
        config.get("_class_name"), base_model=fam.hub_id if fam else None, family_title=fam.title if fam else None,
        license=license, video=bool(fam and fam.is_video), extra_flags=fam.sglang_extra_flags if fam else (),
        details=[f"FP8 layers: {stats.quantized_weights}", f"BF16 fallback layers: {stats.bf16_fallback_weights}",
                 f"other BF16 weights: {stats.preserved_ignored_weights}", f"family profile: {stats.family}",
                 "converted by fp8cookbook from an NVIDIA ModelOpt export"])


# --------------------------------------------------------------------------------------- converting a repo
def convert_repo(export: str | Path, output_dir: str | Path, *, base: str | Path | None = None,
                 component: str = "transformer", state_file: str | Path | None = None, full_repo: bool = False,
                 link: str = "hardlink", family: str = "auto", keep_bf16: Iterable[str] = (),
                 base_model: str | None = None, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Convert a whole-pipeline ModelOpt export (`export_hf_checkpoint(pipeline)`), or one transformer export.

    A repo input has every FP8 component converted; a folder input is the `component` (with `state_file` for a
    BF16 export). Writes `output_dir/<component>/` (one FP8 checkpoint each, for `--transformer-path`), or with
    `full_repo` a complete diffusers repo (`write_full_repo`: the repo input's other components, or `base`'s for a
    folder input, linked or copied). `base` is the original BF16 pipeline: its component folders give the
    BF16-fallback weights (needed for FLUX.1 and FLUX.2) and its model card the license. Everything is written
    beside `output_dir` and renamed in at the end. Returns {component: ConvertStats}.
    """
    layout = detect_layout(export)
    base_dir = local_pipeline_dir(base) if base is not None else None
    if layout.is_repo:
        if state_file is not None:
            raise Fp8CookbookError(f"{export}: --state-file goes with one transformer export, not a whole repo")
        names = layout.fp8_components()
        if not names:
            raise Fp8CookbookError(f"{export}: no component holds an FP8 quantization_config ("
                                   + "; ".join(f"{n}: {c.note}" for n, c in layout.components.items()) + ")")
        sources = {n: layout.components[n].path for n in names}
        rest = layout.path
    else:
        sources = {component: Path(export)}
        rest = base_dir
        if full_repo and base_dir is None:
            raise Fp8CookbookError("a full repo from one transformer export needs --base, the BF16 pipeline whose "
                                   "other components it takes")
    output_dir = Path(output_dir).expanduser()
    if link not in LINK_MODES:
        raise Fp8CookbookError(f"link must be one of {', '.join(LINK_MODES)}, got {link!r}")
    protect_inputs(output_dir, [Path(export), *sources.values(), base_dir, state_file])
    with staged_dir(output_dir, overwrite=overwrite) as stage:
        stats = {}
        for name, src in sources.items():
            base_transformer = base_dir / name if base_dir is not None and (base_dir / name).is_dir() else None
            stats[name] = convert_checkpoint(src, stage / name, base_transformer=base_transformer, family=family,
                                             keep_bf16=keep_bf16, state_file=state_file, progress=progress)
            stats[name].output_dir = str(output_dir / name)  # the converter recorded the staging folder
            write_json_atomic(stage / name / STATS_NAME, asdict(stats[name]))
        if full_repo:
            fam = family_for_class(classify_folder(stage / next(iter(sources))).class_name)
            write_full_repo(rest, {n: stage / n for n in sources}, stage / "repo", link=link,
                            base_model=base_model or (fam.hub_id if fam else None),
                            family_title=fam.title if fam else None, video=bool(fam and fam.is_video),
                            extra_flags=fam.sglang_extra_flags if fam else (),
                            license=license_fields(base_dir if base_dir is not None else rest))
            # the repo is what is published: its FP8 components move in, the per-component folders go
            for name in sources:
                shutil.rmtree(stage / name)
            for entry in (stage / "repo").iterdir():
                os.replace(entry, stage / entry.name)
            (stage / "repo").rmdir()
    return stats
