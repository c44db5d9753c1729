"""Measured stages: wall time, peak GPU memory, peak host RSS and bytes written, one line and one record per stage.

Why: a user's job at full size is a chain of long stages (calibrate, export, convert, load, compare, bench), and
what decides whether it fits a machine is each stage's peak memory and disk, not the total. `stage(...)` measures a
block; an out-of-memory inside it becomes one `Fp8CookbookError` line naming the stage and what to change (the
`hint`, e.g. a flag), never a raw CUDA traceback.

Host peak: Linux's VmHWM, reset at the start of each stage through /proc/self/clear_refs ("5"); where that file
cannot be written (some containers), a thread samples VmRSS every 20 ms instead (it can miss peaks shorter than
that; the record says which method measured). Stages may nest within one `StageLog`: an inner stage's peaks are
folded into its outer stages before they are reset.
"""

from __future__ import annotations

import contextlib
import stat
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .errors import Fp8CookbookError

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass
class StageRecord:
    """One stage's measurements (JSON-able with `as_dict`)."""

    name: str
    seconds: float = 0.0
    peak_gpu_mb: float | None = None  # torch.cuda.max_memory_allocated over all devices; None without CUDA
    peak_gpu_reserved_mb: float | None = None  # what the caching allocator held (what nvidia-smi shows, roughly)
    peak_rss_mb: float | None = None  # host peak resident memory of this process during the stage
    rss_method: str = "VmHWM"  # "VmHWM" (exact) or "sampled" (every 20 ms)
    output: list[str] = field(default_factory=list)
    bytes_written: int | None = None  # growth of the files under `output` during the stage
    output_bytes: int | None = None  # size of everything under `output` at the end
    status: str = "ok"  # "ok", "oom" or "error"
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # whatever the caller adds (e.g. settings)
    outer: str | None = None  # the stage this one ran inside (quantize's calibrate: "quantize"); None at the top

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        parts = [f"stage {self.name:20s} {self.seconds:8.1f} s"]
        if self.peak_gpu_mb is not None:
            parts.append(f"GPU peak {self.peak_gpu_mb / 1024:6.1f} GiB")
        if self.peak_rss_mb is not None:
            parts.append(f"RSS peak {self.peak_rss_mb / 1024:6.1f} GiB" + (" (sampled)" if self.rss_method != "VmHWM" else ""))
        if self.bytes_written is not None:
            n = self.bytes_written
            parts.append(f"wrote {n / 1e9:.2f} GB" if abs(n) >= 10**8 else f"wrote {n / 1e6:.2f} MB")
        if self.status != "ok":
            parts.append(f"{self.status.upper()}: {self.error}")
        return "  ".join(parts)


def tree_bytes(paths: Sequence[Path]) -> int:
    """Bytes of the files under each path (a file counts itself), each file once however many hard links reach it
    (a full repo hard-links its FP8 transformer to fp8/: that is no second copy on disk); symbolic links and
    missing paths count 0."""
    total, seen = 0, set()
    for p in paths:
        files = [p] if p.is_file() else (p.rglob("*") if p.is_dir() else [])
        for f in files:
            with contextlib.suppress(OSError):
                st = f.lstat()
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
    return total


def _status_mb(key: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class _Sampler:
    """VmRSS every `interval` seconds on a daemon thread: the fallback where VmHWM cannot be reset."""

    def __init__(self, interval: float = 0.02):
        self.peak = _status_mb("VmRSS") or 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, _status_mb("VmRSS") or 0.0)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_mb("VmRSS") or 0.0)


def _cuda():
    """torch.cuda when it is imported and initialised (a stage never initialises CUDA itself)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


def _gpu_peaks(cuda) -> tuple[float, float]:
    n = cuda.device_count()
    allocated = max(cuda.max_memory_allocated(i) for i in range(n)) / 2**20
    reserved = max(cuda.max_memory_reserved(i) for i in range(n)) / 2**20
    return allocated, reserved


def _reset_gpu(cuda) -> None:
    for i in range(cuda.device_count()):
        cuda.reset_peak_memory_stats(i)


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError, a CUDA 'out of memory' RuntimeError, or a host MemoryError."""
    import sys

    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(error, oom_type):
        return True
    if isinstance(error, MemoryError) or _host_oom(error):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _host_oom(error: BaseException) -> bool:
    """MemoryError, or torch's CPU allocator refusing ("DefaultCPUAllocator: can't allocate memory")."""
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


