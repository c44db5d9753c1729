"""Quiet means quiet, normal output has no third-party noise, and logs get plain progress lines (issue 14 item 4).

The noise is printed when diffusers, transformers, torchao and ModelOpt are first imported, so the commands run in
a fresh process each, with pipes (not a terminal) as stdout and stderr, as in CI.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from fp8cookbook.cli import main

pytestmark = pytest.mark.usefixtures("one_thread", "tiny_cache_env")

NOISE = ("should be kept in float32", "Loading pipeline components", "Loading weights", "torchvision",
         "Failed to load", "Unable to import", "_pytree", "it/s]", "\r")


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fp8cookbook", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def test_compare_quiet_prints_nothing_but_errors(handmade, tmp_path):
    proc = _cli("compare", "--family", "flux1", "--candidate", str(handmade["base"]), "--output-dir",
                str(tmp_path / "c"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"--quiet printed on stderr:\n{proc.stderr}"
    assert (tmp_path / "c" / "compare.json").is_file()


def test_compare_quiet_still_prints_its_error(tmp_path):
    proc = _cli("compare", "--family", "flux1", "--candidate", str(tmp_path / "missing"), "--output-dir",
                str(tmp_path / "c"), "--quiet")
    assert proc.returncode == 2 and proc.stderr.startswith("fp8cookbook compare: error: "), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_bench_normal_output_has_no_third_party_noise():
    proc = _cli("bench", "--family", "wan22", "--synthetic", "tiny", "--device", "cpu", "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    assert "FP8 (fp8) vs BF16 (bf16)" in proc.stdout
    noisy = [line for line in (proc.stdout + proc.stderr).splitlines(keepends=True) if any(n in line for n in NOISE)]
    assert not noisy and proc.stderr == "", noisy or proc.stderr


def test_long_work_in_a_log_gets_plain_progress_lines(tmp_path, tiny_cache_env, capsys, monkeypatch):
    """Not a terminal (capsys): the denoising loops print `reference step i/N` lines, no bars (a line at most every
    LINE_SECONDS: 0 here, so the tiny model's steps count as long work)."""
    from fp8cookbook import console
    from fp8cookbook.pipelines import tiny_pipeline_dir

    monkeypatch.setattr(console, "LINE_SECONDS", 0.0)
    folder = tiny_pipeline_dir("flux1")  # given as --model-path: a real pipeline's settings, long work
    rc = main(["compare", "--family", "flux1", "--model-path", str(folder), "--candidate",
               str(folder / "transformer"), "--output-dir", str(tmp_path / "c"), "--steps", "3", "--height", "64",
               "--width", "64"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "reference step 3/3" in err and "candidate step 3/3" in err, err
    assert "\r" not in err and "it/s" not in err, err


def test_progress_lines_are_throttled(capsys, monkeypatch):
    """A line at most every LINE_SECONDS and the last one once any was printed; quick work prints none."""
    from fp8cookbook import console

    def run(total: int, times: list[float]) -> list[str]:
        clock = iter(times)
        monkeypatch.setattr(console.time, "perf_counter", lambda: next(clock))
        lines = console.ProgressLines("calibrate prompt", total)  # the first time is its start
        for done in range(1, total + 1):
            lines(done)
        return capsys.readouterr().err.splitlines()

    assert run(4, [0.0, 1.0, 2.0, 6.0, 7.0]) == ["calibrate prompt 3/4 (6.0 s)", "calibrate prompt 4/4 (7.0 s)"]
    assert run(3, [0.0, 0.1, 0.2, 0.3]) == []


def test_levels_are_restored_after_a_command(handmade, tmp_path, capsys):
    """The silencing lasts one command: main() leaves no process-wide state behind (tests, notebooks)."""
    import diffusers
    import transformers

    before = (logging.getLogger("torchao").level, diffusers.utils.logging.get_verbosity(),
              transformers.utils.logging.get_verbosity(), diffusers.utils.logging.is_progress_bar_enabled())
    env = {k: os.environ.get(k) for k in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")}
    assert main(["compare", "--family", "flux1", "--candidate", str(handmade["base"]), "--output-dir",
                 str(tmp_path / "c"), "--quiet"]) == 0
    after = (logging.getLogger("torchao").level, diffusers.utils.logging.get_verbosity(),
             transformers.utils.logging.get_verbosity(), diffusers.utils.logging.is_progress_bar_enabled())
    assert after == before
    assert {k: os.environ.get(k) for k in env} == env
