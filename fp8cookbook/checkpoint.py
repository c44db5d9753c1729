"""The on-disk FP8 checkpoint SGLang loads (spec: fp8-checkpoint-format.md): reading, writing and checking it.

Everything that knows a file name, a metadata key or a pattern rule lives here, so the converter, the loader
and `inspect` agree by construction.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import Fp8CookbookError
from .files import check_scale, open_regular, parse_json, read_json, write_json_atomic  # noqa: F401 (re-exported)

from .fp8.numerics import FP8_DTYPE, FP8_MAX  # noqa: E402,F401 - the format's dtype and range live with the numerics
WEIGHT_SCALE = "weight_scale"
INPUT_SCALE = "input_scale"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
STATS_NAME = "fp8cookbook_conversion.json"
# --quantize-mha Q/K/V amaxes, for fp8cookbook's FP8 attention: not in the index, SGLang never reads it
ATTENTION_SCALES_NAME = "fp8cookbook_attention_scales.json"

# safetensors dtype names <-> torch dtypes (the subset diffusion checkpoints use)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


# ------------------------------------------------------------------------------------------- ignore patterns
MAX_IGNORE_PATTERNS = 100_000  # ModelOpt lists every ignored module by name: thousands at most
MAX_WILDCARD_PATTERNS = 512  # patterns with `*` are checked one by one, so their number is bounded
MAX_PATTERN_LENGTH = 1_000


class IgnoreRules:
    """The `ignore` (or `exclude_modules`) patterns of a quantization config, checked in linear time.

    Spec section 4: only `*` is special and a pattern matches the whole module name. Plain names go into a set;
    each glob is split once at its stars and matched by prefix, suffix and a left-to-right search for the pieces
    between (greedy leftmost search is exact for `*`-only globs), so no pattern can backtrack, and pattern count and
    length are capped with an error that names the config.
    """

    def __init__(self, patterns: tuple[str, ...] = ()):
        self.patterns = tuple(patterns)
        self._exact = {p for p in self.patterns if "*" not in p}
        self._globs = [(parts[0], parts[1:-1], parts[-1]) for p in self.patterns if "*" in p for parts in [p.split("*")]]
        self._cache: dict[str, bool] = {}

    @classmethod
    def parse(cls, value: Any, source: str) -> "IgnoreRules":
        """Rules from a config value (a list of strings, or null); anything else is refused naming `source`."""
        if value is None:
            return cls()
        if not isinstance(value, list):
            raise Fp8CookbookError(f"{source}: must be a list of module-name patterns, found {type(value).__name__}"
                                   + (f" {value[:40]!r}" if isinstance(value, str) else ""))
        if len(value) > MAX_IGNORE_PATTERNS:
            raise Fp8CookbookError(f"{source}: {len(value)} patterns, more than the {MAX_IGNORE_PATTERNS} allowed")
        globs = 0
        for i, p in enumerate(value):
            if not isinstance(p, str):
                raise Fp8CookbookError(f"{source}: entry {i} is {type(p).__name__} {p!r}, not a module-name pattern")
            if len(p) > MAX_PATTERN_LENGTH:
                raise Fp8CookbookError(f"{source}: entry {i} is {len(p)} characters long, more than the "
                                       f"{MAX_PATTERN_LENGTH} allowed")
            globs += "*" in p
        if globs > MAX_WILDCARD_PATTERNS:
            raise Fp8CookbookError(f"{source}: {globs} patterns with `*`, more than the {MAX_WILDCARD_PATTERNS} "
                                   "allowed (list module names instead)")
        return cls(tuple(value))

    def matches(self, name: str) -> bool:
        """True if a pattern matches the whole of `name`."""
        hit = self._cache.get(name)
        if hit is None:
            hit = name in self._exact or any(_glob_match(g, name) for g in self._globs)
            self._cache[name] = hit
        return hit

    def __len__(self) -> int:
        return len(self.patterns)

    def __iter__(self):
        return iter(self.patterns)


def _glob_match(glob: tuple[str, list[str], str], name: str) -> bool:
    prefix, middles, suffix = glob
    if len(name) < len(prefix) + len(suffix) or not name.startswith(prefix) or not name.endswith(suffix):
        return False
    pos, end = len(prefix), len(name) - len(suffix)
    for piece in middles:
        i = name.find(piece, pos, end)
        if i < 0:
            return False
        pos = i + len(piece)
    return True


@lru_cache(maxsize=64)
def _rules_for(patterns: tuple[str, ...]) -> IgnoreRules:
    return IgnoreRules.parse(list(patterns), "ignore")


def ignored(module_name: str, patterns: list[str] | tuple[str, ...] | IgnoreRules) -> bool:
    """Spec section 4: only `*` is special and a pattern must match the whole module name."""
    rules = patterns if isinstance(patterns, IgnoreRules) else _rules_for(tuple(patterns))
    return rules.matches(module_name)


def keeps_float32(model: torch.nn.Module, tensor_name: str) -> bool:
    """Whether `from_pretrained` keeps this tensor in float32 whatever dtype is asked for (the model class's
    `_keep_in_fp32_modules` and `_keep_in_fp32_modules_strict`, diffusers' and transformers' rule): the Wan2.2
    repos hold their time embedders so, and a BF16 load, save, stand-in or FP8 fallback keeps them so too."""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    keep += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return any(k in tensor_name.split(".") for k in keep)


def module_of(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else ""


# ------------------------------------------------------------------------------------- quantization config
def quant_config(ignore: list[str], producer_version: str) -> dict[str, Any]:
    """The flat `quantization_config` of spec section 2."""
    group = {"dynamic": False, "num_bits": 8, "type": "float"}
    return {
        "quant_method": "modelopt",
        "quant_algo": "FP8",
        "quant_type": "FP8",
        "ignore": sorted(set(ignore)),
        "config_groups": {"group_0": {"weights": dict(group), "input_activations": dict(group), "targets": ["Linear"]}},
        "producer": {"name": "fp8cookbook", "version": producer_version},
    }


@dataclass
class QuantInfo:
    """What a loader needs from a quantization config, whichever of the two accepted forms it came in."""

    quant_algo: str | None
    ignore: list[str]
    rules: IgnoreRules = field(default_factory=IgnoreRules)


def read_quant_info(config: dict[str, Any], where: str) -> QuantInfo | None:
    """Read the flat form (`quantization_config`) or the nested one (`{"quantization": {...}}`); None if absent.

    Types are checked, so `ignore: "abc"` is refused instead of being read as the patterns a, b and c.
    """
    qc = config.get("quantization_config", config if "quantization" in config else None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise Fp8CookbookError(f"{where}: quantization_config must be an object, found {type(qc).__name__}")
    key = "quantization_config"
    if "quantization" in qc:
        if not isinstance(qc["quantization"], dict):
            raise Fp8CookbookError(f"{where}: quantization must be an object, found {type(qc['quantization']).__name__}")
        qc, key = qc["quantization"], f"{key}.quantization" if "quantization_config" in config else "quantization"
        order = ("exclude_modules", "ignore")
    else:
        order = ("ignore", "exclude_modules")
    algo = qc.get("quant_algo")
    if algo is not None and not isinstance(algo, str):
        raise Fp8CookbookError(f"{where}: {key}.quant_algo must be a string, found {type(algo).__name__} {algo!r}")
    rules = {k: IgnoreRules.parse(qc.get(k), f"{where}: {key}.{k}") for k in order}
    chosen = next((r for r in rules.values() if len(r)), IgnoreRules())
    return QuantInfo(algo, list(chosen.patterns), chosen)


MAX_CONFIG_BYTES = 16 * 2**20


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a diffusers model folder, read within bounds, with errors that name the file."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise Fp8CookbookError(f"{path}: missing (expected a diffusers transformer folder with config.json)")
    config = read_json(path, max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise Fp8CookbookError(f"{path}: expected a JSON object, found {type(config).__name__}")
    name = config.get("_class_name")
    if name is not None and not isinstance(name, str):
        raise Fp8CookbookError(f"{path}: _class_name must be a string, found {type(name).__name__} {name!r}")
    return config


# ------------------------------------------------------------------------------------------ reading shards
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_INDEX_BYTES = 64 * 2**20
MAX_DIMS = 16


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _validate_header(header: Any, size: int, data_start: int) -> None:
    """The safetensors library's rules (and a few more), each failure a ValueError naming the tensor."""
    if not isinstance(header, dict):
        raise ValueError(f"header is a JSON {type(header).__name__}, expected an object")
    meta = header.get("__metadata__")
    if meta is not None:
        if not isinstance(meta, dict):
            raise ValueError(f"__metadata__ is {type(meta).__name__}, expected an object of strings")
        for k, v in meta.items():
            if not isinstance(v, str) or not _utf8(k) or not _utf8(v):
                raise ValueError(f"__metadata__[{k!r}] is {type(v).__name__}, expected a UTF-8 string")
    spans: list[tuple[int, int, str]] = []
    for name, value in header.items():
        if name == "__metadata__":
            continue
        if not _utf8(name):
            raise ValueError(f"tensor name {name!r} is not valid UTF-8")
        if not isinstance(value, dict):
            raise ValueError(f"tensor {name}: entry is {type(value).__name__}, expected an object")
        dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise ValueError(f"tensor {name}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_uint(d) for d in shape):
            raise ValueError(f"tensor {name}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
            raise ValueError(f"tensor {name}: data_offsets {offsets!r} are not two non-negative integers")
        start, stop = offsets
        if start > stop:
            raise ValueError(f"tensor {name}: data_offsets {offsets} are out of order")
        if stop - start != math.prod(shape) * ST_DTYPES[dtype].itemsize:
            raise ValueError(f"tensor {name}: data_offsets {offsets} do not hold {shape} {dtype}")
        spans.append((start, stop, name))
    spans.sort()
    end = 0
    for start, stop, name in spans:
        if start != end:
            what = "overlap another tensor's bytes" if start < end else f"leave a gap after byte {end}"
            raise ValueError(f"tensor {name}: data_offsets [{start}, {stop}] {what}")
        end = stop
    if data_start + end > size:
        raise ValueError(f"truncated: header promises {data_start + end} bytes, file has {size}")
    if data_start + end < size:
        raise ValueError(f"{size - data_start - end} bytes after the last tensor's data")


def _read_header_and_size(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and validate a safetensors header ourselves (the data is never touched), so a corrupt file gives an
    error that names it; the safetensors library then checks it too, so we accept nothing it refuses."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} exceeds the file size {size}" if n > size - 8
                                 else f"header length {n} exceeds the {MAX_HEADER_BYTES} allowed")
            blob = f.read(n)
        if not blob.startswith(b"{"):
            raise ValueError("header does not start with '{'")
        try:
            header = parse_json(blob, "header", max_depth=4)
        except Fp8CookbookError as e:
            raise ValueError(str(e)) from None
        _validate_header(header, size, 8 + n)
        _library_check(path)
        return header, 8 + n
    except (OSError, ValueError) as e:
        raise Fp8CookbookError(f"{path}: not a readable safetensors file ({e})") from None


def _library_check(path: Path) -> None:
    """Open the header with the safetensors library as well (a memory map, no data read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: the library refuses the file
        raise ValueError(f"refused by the safetensors library: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _plain_shard_name(name: Any) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not os.path.isabs(name) and name.endswith(".safetensors") and _utf8(name))


def read_index(folder: Path) -> tuple[Path, dict[str, str]] | None:
    """The folder's `*.safetensors.index.json` and its weight_map, checked; None without an index.

    Shard names must be plain file names inside the folder: `../x`, `/etc/passwd` or `a/b` are refused before any
    shard is opened.
    """
    indexes = sorted(Path(folder).glob("*.safetensors.index.json"))
    if not indexes:
        return None
    if len(indexes) > 1:
        raise Fp8CookbookError(f"{folder}: several indexes ({', '.join(p.name for p in indexes)}); keep one")
    path = indexes[0]
    data = read_json(path, max_bytes=MAX_INDEX_BYTES, max_depth=8)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise Fp8CookbookError(f"{path}: invalid index (expected an object with a weight_map object)")
    for tensor, shard in weight_map.items():
        if not _utf8(tensor):
            raise Fp8CookbookError(f"{path}: tensor name {tensor!r} is not valid UTF-8")
        if not _plain_shard_name(shard):
            raise Fp8CookbookError(f"{path}: weight_map gives {shard!r} for {tensor}; shard names must be plain "
                                   "*.safetensors file names inside the folder")
    return path, weight_map


def shard_files(folder: Path) -> list[Path]:
    """The shards of a model folder: those the index names, else every *.safetensors file."""
    folder = Path(folder)
    index = read_index(folder)
    if index is not None:
        path, weight_map = index
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise Fp8CookbookError(f"{path}: names shard(s) that do not exist: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise Fp8CookbookError(f"{folder}: no *.safetensors files")
    return files


def scan_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Name -> dtype/shape/file for every tensor of a folder, read from headers only.

    With an index, the index and the headers must agree exactly: a shard whose header lost its tensors, or a tensor
    the index does not list, is an error (not a silently smaller model).
    """
    return _scan(Path(folder))[0]


def _scan(folder: Path) -> tuple[dict[str, TensorInfo], dict[str, dict[str, str]]]:
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, dict[str, str]] = {}
    for path in shard_files(folder):
        header, data_start = _read_header_and_size(path)
        metadata[path.name] = dict(header.get("__metadata__") or {})
        if len(header) == ("__metadata__" in header):
            raise Fp8CookbookError(f"{path}: holds no tensors")
        for name, value in header.items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise Fp8CookbookError(f"{path}: tensor {name} also stored in {tensors[name].file}")
            tensors[name] = TensorInfo(name, path, ST_DTYPES[value["dtype"]], tuple(value["shape"]),
                                       data_start + value["data_offsets"][0])
    index = read_index(folder)
    if index is not None:
        path, weight_map = index
        for name, shard in weight_map.items():
            if name not in tensors:
                raise Fp8CookbookError(f"{path}: lists {name} in {shard}, whose header does not hold it")
            if tensors[name].file.name != shard:
                raise Fp8CookbookError(f"{path}: lists {name} in {shard}, but it is stored in {tensors[name].file.name}")
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise Fp8CookbookError(f"{tensors[extra[0]].file}: tensor {extra[0]} is not listed in {path.name}"
                                   + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))
    return tensors, metadata


