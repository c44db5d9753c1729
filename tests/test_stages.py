"""Stage records: wall time, host peak, bytes written, JSON; out-of-memory as one line naming the stage and a fix."""

from __future__ import annotations

import json
import time

import pytest
import torch

from fp8cookbook import stages
from fp8cookbook.errors import Fp8CookbookError
from fp8cookbook.stages import StageLog, stage


def _hold(mb: int, seconds: float = 0.15) -> None:
    block = bytearray(mb * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page so it is resident
    time.sleep(seconds)
    del block


def test_record_fields_and_json(tmp_path):
    lines: list[str] = []
    log = StageLog(printer=lines.append)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.bin").write_bytes(b"o" * 100)  # there before: not counted as written
    with log.stage("convert", output=out, flavour="fp8") as record:
        (out / "sub").mkdir()
        (out / "sub" / "a.bin").write_bytes(b"a" * 3000)
        (out / "b.bin").write_bytes(b"b" * 1000)
        time.sleep(0.05)
        record.extra["layers"] = 7
    r = log.records[0]
    assert r is record and r.name == "convert" and r.status == "ok" and r.error is None
    assert r.seconds >= 0.05
    assert r.bytes_written == 4000 and r.output_bytes == 4100 and r.output == [str(out)]
    assert r.peak_rss_mb > 0 and r.rss_method in ("VmHWM", "sampled")
    assert r.peak_gpu_mb is None or not torch.cuda.is_available() or r.peak_gpu_mb >= 0
    assert r.extra == {"flavour": "fp8", "layers": 7}
    assert lines == [r.line()] and lines[0].startswith("stage convert") and "wrote 0.00 MB" in lines[0]
    path = log.write_json(tmp_path / "stages.json", family="flux1")
    data = json.loads(path.read_text())
    assert data["family"] == "flux1" and data["stages"] == [r.as_dict()]
    assert set(data["stages"][0]) >= {"name", "seconds", "peak_gpu_mb", "peak_rss_mb", "bytes_written", "status"}


@pytest.mark.parametrize("sampled", [False, True])
def test_host_peak_is_the_stage_own(monkeypatch, tmp_path, sampled):
    if sampled:  # where /proc/self/clear_refs cannot be written, a sampler measures
        monkeypatch.setattr(stages, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    log = StageLog(printer=None)
    with log.stage("big"):
        _hold(300)
    with log.stage("small"):
        pass
    big, small = log.records
    assert big.rss_method == small.rss_method == ("sampled" if sampled else "VmHWM")
    assert big.peak_rss_mb - small.peak_rss_mb > 200  # the second stage's peak was reset, not carried over


def test_nested_stage_peaks_fold_into_the_outer():
    log = StageLog(printer=None)
    with log.stage("outer"):
        with log.stage("inner"):
            _hold(300)
        with log.stage("after"):
            pass
    inner, after, outer = log.records
    assert [r.name for r in log.records] == ["inner", "after", "outer"]
    assert outer.peak_rss_mb >= inner.peak_rss_mb > after.peak_rss_mb + 200
    assert (inner.outer, after.outer, outer.outer) == ("outer", "outer", None)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB"
                           "\nof which 1.2 GiB is free. Including non-PyTorch memory ..."),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
])
def test_out_of_memory_is_one_line_naming_stage_and_fix(error):
    log = StageLog(printer=None)
    with pytest.raises(Fp8CookbookError) as e:
        with log.stage("compare", hint="pass --offload-idle (BF16 and FP8 copies never share the GPU)"):
            raise error
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("stage compare: out of GPU memory (")
    assert message.endswith("; pass --offload-idle (BF16 and FP8 copies never share the GPU)")
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no raw traceback chained
    record = log.records[0]
    assert record.status == "oom" and "out of memory" in record.error.lower()


def test_host_out_of_memory_says_host():
    with pytest.raises(Fp8CookbookError, match=r"^stage load: out of host memory \(.*\); use --device cuda$"):
        with stage("load", hint="use --device cuda", log=StageLog(printer=None)):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 64424509440 bytes")


def test_other_errors_pass_through_recorded():
    log = StageLog(printer=None)
    with pytest.raises(ValueError, match="bad shape"):
        with log.stage("quantize"):
            raise ValueError("bad shape")
    assert log.records[0].status == "error" and log.records[0].error == "bad shape"
    with pytest.raises(Fp8CookbookError, match="^a user error$"):  # not rewritten
        with log.stage("convert", hint="never shown"):
            raise Fp8CookbookError("a user error")


def test_stage_without_log_prints_its_line(capsys):
    with stage("bench") as record:
        pass
    assert capsys.readouterr().out.strip() == record.line()


def test_quantize_cli_records_each_step_and_its_disk(tmp_path, capsys, tiny_cache_env):
    from fp8cookbook.cli import main

    out = tmp_path / "q"
    assert main(["quantize", "--family", "flux1", "--num-prompts", "1", "--calib-steps", "1", "--output-dir", str(out),
                 "--quiet"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("stage ")]
    names = [line.split()[1] for line in printed]
    assert names == ["load", "calibrate", "state", "export", "convert"]  # the tiny folder is the BF16 base
    records = {r["name"]: r for r in json.loads((out / "quantize.json").read_text())["stages"]}
    assert records["state"]["bytes_written"] == (out / "transformer.pt").stat().st_size
    assert records["export"]["output"] == [str(out / "export" / "transformer")]  # final paths, not the staging ones
    # the stats file is rewritten with the final paths after the stage: a few bytes differ
    assert abs(records["convert"]["bytes_written"] - stages.tree_bytes([out / "fp8" / "transformer"])) < 4096
    assert records["calibrate"]["extra"]["prompts"] == 1 and records["calibrate"]["peak_rss_mb"] > 0


def test_cli_out_of_memory_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, tiny_cache_env):
    from fp8cookbook.cli import main
    from fp8cookbook.quantize import pipeline

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB. GPU 0 has a total capacity of "
                                     "79.19 GiB of which 2.00 GiB is free.\nIncluding non-PyTorch memory ...")

    monkeypatch.setattr(pipeline, "calibrate_together", oom)
    out = tmp_path / "q"
    assert main(["quantize", "--family", "flux1", "--num-prompts", "1", "--output-dir", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fp8cookbook quantize: error: stage calibrate: out of GPU memory (CUDA")
    assert "--height/--width" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_tree_bytes_counts_a_hard_linked_file_once(tmp_path):
    """A full repo hard-links its FP8 transformer to fp8/: the disk holds one copy, and the stage says so (the H200
    notebook runs had reported it twice: 54.2 GB written where 36.1 GB were)."""
    import os

    (tmp_path / "fp8").mkdir()
    (tmp_path / "repo").mkdir()
    (tmp_path / "fp8" / "w.safetensors").write_bytes(b"x" * 1000)
    os.link(tmp_path / "fp8" / "w.safetensors", tmp_path / "repo" / "w.safetensors")
    (tmp_path / "repo" / "vae").symlink_to(tmp_path / "fp8")
    (tmp_path / "other.bin").write_bytes(b"y" * 10)
    assert stages.tree_bytes([tmp_path]) == 1010
    assert stages.tree_bytes([tmp_path / "fp8", tmp_path / "repo"]) == 1000
    assert stages.tree_bytes([tmp_path / "missing"]) == 0
