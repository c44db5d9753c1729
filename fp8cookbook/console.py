"""What a command shows besides its own lines: third-party noise off, progress bars only where they help.

diffusers, transformers, torch, torchao and ModelOpt log advice the user of a command cannot act on ("modules ...
should be kept in float32" after a cast the code chose, torchvision fallbacks, torchao's optional CUDA kernels, an
Enum registration deprecation). `command_output` shows only their errors for the length of one command and puts
every level back afterwards: `cli.main` runs in-process in tests and notebooks, so nothing is set at import or left
behind. Loading bars (diffusers' "Loading pipeline components", transformers' "Loading weights") are for long work
on a terminal; where output goes to a file or a CI log, tqdm's carriage returns show nothing useful, so the
commands' own long loops print plain lines instead (`progress_style`, `ProgressLines`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from typing import Iterator, Literal

# Python loggers that print at import or on casts: set to ERROR for a command. diffusers' and transformers' own
# root loggers are configured on their first import from the *_VERBOSITY variables, so those are set too.
_LOGGERS = ("diffusers", "transformers", "torchao", "torch.utils._pytree", "modelopt", "huggingface_hub")
_VERBOSITY = ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")


def interactive() -> bool:
    """Both streams are terminals: a bar redraws in place there; in a file or CI log it is one unreadable line."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def progress_style(progress: bool) -> Literal["bar", "lines", "off"]:
    """How a long loop shows progress: a bar on a terminal, plain lines elsewhere, nothing when not asked."""
    if not progress:
        return "off"
    return "bar" if interactive() else "lines"


LINE_SECONDS = 5.0  # at most one progress line this often: work that ends sooner prints none


class ProgressLines:
    """Plain `DESC i/N (s)` lines on stderr for logs: one every LINE_SECONDS at most, and the last one once any was
    printed; so short work (a tiny model) prints nothing and an hour's calibration a line every few seconds."""

    def __init__(self, desc: str, total: int):
        self.desc, self.total = desc, max(int(total), 1)
        self.t0 = self.last = time.perf_counter()
        self.printed = False

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < LINE_SECONDS and not (done >= self.total and self.printed):
            return
        print(f"{self.desc} {done}/{self.total} ({now - self.t0:.1f} s)", file=sys.stderr, flush=True)
        self.last, self.printed = now, True


@contextlib.contextmanager
def command_output(*, quiet: bool = False, bars: bool = True) -> Iterator[None]:
    """Third-party logs at ERROR for the block (with `quiet`, Python warnings too: only errors reach the user);
    diffusers' and transformers' loading bars only when `bars`, not `quiet`, and on a terminal. Everything is
    restored on exit."""
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    env = {name: os.environ.get(name) for name in _VERBOSITY}
    libs = [m for m in ("diffusers", "transformers") if m in sys.modules]  # configured: set through their API
    show_bars = bars and not quiet and interactive()
    with contextlib.ExitStack() as stack:
        stack.callback(_restore, levels, env, libs)
        os.environ.update({name: "error" for name in _VERBOSITY})
        for name in _LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        for lib in libs:
            stack.enter_context(_library_verbosity(lib))
        if not show_bars:
            stack.enter_context(_no_loading_bars())
        if quiet:
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
        yield


def _restore(levels: dict[str, int], env: dict[str, str | None], configured: list[str]) -> None:
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    for lib in ("diffusers", "transformers"):  # imported during the block: back to their own default level
        if lib not in configured and lib in sys.modules and hasattr(sys.modules[lib], "utils"):
            lib_logging = sys.modules[lib].utils.logging
            lib_logging.set_verbosity(lib_logging._get_default_logging_level())


@contextlib.contextmanager
def _library_verbosity(lib: str) -> Iterator[None]:
    lib_logging = sys.modules[lib].utils.logging
    level = lib_logging.get_verbosity()
    lib_logging.set_verbosity_error()
    try:
        yield
    finally:
        lib_logging.set_verbosity(level)


@contextlib.contextmanager
def _no_loading_bars() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in states:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was_enabled in states:
            if was_enabled:
                lib.enable_progress_bar()