class TensorReader:
    """Reads one tensor at a time from a folder's shards with plain reads (no mmap), so memory holds only that tensor.

    A memory map would keep every touched page of a multi-GB shard resident; a read does not.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index, self._metadata = _scan(self.folder)
        indexes = sorted(self.folder.glob("*.safetensors.index.json"))
        self.index_name: str | None = indexes[0].name if indexes else None

    def metadata(self, file_name: str) -> dict[str, str]:
        """A shard's header metadata (SGLang keeps the source's keys)."""
        return dict(self._metadata[file_name])

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def get(self, name: str) -> torch.Tensor:
        info = self.index[name]
        buf = bytearray(info.nbytes)
        try:
            with os.fdopen(open_regular(info.file), "rb", buffering=0) as f:
                f.seek(info.offset)
                got = f.readinto(buf)
        except OSError as e:
            raise Fp8CookbookError(f"{info.file}: cannot read tensor {name} ({e})") from None
        if got != info.nbytes:
            raise Fp8CookbookError(f"{info.file}: tensor {name} truncated ({got} of {info.nbytes} bytes)")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def close(self) -> None:
        """Nothing stays open between reads; kept so callers can use `with`."""

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ writing shards
WRITEBACK_BYTES = 256 << 20
"""A shard writer starts the disk on what it wrote every this many bytes (0: only at close). Without it the kernel
holds the dirty pages until its background threshold (Linux's default: 10% of available memory, about 13 GB on the
GPU machine, more than most shards), so making a shard and writing it to disk ran one after the other and the closing
fsync waited for all of it; with it, the disk writes while the next tensors are made."""


class StreamingShardWriter:
    """Writes one safetensors file tensor by tensor: the header is known up front, so no shard is held in memory.

    Every `writeback_bytes` (default `WRITEBACK_BYTES`) a background thread fdatasyncs what is written so far, one at
    a time, so the disk works while the caller makes the next tensors; `close` waits for it and fsyncs the rest."""

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str],
                 *, writeback_bytes: int | None = None):
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        self._expected: list[tuple[str, torch.dtype, tuple[int, ...]]] = list(layout)
        for name, dtype, shape in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
        self.total_bytes = offset
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._next = 0
        self._writeback_bytes = WRITEBACK_BYTES if writeback_bytes is None else writeback_bytes
        self._unsynced = 0
        self._flusher: threading.Thread | None = None
        self._flush_error: OSError | None = None

    def _write_bytes(self, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._unsynced += data.nbytes
        if not self._writeback_bytes or self._unsynced < self._writeback_bytes:
            return
        if self._flusher is not None and self._flusher.is_alive():
            return  # one sync at a time; the next one takes what piled up meanwhile
        self._file.flush()
        self._unsynced = 0
        self._flusher = threading.Thread(target=self._sync, name="shard-writeback", daemon=True)
        self._flusher.start()

    def _sync(self) -> None:
        try:
            getattr(os, "fdatasync", os.fsync)(self._file.fileno())
        except OSError as e:  # raised by close(), in the writer's thread
            self._flush_error = e

    def _join_flusher(self) -> None:
        if self._flusher is not None:
            self._flusher.join()
            self._flusher = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, want_dtype, want_shape = self._expected[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (want_name, want_dtype, want_shape):
            raise RuntimeError(f"shard writer: expected {want_name} {want_dtype} {want_shape}, "
                               f"got {name} {tensor.dtype} {tuple(tensor.shape)}")
        self._write_bytes(tensor)
        self._next += 1

    def write_parts(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """Write one tensor from consecutive slices along its first dim, so a huge tensor is never whole in memory."""
        want_name, want_dtype, want_shape = self._expected[self._next]
        rows = 0
        for part in parts:
            if (name, part.dtype, tuple(part.shape[1:])) != (want_name, want_dtype, tuple(want_shape[1:])):
                raise RuntimeError(f"shard writer: expected slices of {want_name} {want_dtype} {want_shape}, "
                                   f"got {name} {part.dtype} {tuple(part.shape)}")
            rows += part.shape[0] if part.dim() else 1
            self._write_bytes(part)
        if rows != (want_shape[0] if want_shape else 1):
            raise RuntimeError(f"shard writer: {want_name} got {rows} rows of {want_shape}")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            raise RuntimeError(f"shard writer: {len(self._expected) - self._next} tensors were never written")
        self._file.flush()
        self._join_flusher()
        if self._flush_error is not None:
            self._file.close()
            raise self._flush_error
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> "StreamingShardWriter":
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._join_flusher()
            self._file.close()  # the caller removes the half-written folder


def shard_metadata(qconfig: dict[str, Any]) -> dict[str, str]:
    text = json.dumps(qconfig, sort_keys=True)
    return {"format": "pt", "quantization_config": text, "_quantization_metadata": text}


# ------------------------------------------------------------------------------------------------- inspect
@dataclass
class InspectReport:
    """A checkpoint summary; `problems` empty means SGLang and our loader can both load it."""

    folder: str
    class_name: str | None
    quant_algo: str | None
    dtypes: dict[str, int] = field(default_factory=dict)
    fp8_layers: int = 0
    bf16_linear_weights: int = 0  # 2-D weights not in FP8 (BF16, or float32 when the base was saved so)
    unquantized_weight_dtypes: dict[str, int] = field(default_factory=dict)  # their dtypes
    ignore_patterns: int = 0
    ignored_modules: int = 0
    weight_scale_range: tuple[float, float] | None = None
    input_scale_range: tuple[float, float] | None = None
    total_bytes: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        def rng(r: tuple[float, float] | None) -> str:
            return "-" if r is None else f"{r[0]:.3e} .. {r[1]:.3e}"

        out = [
            f"checkpoint       {self.folder}",
            f"class            {self.class_name}",
            f"quant_algo       {self.quant_algo}",
            f"shards           {self.shards} ({self.total_bytes / 1e9:.3f} GB)",
            "dtypes           " + ", ".join(f"{k}: {v}" for k, v in sorted(self.dtypes.items())),
            f"FP8 layers       {self.fp8_layers}",
            f"non-FP8 weights  {self.bf16_linear_weights}" + (" (" + ", ".join(
                f"{k}: {v}" for k, v in sorted(self.unquantized_weight_dtypes.items())) + ")"
                if self.unquantized_weight_dtypes else ""),
            f"ignore           {self.ignore_patterns} patterns covering {self.ignored_modules} modules with weights",
            f"weight_scale     {rng(self.weight_scale_range)}",
            f"input_scale      {rng(self.input_scale_range)}",
        ]
        out += [f"PROBLEM          {p}" for p in self.problems] or ["status           consistent"]
        return out


def _scale_problem(name: str, t: torch.Tensor) -> str | None:
    try:
        check_scale(name, t, "scale")
    except Fp8CookbookError as e:
        return f"{name}: {str(e).removeprefix('scale: ').removeprefix(name + ' ')}"
    return None


def inspect_checkpoint(folder: str | Path) -> InspectReport:
    """Summarize a checkpoint and list every inconsistency (all at once, each naming its tensor)."""
    folder = Path(folder)
    config = read_config(folder)
    info = read_quant_info(config, str(folder / "config.json"))
    report = InspectReport(str(folder), config.get("_class_name"), info.quant_algo if info else None)
    ignore = info.rules if info else IgnoreRules()
    report.ignore_patterns = len(ignore)
    from .families import sglang_aliases_for
    from .sglang_names import bf16_decider  # SGLang's rule: a module's runtime names count too

    keep_bf16 = bf16_decider(info, sglang_aliases_for(config.get("_class_name")))
    tensors = scan_tensors(folder)
    report.shards = len({t.file for t in tensors.values()})
    report.total_bytes = sum(t.nbytes for t in tensors.values())
    if info is not None and info.quant_algo != "FP8":
        report.problems.append(f"{folder / 'config.json'}: quant_algo is {info.quant_algo!r}, expected 'FP8'")
    ws: list[float] = []
    xs: list[float] = []
    with TensorReader(folder) as reader:
        for name, t in tensors.items():
            dtype = str(t.dtype).removeprefix("torch.")
            report.dtypes[dtype] = report.dtypes.get(dtype, 0) + 1
            if "_quantizer." in name:
                report.problems.append(f"{name}: ModelOpt quantizer leftover (SGLang cannot load it)")
            module = module_of(name)
            if name.endswith(".weight") and len(t.shape) == 2 and keep_bf16(module):
                report.ignored_modules += 1
            if name.endswith(".weight") and t.dtype == FP8_DTYPE:
                report.fp8_layers += 1
                if keep_bf16(module):
                    report.problems.append(f"{name}: FP8 weight in a module that `ignore` keeps BF16")
                for scale in (WEIGHT_SCALE, INPUT_SCALE):
                    key = f"{module}.{scale}"
                    if key not in tensors:
                        report.problems.append(f"{name}: FP8 weight without {key}")
                    elif tensors[key].file != t.file:
                        report.problems.append(f"{key}: stored in {tensors[key].file.name}, weight in {t.file.name}")
                if len(t.shape) != 2 or t.shape[0] % 16 or t.shape[1] % 16:
                    report.problems.append(f"{name}: FP8 weight of shape {list(t.shape)}; K and N must be multiples of 16")
            elif name.endswith(".weight") and len(t.shape) == 2 and t.dtype != FP8_DTYPE:
                report.bf16_linear_weights += 1
                dtype = str(t.dtype).replace("torch.", "")
                report.unquantized_weight_dtypes[dtype] = report.unquantized_weight_dtypes.get(dtype, 0) + 1
                if not keep_bf16(module) and info is not None:
                    report.problems.append(f"{name}: {t.dtype} weight not covered by `ignore` (SGLang would build an FP8 layer)")
            if name.endswith((f".{WEIGHT_SCALE}", f".{INPUT_SCALE}")):
                scale = reader.get(name)
                problem = _scale_problem(name, scale)
                if problem:
                    report.problems.append(problem)
                else:
                    (ws if name.endswith(WEIGHT_SCALE) else xs).append(float(scale.float().reshape(())))
                if f"{module}.weight" in tensors and tensors[f"{module}.weight"].dtype != FP8_DTYPE:
                    report.problems.append(f"{name}: scale beside a {tensors[f'{module}.weight'].dtype} weight")
    report.weight_scale_range = (min(ws), max(ws)) if ws else None
    report.input_scale_range = (min(xs), max(xs)) if xs else None
    scales = sum(1 for n in tensors if n.endswith((f".{WEIGHT_SCALE}", f".{INPUT_SCALE}")))
    if info is None and (report.fp8_layers or scales):  # every reader would take the FP8 codes for BF16 weights
        report.problems.insert(0, f"{folder / 'config.json'}: no quantization_config, but the folder holds "
                                  f"{report.fp8_layers} FP8 weight(s) and {scales} scale tensor(s)")
    return report


# ------------------------------------------------------------------------------ the attention side file
def scales_from_amax(amax: dict[str, dict[str, Any]]) -> dict[str, tuple[float, float, float]]:
    """{module: {"q","k","v": amax}} -> {module: (s_q, s_k, s_v)} with s = amax/448; modules never called are left out.

    A zero or non-finite amax would give a useless scale: it raises, naming the module.
    """
    out = {}
    for name, a in sorted(amax.items()):
        if not a:
            continue
        if set(a) != {"q", "k", "v"}:
            raise Fp8CookbookError(f"attention amax of {name}: have {sorted(a)}, need q, k and v")
        vals = []
        for what in ("q", "k", "v"):
            label = f"{name}.{what}_bmm_quantizer"
            x = a[what] if isinstance(a[what], torch.Tensor) else _number(a[what], label)
            try:
                vals.append(check_scale(label, x, "attention amax") / FP8_MAX)
            except Fp8CookbookError:
                shown = f"shape {list(x.shape)}" if isinstance(x, torch.Tensor) and x.numel() != 1 else float(x)
                raise Fp8CookbookError(f"attention amax {label} = {shown}: must be one positive and finite value") from None
        out[name] = tuple(vals)
    return out


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Fp8CookbookError(f"attention amax {name} is {value!r}, not a number")
    return float(value)


def read_attention_scales(folder: str | Path) -> dict[str, tuple[float, float, float]] | None:
    """The (q, k, v) scales per attention module from a checkpoint's side file; None when the folder has none."""
    path = Path(folder) / ATTENTION_SCALES_NAME
    if not os.path.lexists(path):  # a FIFO or other non-file is refused by read_json, not skipped
        return None
    try:
        data = read_json(path)
    except Fp8CookbookError as e:
        raise Fp8CookbookError(f"{path}: not an attention-scale file ({str(e).removeprefix(f'{path}: ')})") from None
    try:
        entries = data["amax"]
        if data.get("format") != "amax" or not isinstance(entries, dict):
            raise ValueError("expected {\"format\": \"amax\", \"amax\": {...}}")
    except (ValueError, KeyError, TypeError) as e:
        raise Fp8CookbookError(f"{path}: not an attention-scale file ({e})") from None
    amax: dict[str, dict[str, float]] = {}
    for key, val in entries.items():
        module, _, quantizer = key.rpartition(".")
        if quantizer not in ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer"):
            raise Fp8CookbookError(f"{path}: unexpected entry {key!r} (want <module>.[qkv]_bmm_quantizer)")
        amax.setdefault(module, {})[quantizer[0]] = val
    try:
        return scales_from_amax(amax)
    except Fp8CookbookError as e:
        raise Fp8CookbookError(f"{path}: {e}") from None


def write_attention_scales(folder: str | Path, amax: dict[str, float]) -> Path:
    """Write the side file of Q/K/V amaxes ({"<module>.[qkv]_bmm_quantizer": amax}); SGLang never reads it."""
    path = Path(folder) / ATTENTION_SCALES_NAME
    write_json_atomic(path, {"format": "amax", "amax": amax})
    return path