class StageLog:
    """The records of a run's stages, printed as they finish and written as JSON with `write_json`."""

    def __init__(self, printer: Callable[[str], None] | None = print):
        self.records: list[StageRecord] = []
        self.printer = printer
        self._active: list[StageRecord] = []

    def _fold(self, rss: float | None, gpu: tuple[float, float] | None) -> None:
        """Carry peaks measured so far into the outer stages before an inner stage resets the counters."""
        for outer in self._active:
            if rss is not None:
                outer.peak_rss_mb = max(outer.peak_rss_mb or 0.0, rss)
            if gpu is not None:
                outer.peak_gpu_mb = max(outer.peak_gpu_mb or 0.0, gpu[0])
                outer.peak_gpu_reserved_mb = max(outer.peak_gpu_reserved_mb or 0.0, gpu[1])

    @contextlib.contextmanager
    def stage(self, name: str, *, hint: str | None = None, output: str | Path | Sequence[str | Path] | None = None,
              **extra: Any) -> Iterator[StageRecord]:
        """Measure the block as stage `name`; `output` = the path(s) it writes under; `hint` = what to change when
        it runs out of memory (e.g. "pass --offload-idle"). Yields the record, so the block may add to `extra`."""
        outputs = [Path(output)] if isinstance(output, (str, Path)) else [Path(p) for p in (output or [])]
        record = StageRecord(name, output=[str(p) for p in outputs], extra=dict(extra),
                             outer=self._active[-1].name if self._active else None)
        cuda = _cuda()
        self._fold(_status_mb("VmHWM"), _gpu_peaks(cuda) if cuda else None)
        before = tree_bytes(outputs) if outputs else None
        sampler = None
        if not _reset_hwm():
            record.rss_method = "sampled"
            sampler = _Sampler()
        if cuda:
            _reset_gpu(cuda)
        self._active.append(record)
        t0 = time.perf_counter()
        failure: BaseException | None = None
        try:
            yield record
        except BaseException as e:  # noqa: BLE001 - recorded, then re-raised (OOM as one line)
            failure = e
        finally:
            record.seconds = time.perf_counter() - t0
            self._active.remove(record)
            rss = sampler.stop() if sampler else _status_mb("VmHWM")
            record.peak_rss_mb = max(record.peak_rss_mb or 0.0, rss or 0.0) if rss is not None else record.peak_rss_mb
            cuda = _cuda() or cuda  # the stage may have initialised CUDA
            if cuda:
                allocated, reserved = _gpu_peaks(cuda)
                record.peak_gpu_mb = max(record.peak_gpu_mb or 0.0, allocated)
                record.peak_gpu_reserved_mb = max(record.peak_gpu_reserved_mb or 0.0, reserved)
            if outputs:
                record.output_bytes = tree_bytes(outputs)
                record.bytes_written = record.output_bytes - (before or 0)
            self._fold(record.peak_rss_mb, (record.peak_gpu_mb, record.peak_gpu_reserved_mb) if cuda else None)
        if failure is None:
            self._finish(record)
            return
        oom = is_out_of_memory(failure)
        record.status = "oom" if oom else "error"
        record.error = _first_line(failure)
        self.records.append(record)  # not printed: the error itself reaches the user as one line
        if not oom:
            raise failure
        where = "host" if _host_oom(failure) else "GPU"
        if cuda and where == "GPU":
            with contextlib.suppress(Exception):
                cuda.empty_cache()
        message = f"stage {name}: out of {where} memory ({record.error})"
        if hint:
            message += f"; {hint}"
        raise Fp8CookbookError(message) from None

    def _finish(self, record: StageRecord) -> None:
        self.records.append(record)
        if self.printer is not None:
            self.printer(record.line())

    def as_dicts(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.records]

    def lines(self) -> list[str]:
        return [r.line() for r in self.records]

    def write_json(self, path: str | Path, **extra: Any) -> Path:
        """{"stages": [...], **extra} written atomically."""
        from .checkpoint import write_json_atomic

        return write_json_atomic(path, {**extra, "stages": self.as_dicts()})


@contextlib.contextmanager
def stage(name: str, *, hint: str | None = None, output: str | Path | Sequence[str | Path] | None = None,
          log: StageLog | None = None, **extra: Any) -> Iterator[StageRecord]:
    """`StageLog.stage` on `log` (or on a log of its own, which prints the line): see there."""
    with (log or StageLog()).stage(name, hint=hint, output=output, **extra) as record:
        yield record
