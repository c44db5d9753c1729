"""Start-up (issue 14 items 10, 11): the registry and --help load no heavy library; `python -m fp8cookbook` is the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "modelopt")


def _python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


_PROBE = """
import sys, time
t0 = time.perf_counter()
import fp8cookbook.cli as cli
parser = cli.build_parser()
for argv in (['--help'], ['families', '--help'], ['inspect', '--help'], ['quantize', '--help']):
    try:
        parser.parse_args(argv)
    except SystemExit:
        pass
cli.main(['families'])
print('SECONDS', time.perf_counter() - t0)
print('HEAVY', ','.join(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:]))))
"""


def test_cli_help_and_families_import_no_heavy_module():
    out = _python(_PROBE, *HEAVY)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) if " " in line else (line, "") for line in out.stdout.splitlines()
                 if line.startswith(("SECONDS", "HEAVY")))
    assert lines["HEAVY"].strip() == "", f"--help/families imported {lines['HEAVY']}"
    # Generous: the bound is for a loaded 2-core CI box; torch alone takes several seconds there.
    assert float(lines["SECONDS"]) < 3.0, lines["SECONDS"]


def test_families_registry_importable_without_torch():
    out = _python("import sys, fp8cookbook.families as f; print(len(f.FAMILIES), 'torch' in sys.modules)")
    assert out.returncode == 0, out.stderr
    n, has_torch = out.stdout.split()
    assert int(n) >= 4 and has_torch == "False"


def test_help_wall_time_in_a_subprocess():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "fp8cookbook", "--help"], capture_output=True, text=True, env=env,
                         timeout=120, cwd=ROOT)
    seconds = time.perf_counter() - t0
    assert out.returncode == 0 and "quantize" in out.stdout, out.stderr
    assert seconds < 4.0, f"fp8cookbook --help took {seconds:.1f} s"


@pytest.mark.parametrize("argv,expect", [(["--version"], "fp8cookbook "), (["families"], "flux1")])
def test_python_m_fp8cookbook_is_the_cli(argv, expect):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "fp8cookbook", *argv], capture_output=True, text=True, env=env,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout


def test_python_m_fp8cookbook_reports_errors_like_the_cli():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "fp8cookbook", "inspect", "/nonexistent/ckpt"], capture_output=True,
                         text=True, env=env, timeout=120, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.startswith("fp8cookbook inspect: error:") and len(out.stderr.strip().splitlines()) == 1


def test_every_exported_name_resolves_in_a_fresh_process():
    """`fp8cookbook.__all__` names load lazily (one table in __init__), each from the module that owns it."""
    out = _python("import fp8cookbook as f; missing = [n for n in f.__all__ if getattr(f, n, None) is None]; "
                  "print('MISSING', missing, f.load_fp8_transformer.__module__, f.quantize_.__module__)")
    assert out.returncode == 0, out.stderr
    assert "MISSING [] fp8cookbook.loader fp8cookbook.fp8.quantize" in out.stdout, out.stdout
