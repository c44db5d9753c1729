"""Every file the project writes or reads from a user, in one place (docs/reliability.md lists the promises).

Writing: a file or folder is built under a short temporary name beside its target and renamed in, so a reader sees
the old state or the new one, never a part; a new target is created exclusively (`renameat2(RENAME_NOREPLACE)`: of
racing writers exactly one wins) and `overwrite` swaps the complete old folder for the complete new one in one step
(`RENAME_EXCHANGE`). Temporary names carry their owner (host, pid, process start time), so the temporaries of a
killed run are removed by the next run in that folder, and only when their owner is gone. Everything gets the modes
a plain write gets under the user's umask (0644/0755 under umask 022), not mkstemp's 0600/0700.

Reading: user files are opened only when they are regular files (a FIFO would block forever), read within a size
bound, and parsed as JSON within a depth bound, with duplicate keys and NaN/Infinity refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import stat
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import Fp8CookbookError

OWNER_NAME = ".fp8cookbook-owner.json"  # inside a staging folder while it is built: who makes it, for what target
_TEMP = re.compile(r"\.fp8c-([0-9a-f]{8})-(\d+)-(\d+)-[0-9a-z]{8}\.tmp")  # host tag, pid, start time, random
MAX_JSON_BYTES = 64 * 2**20  # config.json and indexes are kilobytes; 64 MiB is far above any real one
MAX_JSON_DEPTH = 64  # real configs nest 3-5 deep
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# ------------------------------------------------------------------------------------------- JSON and scales
def to_jsonable(obj: Any) -> Any:
    """Plain JSON types for a report: dataclasses, paths, tensors, numpy values and enums become their JSON form;
    non-finite floats become null (JSON has no inf/NaN)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((to_jsonable(v) for v in obj), key=repr)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch tensors, numpy arrays and scalars
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):
        return to_jsonable(obj.item())
    return str(obj)  # torch.dtype, torch.device and the like


