"""The cookbook notebooks' parameters: what each one allows, checked in one place before any work.

`validate_notebook_parameters` runs twice on the same rules: in `fp8cookbook run` before papermill starts a kernel
(the user wrote `-p steps -3`, so the message says `-p steps`), and in the notebook's first cell (a Jupyter user
edited `steps = -3`, so it says `parameter steps`). Either way a bad value stops the run in seconds, before a
calibration that can take an hour on a real model, with one line: the parameter, what was given, what is allowed.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from .errors import Fp8CookbookError

DEVICES = "'auto', 'cpu', 'cuda' or 'cuda:N'"
DTYPES = ("auto", "bfloat16", "bf16", "float32", "fp32", "float16", "fp16")
ATTENTION = ("auto", "on", "off", True, False)


class _Bad(ValueError):
    """A value outside what a parameter allows; the message is the 'allowed' half of the error."""


def _int(value: Any, *, minimum: int, optional: bool) -> int | None:
    allowed = f"an integer >= {minimum}" + (", or None" if optional else "")
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _Bad(allowed)
    return value


def _number(value: Any, *, lo: float | None = None, hi: float | None = None, optional: bool = True) -> float | None:
    if lo is not None and hi is not None:
        allowed = f"a number from {lo:g} to {hi:g}"
    elif lo is not None:
        allowed = f"a number >= {lo:g}"
    else:
        allowed = "a number"
    allowed += ", or None" if optional else ""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Bad(allowed)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _Bad(allowed)
    return float(value)


def _bool(value: Any, *, optional: bool = False) -> bool | None:
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise _Bad("True or False" + (", or None" if optional else ""))
    return value


def read_prompts_file(path: str | Path, limit: int | None = None) -> list[str]:
    """The prompts of a text file, one per line (blank lines and `#` comments skipped), the first `limit` of them.

    Here, with the parameters, because a prompts parameter may name such a file and is checked before any work;
    `quantize.calibration_prompts` reads the shipped file through it.
    """
    source = Path(path).expanduser()
    if limit is not None and limit < 1:
        raise Fp8CookbookError(f"the number of calibration prompts must be at least 1, got {limit}")
    hint = "expected a UTF-8 text file with one prompt per line"
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Fp8CookbookError(f"{source}: prompts file does not exist") from None
    except IsADirectoryError:
        raise Fp8CookbookError(f"{source}: is a folder; {hint}") from None
    except UnicodeDecodeError as e:
        raise Fp8CookbookError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start}); {hint}") from None
    except OSError as e:
        raise Fp8CookbookError(f"{source}: cannot read prompts file ({e.strerror or e})") from None
    if "\x00" in text:
        raise Fp8CookbookError(f"{source}: contains NUL bytes (a binary file?); {hint}")
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise Fp8CookbookError(f"{source}: no prompts in the file; {hint} ('#' lines are comments)")
    if limit is not None:
        if limit > len(prompts):
            raise Fp8CookbookError(f"{source}: {limit} calibration prompts asked for, the file has {len(prompts)}")
        prompts = prompts[:limit]
    return prompts


def as_prompts(value: Any, *, optional: bool = False, files: bool = False) -> list[str] | None:
    """A notebook's prompt parameter as a list: one string is one prompt (or, with `files`, the prompts file it
    names: one prompt per line, `#` comments), a list is a list of strings; None only where `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        if files and Path(value).expanduser().is_file():
            return read_prompts_file(value)
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise Fp8CookbookError(f"prompts must be a non-empty list of non-empty strings, got {value!r}")
    prompts = [p for p in value if isinstance(p, str)]
    if not prompts or len(prompts) != len(value) or not all(p.strip() for p in prompts):
        raise Fp8CookbookError(f"prompts must be a non-empty list of non-empty strings, got {value!r}")
    return prompts


def _prompts(value: Any, *, optional: bool = False) -> list[str] | None:
    try:
        return as_prompts(value, optional=optional, files=optional)
    except Fp8CookbookError:
        raise _Bad("a prompt or a non-empty list of non-empty strings"
                   + (", a file with one prompt per line, or None" if optional else "")) from None


def _regexes(value: Any) -> list[str]:
    allowed = "a list of regular expressions (module names, re.search), e.g. [\"^blocks\\\\.3\\\\.\"]"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise _Bad(allowed)
    for v in value:
        try:
            re.compile(v)
        except re.error as e:
            raise _Bad(f"{allowed}; {v!r} is not one: {e}") from None
    return list(value)


def _device(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise _Bad(DEVICES)
    problem = cuda_problem(value)
    if problem:
        raise _Bad(f"{DEVICES}; {problem}")
    return value


def cuda_problem(device: Any) -> str | None:
    """Why a CUDA `device` cannot run here, in words (None when it can, or when it is not CUDA).

    Asked before any slow work: otherwise a CPU-only torch answers a load with `AssertionError: Torch not compiled
    with CUDA enabled` after the pipeline was read. Imports torch only for a CUDA device.
    """
    text = str(device)
    if not text.startswith("cuda"):
        return None
    import torch

    if not torch.backends.cuda.is_built():
        return (f"this torch has no CUDA (torch {torch.__version__} is a CPU-only build); use cpu, or install a "
                "CUDA build of torch")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (f"torch {torch.__version__} has CUDA but sees no GPU here"
                + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "") + "; use cpu")
    try:
        index = torch.device(text).index
    except (RuntimeError, ValueError):
        return "not a torch device; use cpu, cuda or cuda:N"
    if index is not None and index >= torch.cuda.device_count():
        return f"there is no GPU {index} ({torch.cuda.device_count()} visible)"
    return None


def require_device(device: Any, name: str = "device") -> str:
    """`device` as text, or one Fp8CookbookError naming it as the caller spells it (`--device`, `device`)."""
    problem = cuda_problem(device)
    if problem:
        raise Fp8CookbookError(f"{name} {device}: {problem}")
    return str(device)


def _choice(value: Any, choices: tuple) -> Any:
    if value not in choices or (isinstance(value, bool) and not any(c is value for c in choices)):
        raise _Bad("one of " + ", ".join(repr(c) for c in choices))
    return value


def _path(value: Any, *, optional: bool, must_exist: bool = False, folder: bool = False) -> str | None:
    if value is None and optional:
        return None
    allowed = "a folder path" if folder else "a local folder or a hub id"
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise _Bad(allowed + (", or None" if optional else ""))
    text = os.fspath(value)
    local = Path(text).expanduser()
    looks_local = text.startswith(("/", ".", "~")) or text.count("/") > 1 or local.exists()
    if must_exist and looks_local and not local.is_dir():
        raise _Bad(f"{allowed}; {local} is not a folder")
    if folder and local.exists() and not local.is_dir():
        raise _Bad(f"{allowed}; {local} is a file")
    return text


def validate_notebook_parameters(values: dict[str, Any], *, families: tuple[str, ...] | None = None,
                                 spelled: Callable[[str], str] = lambda name: f"parameter {name}") -> dict[str, Any]:
    """Check every cookbook parameter in `values` and return them cleaned (prompts as lists, family by name).

    `families`: the families the notebook covers (the first is its default when `values` has no `family`); None
    skips the family-dependent checks (sizes). Names this module does not know are returned unchanged: papermill
    checks that they exist. Raises one Fp8CookbookError naming every bad parameter as `spelled(name)` writes it,
    with what was given and what is allowed.
    """
    family = None
    out = dict(values)
    problems: list[str] = []

    def bad(name: str, allowed: str) -> None:
        problems.append(f"{spelled(name)}: got {values[name]!r}; allowed: {allowed}")

    if families:
        from .families import get_family

        given = values.get("family", families[0])
        try:
            found = get_family(given) if isinstance(given, str) else None
        except Fp8CookbookError:
            found = None
        if found is not None and found.name in families:
            family = found
            if "family" in values:
                out["family"] = found.name
        elif "family" in values:
            bad("family", "one of " + ", ".join(repr(f) for f in families))
    multiple = family.size_multiple if family is not None else 16
    rules: dict[str, Callable[[Any], Any]] = {
        "model_path": lambda v: _path(v, optional=True, must_exist=True),
        "device": _device,
        "dtype": lambda v: _choice(v, DTYPES),
        "prompts": _prompts,
        "calibration_prompts": lambda v: _prompts(v, optional=True),
        "num_calibration_prompts": lambda v: _int(v, minimum=1, optional=True),
        "calibration_steps": lambda v: _int(v, minimum=1, optional=True),
        "height": lambda v: _size(v, multiple),
        "width": lambda v: _size(v, multiple),
        "num_frames": _frames,
        "steps": lambda v: _int(v, minimum=1, optional=True),
        "guidance_scale": lambda v: _number(v, lo=0),
        "seed": lambda v: _int(v, minimum=0, optional=False),
        "min_cosine": lambda v: _number(v, lo=-1, hi=1),
        "min_step_cosine": lambda v: _number(v, lo=-1, hi=1),
        "max_rel_l2": lambda v: _number(v, lo=0),
        "min_psnr": lambda v: _number(v, lo=0),
        "min_ssim": lambda v: _number(v, lo=-1, hi=1),
        "keep_bf16": _regexes,
        "text_encoder_cpu_offload": lambda v: _bool(v, optional=True),
        "output_dir": lambda v: _path(v, optional=False, folder=True),
        "run_bench": _bool,
        "compile": _bool,
        "fp8_attention": _attention,
    }
    for name, rule in rules.items():
        if name in values:
            try:
                out[name] = rule(values[name])
            except _Bad as e:
                bad(name, str(e))
    if problems:
        raise Fp8CookbookError("; ".join(problems))
    return out


def _attention(value: Any) -> Any:
    """The library's own parse (AttentionMode, which imports no torch), so the notebook and the CLI agree."""
    from .fp8.attention_mode import AttentionMode

    if not (value is None or isinstance(value, (bool, str))):
        raise _Bad("one of " + ", ".join(repr(c) for c in ATTENTION))
    try:
        AttentionMode.parse(value)
    except Fp8CookbookError:
        raise _Bad("one of " + ", ".join(repr(c) for c in ATTENTION)) from None
    return value


def _size(value: Any, multiple: int) -> int | None:
    allowed = f"a multiple of {multiple} (>= {multiple}), or None"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
        raise _Bad(allowed)
    return value


def _frames(value: Any) -> int | None:
    allowed = "4k+1 frames (1, 5, 9, ..., 81), or None"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (value - 1) % 4:
        raise _Bad(allowed)
    return value
