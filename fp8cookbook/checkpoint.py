"""The on-disk FP8 checkpoint SGLang loads (spec: fp8-checkpoint-format.md): reading, writing and checking it.

Everything that knows a file name, a metadata key or a pattern rule lives here, so the converter, the loader
and `inspect` agree by construction.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import re
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .errors import Fp8CookbookError

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
@lru_cache(maxsize=4096)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


def ignored(module_name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """Spec section 4: only `*` is special and a pattern must match the whole module name."""
    return any(_pattern_regex(p).fullmatch(module_name) for p in patterns)


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


def read_quant_info(config: dict[str, Any], where: str) -> QuantInfo | None:
    """Read the flat form (`quantization_config`) or the nested one (`{"quantization": {...}}`); None if absent."""
    qc = config.get("quantization_config", config if "quantization" in config else None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise Fp8CookbookError(f"{where}: quantization_config must be an object, found {type(qc).__name__}")
    if "quantization" in qc and isinstance(qc["quantization"], dict):
        nested = qc["quantization"]
        return QuantInfo(nested.get("quant_algo"), list(nested.get("exclude_modules") or nested.get("ignore") or []))
    return QuantInfo(qc.get("quant_algo"), list(qc.get("ignore") or qc.get("exclude_modules") or []))


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a diffusers model folder, with errors that name the file."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise Fp8CookbookError(f"{path}: missing (expected a diffusers transformer folder with config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Fp8CookbookError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise Fp8CookbookError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


# ------------------------------------------------------------------------------------------ reading shards
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


def _read_header(path: Path) -> dict[str, Any]:
    return _read_header_and_size(path)[0]


def _read_header_and_size(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header ourselves so a corrupt file gives an error that names it (and costs no I/O)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        end = 8 + n
        data_len = 0
        for key, value in header.items():
            if key == "__metadata__":
                continue
            start, stop = value["data_offsets"]
            data_len = max(data_len, stop)
            if value["dtype"] not in ST_DTYPES:
                raise ValueError(f"tensor {key}: unsupported dtype {value['dtype']}")
        if end + data_len > size:
            raise ValueError(f"truncated: header promises {end + data_len} bytes, file has {size}")
        return header, end
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Fp8CookbookError(f"{path}: not a readable safetensors file ({e})") from None


def shard_files(folder: Path) -> list[Path]:
    """The shards of a model folder: those the index names, else every *.safetensors file."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise Fp8CookbookError(f"{indexes[0]}: invalid index ({e})") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise Fp8CookbookError(f"{indexes[0]}: names shard(s) that do not exist: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise Fp8CookbookError(f"{folder}: no *.safetensors files")
    return files


def scan_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Name -> dtype/shape/file for every tensor of a folder, read from headers only."""
    tensors: dict[str, TensorInfo] = {}
    for path in shard_files(folder):
        header, data_start = _read_header_and_size(path)
        for name, value in header.items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise Fp8CookbookError(f"{path}: tensor {name} also stored in {tensors[name].file}")
            info = TensorInfo(name, path, ST_DTYPES[value["dtype"]], tuple(value["shape"]), data_start + value["data_offsets"][0])
            if value["data_offsets"][1] - value["data_offsets"][0] != info.nbytes:
                raise Fp8CookbookError(f"{path}: tensor {name}: {value['data_offsets']} does not hold {info.shape} {info.dtype}")
            tensors[name] = info
    return tensors


class TensorReader:
    """Reads one tensor at a time from a folder's shards with plain reads (no mmap), so memory holds only that tensor.

    A memory map would keep every touched page of a multi-GB shard resident; a read does not.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index = scan_tensors(self.folder)
        indexes = sorted(self.folder.glob("*.safetensors.index.json"))
        self.index_name: str | None = indexes[0].name if indexes else None

    def metadata(self, file_name: str) -> dict[str, str]:
        """A shard's header metadata (SGLang keeps the source's keys)."""
        return dict(_read_header(self.folder / file_name).get("__metadata__") or {})

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def get(self, name: str) -> torch.Tensor:
        info = self.index[name]
        buf = bytearray(info.nbytes)
        try:
            with open(info.file, "rb", buffering=0) as f:
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
class StreamingShardWriter:
    """Writes one safetensors file tensor by tensor: the header is known up front, so no shard is held in memory."""

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
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

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, want_dtype, want_shape = self._expected[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (want_name, want_dtype, want_shape):
            raise RuntimeError(f"shard writer: expected {want_name} {want_dtype} {want_shape}, "
                               f"got {name} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            raise RuntimeError(f"shard writer: {len(self._expected) - self._next} tensors were never written")
        self._file.close()

    def __enter__(self) -> "StreamingShardWriter":
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()  # the caller removes the half-written folder


def shard_metadata(qconfig: dict[str, Any]) -> dict[str, str]:
    text = json.dumps(qconfig, sort_keys=True)
    return {"format": "pt", "quantization_config": text, "_quantization_metadata": text}


def write_json_atomic(path: str | Path, obj: Any, sort_keys: bool = False) -> Path:
    """Write JSON through a temporary file in the same folder and `os.replace`, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=sort_keys)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# ------------------------------------------------------------------------------------------------- inspect
@dataclass
class InspectReport:
    """A checkpoint summary; `problems` empty means SGLang and our loader can both load it."""

    folder: str
    class_name: str | None
    quant_algo: str | None
    dtypes: dict[str, int] = field(default_factory=dict)
    fp8_layers: int = 0
    bf16_linear_weights: int = 0
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
            f"BF16 2-D weights {self.bf16_linear_weights}",
            f"ignore           {self.ignore_patterns} patterns covering {self.ignored_modules} modules with weights",
            f"weight_scale     {rng(self.weight_scale_range)}",
            f"input_scale      {rng(self.input_scale_range)}",
        ]
        out += [f"PROBLEM          {p}" for p in self.problems] or ["status           consistent"]
        return out


def _scale_problem(name: str, t: torch.Tensor) -> str | None:
    if t.numel() != 1 or t.dim() > 1:
        return f"{name}: scale must be 0-d or [1], found shape {list(t.shape)}"
    v = float(t.float().reshape(()))
    if not math.isfinite(v) or v <= 0:
        return f"{name}: scale must be finite and positive, found {v}"
    return None


def inspect_checkpoint(folder: str | Path) -> InspectReport:
    """Summarize a checkpoint and list every inconsistency (all at once, each naming its tensor)."""
    folder = Path(folder)
    config = read_config(folder)
    info = read_quant_info(config, str(folder / "config.json"))
    report = InspectReport(str(folder), config.get("_class_name"), info.quant_algo if info else None)
    ignore = info.ignore if info else []
    report.ignore_patterns = len(ignore)
    from .sglang_names import bf16_decider  # SGLang's rule: a module's runtime names count too

    keep_bf16 = bf16_decider(info, config.get("_class_name"))
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
            x = float(torch.as_tensor(a[what]).float().reshape(()))
            if not (x > 0 and x < float("inf")):
                raise Fp8CookbookError(f"attention amax {name}.{what}_bmm_quantizer = {x}: must be positive and finite")
            vals.append(x / FP8_MAX)
        out[name] = tuple(vals)
    return out


def read_attention_scales(folder: str | Path) -> dict[str, tuple[float, float, float]] | None:
    """The (q, k, v) scales per attention module from a checkpoint's side file; None when the folder has none."""
    path = Path(folder) / ATTENTION_SCALES_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
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