def check_scale(name: str, value: Any, where: str | Path) -> float:
    """The one scale rule: a single value (0-d or shape [1]), finite and positive. Returns it as a float.

    A per-channel scale ([16]) or a matrix ([4, 4]) is refused rather than cut to its first element, and an empty
    one ([0]) is named instead of raising IndexError.
    """
    if hasattr(value, "shape"):
        shape = list(value.shape)
        if len(shape) > 1 or math.prod(shape) != 1:
            raise Fp8CookbookError(f"{where}: {name} has shape {shape}; a per-tensor scale must be 0-d or [1]")
        value = float(value.float().reshape(())) if hasattr(value, "float") else float(value.reshape(()))
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise Fp8CookbookError(f"{where}: {name} is {value!r}, not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise Fp8CookbookError(f"{where}: {name} is {v}; scales and amaxes must be finite and positive")
    return v


def _refuse_constant(text: str) -> None:
    raise ValueError(f"{text} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth, walked without recursion so a deep document cannot overflow the stack."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def parse_json(data: bytes | str, where: str | Path, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, nested at most `max_depth` deep; errors name `where`."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except RecursionError:
        raise Fp8CookbookError(f"{where}: invalid JSON (nested deeper than {max_depth} levels)") from None
    except UnicodeDecodeError as e:
        raise Fp8CookbookError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # JSONDecodeError, duplicate keys, NaN, over-long integers
        raise Fp8CookbookError(f"{where}: invalid JSON ({e})") from None
    if _depth(obj, max_depth) > max_depth:
        raise Fp8CookbookError(f"{where}: invalid JSON (nested deeper than {max_depth} levels)")
    return obj


def open_regular(path: str | Path) -> int:
    """An fd open for reading, refused (with a named error) unless `path` is a regular file (after symlinks).

    O_NONBLOCK makes the open itself return at once on a FIFO, so the check after it cannot hang.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise Fp8CookbookError(f"{path}: missing") from None
    except OSError as e:
        raise Fp8CookbookError(f"{path}: cannot open ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Fp8CookbookError(f"{path}: not a regular file; refused")
    os.set_blocking(fd, True)
    return fd


def read_bounded(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """A regular file's bytes, refused when larger than `max_bytes`."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)  # the size is not trusted (a file may grow while read)
    if len(data) > max_bytes:
        raise Fp8CookbookError(f"{path}: larger than the {max_bytes} bytes this file may have")
    return data


def read_json(path: str | Path, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A user's JSON file read within bounds (`read_bounded`, `parse_json`)."""
    return parse_json(read_bounded(path, max_bytes), path, max_depth=max_depth)


# ----------------------------------------------------------------------------------- modes, owners, names
def _host_tag() -> str:
    """Host name and pid namespace: a pid means the same process only within both (containers share folders)."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return hashlib.sha1(f"{socket.gethostname()}/{ns}".encode()).hexdigest()[:8]


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (with the pid it identifies a process; pids are reused)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(text.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def temp_name() -> str:
    """A short temporary name (about 40 characters, whatever the target's length) that records its owner."""
    return f".fp8c-{_host_tag()}-{os.getpid()}-{_start_time(os.getpid()) or 0}-{secrets.token_hex(4)}.tmp"


def _owner_gone(name: str) -> bool:
    """True only when the temporary's owner is certainly dead: same host, and no process with its pid and start."""
    m = _TEMP.fullmatch(name)
    if not m or m.group(1) != _host_tag() or not Path("/proc/self/stat").exists():
        return False
    pid, start = int(m.group(2)), int(m.group(3))
    if pid == os.getpid():
        return False
    now = _start_time(pid)
    return now is None or (start != 0 and now != start)


def clean_stale(parent: str | Path) -> list[Path]:
    """Remove the temporaries that killed runs left in `parent`: only our names (which record host, pid and process
    start time), only when that owner is gone, never through a symlink. Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not _owner_gone(entry.name):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
                removed.append(path)
            elif entry.is_file(follow_symlinks=False):
                path.unlink()
                removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------------ errors
def disk_error(e: OSError, target: str | Path, need_bytes: int | None = None) -> Fp8CookbookError:
    """One line for an OSError met while writing `target`; disk full says how much space the write needed."""
    where = Path(target)
    if e.errno in _DISK_FULL:
        free = _free_bytes(where.parent)
        need = f"; it needs {_gb(need_bytes)}" if need_bytes else ""
        have = f", {_gb(free)} free" if free is not None else ""
        return Fp8CookbookError(f"{where}: disk full while writing ({e.strerror}{need}{have})")
    name = f" ({e.filename})" if e.filename and str(e.filename) != str(where) else ""
    return Fp8CookbookError(f"{where}: cannot write{name}: {e.strerror or e}")


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n} bytes"


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_free_space(folder: str | Path, need_bytes: int, target: str | Path) -> None:
    """Refuse before slow work when `folder`'s file system has less than `need_bytes` free."""
    free = _free_bytes(Path(folder))
    if free is not None and free < need_bytes:
        raise Fp8CookbookError(f"{target}: not enough disk space: it needs {_gb(need_bytes)}, {_gb(free)} free "
                               f"on {folder}")


# ------------------------------------------------------------------------------------------ atomic renames
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False where the kernel, libc or file system lacks it (then the caller falls back)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` only if `dst` does not exist, atomically (FileExistsError otherwise)."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    # Fallback: a hard link is an exclusive create for files; for folders, an exclusive lock file beside dst.
    if not src.is_dir():
        os.link(src, dst)
        os.unlink(src)
        return
    lock = dst.with_name(dst.name[:200] + ".fp8c-lock")
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", str(dst))
        os.rename(src, dst)
    finally:
        os.close(fd)
        os.unlink(lock)


def rename_exchange(src: Path, dst: Path) -> None:
    """Swap `src` and `dst` in one step, so `dst` is always the old complete folder or the new one."""
    if _renameat2(src, dst, _RENAME_EXCHANGE):
        return
    aside = dst.with_name(temp_name())  # fallback: two renames, with a short window where dst is absent
    os.rename(dst, aside)
    try:
        os.rename(src, dst)
    except OSError:
        os.rename(aside, dst)
        raise
    os.rename(aside, src)


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse targets that `publish` must not replace, before any work: symlinks, files, a parent that is a file."""
    if os.path.islink(target):
        raise Fp8CookbookError(f"{target}: is a symbolic link; refusing to write through or replace it")
    if target.exists():
        if not overwrite:
            raise Fp8CookbookError(f"{target}: already exists (pass --overwrite to replace it)")
        if not target.is_dir():
            raise Fp8CookbookError(f"{target}: exists and is not a folder; refusing to replace it")
    for parent in target.parents:
        if parent.exists() or os.path.islink(parent):
            if not parent.is_dir():
                raise Fp8CookbookError(f"{target}: {parent} is not a folder")
            break


def check_target(target: str | Path, overwrite: bool = False) -> None:
    """Public form of the target check, for callers that want it before slow work."""
    _check_target(Path(target), overwrite)


def current_umask() -> int:
    """The process's umask, read from /proc (setting it to read it back would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # no /proc (old kernels, other systems): the only other way
    os.umask(old)
    return old


def plain_modes(folder: str | Path) -> None:
    """Give what a third-party writer put under `folder` (freshly written by us) a plain write's modes.

    safetensors >= 0.8 (through diffusers' save_pretrained and ModelOpt's export) creates its files 0600, so a
    shared cache or an SGLang container running as another user could not read them. Folders get 0777 & ~umask,
    files 0666 & ~umask (their execute bits kept). Symbolic links and files with other hard links (an input
    linked in) are left alone: changing those would change the input.
    """
    mask = current_umask()
    root = Path(folder)
    for p in [root, *root.rglob("*")]:
        st = os.lstat(p)
        if stat.S_ISDIR(st.st_mode):
            os.chmod(p, 0o777 & ~mask)
        elif stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            os.chmod(p, (0o666 | (st.st_mode & 0o111)) & ~mask)


def temp_dir(parent: str | Path) -> Path:
    """An empty folder under a temporary name in `parent`: what `staged_dir` stages in.

    Made with the modes a plain mkdir gets (the umask decides), unlike `tempfile.mkdtemp`'s 0700, which would be
    the final folder's mode once renamed in; its name records its owner, so `clean_stale` removes it after a kill.
    """
    tmp = Path(parent) / temp_name()
    os.mkdir(tmp, 0o777)
    return tmp


@contextlib.contextmanager
def staged_dir(target: str | Path, *, overwrite: bool = False, need_bytes: int = 0,
               wrap_os_errors: bool = True) -> Iterator[Path]:
    """A staging folder beside `target`; on success it is published (`publish`), on any failure removed.

    The caller writes into the yielded folder. `need_bytes` > 0 checks the free space first. Earlier runs' stale
    temporaries in the same parent are removed first (`clean_stale`). An OSError becomes one `disk_error` line
    naming `target`; with `wrap_os_errors=False` one raised by the caller's own writes propagates unchanged.
    """
    target = Path(target)
    _check_target(target, overwrite)
    parent = target.parent
    created = [p for p in target.absolute().parents if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_stale(parent)
        if need_bytes:
            check_free_space(parent, need_bytes, target)
        tmp = temp_dir(parent)  # the umask decides, as for any folder the user makes
    except Fp8CookbookError:
        _remove_created(created)
        raise
    except OSError as e:
        _remove_created(created)
        raise disk_error(e, target, need_bytes or None) from None
    try:
        owner = {"producer": "fp8cookbook", "pid": os.getpid(), "host": socket.gethostname(), "target": target.name}
        (tmp / OWNER_NAME).write_text(json.dumps(owner) + "\n")
        yield tmp
        (tmp / OWNER_NAME).unlink()
        _fsync_tree(tmp)
        publish(tmp, target, overwrite=overwrite)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        if not wrap_os_errors:
            raise
        raise disk_error(e, target, need_bytes or None) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def _remove_created(created: list[Path]) -> None:
    for p in created:  # deepest first
        with contextlib.suppress(OSError):
            p.rmdir()


def _fsync_tree(folder: Path) -> None:
    """Flush a staged folder's files to disk before it is renamed in (a power cut then shows old or new)."""
    for p in [*folder.rglob("*"), folder]:
        if p.is_symlink():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EBADF):
                raise
        finally:
            os.close(fd)


def publish(tmp: Path, target: Path, *, overwrite: bool = False) -> None:
    """Rename a finished `tmp` folder to `target`: exclusively when new, by an atomic swap over an old one.

    Without `overwrite`, of several writers racing for one new target exactly one wins; the others get "already
    exists". With it, the old target is swapped out in one step and removed afterwards (a kill in between leaves
    it under a temporary name that the next run removes).
    """
    try:
        rename_noreplace(tmp, target)
        return
    except FileExistsError:
        if not overwrite:
            raise Fp8CookbookError(f"{target}: already exists (another run created it; pass --overwrite to replace "
                                   "it)") from None
    if os.path.islink(target) or not target.is_dir():
        raise Fp8CookbookError(f"{target}: exists and is not a folder; refusing to replace it")
    rename_exchange(tmp, target)  # tmp (our name, so a later run may remove it) now holds the old target
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", *, encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """A file object writing to a temporary beside `path`; flushed and renamed over `path` only on success."""
    if mode not in ("w", "wb"):
        raise ValueError("atomic_file writes: mode 'w' or 'wb'")
    path = Path(path)
    if os.path.islink(path):
        raise Fp8CookbookError(f"{path}: is a symbolic link; refusing to write through it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path.parent)
        tmp = path.parent / temp_name()
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        raise disk_error(e, path) from None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise disk_error(e, path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj: Any, *, sort_keys: bool = False, indent: int | None = 2) -> Path:
    """`obj` as JSON (cleaned by `to_jsonable`) through `atomic_file`, so readers never see half a file."""
    text = json.dumps(to_jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)
    with atomic_file(path) as f:
        f.write(text + "\n")
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_file(path) as f:
        f.write(text)
    return Path(path)
