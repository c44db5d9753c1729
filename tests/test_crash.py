"""Faults (issue 15): SIGKILL at random points, disk full, racing writers. At every instant the target is absent, the
old complete folder or the new complete one; inputs never change; the next run removes what a killed run left."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fp8cookbook import files
from fp8cookbook.checkpoint import STATS_NAME, StreamingShardWriter, inspect_checkpoint
from fp8cookbook.cli import main
from fp8cookbook.errors import Fp8CookbookError

from conftest import snapshot

KILL_RUNS = int(os.environ.get("FP8COOKBOOK_KILL_RUNS", "24"))
REPO = Path(__file__).resolve().parents[1]

# A fork server: imports once, then forks one converter per request, so each kill costs milliseconds, not an import.
# Writes are slowed (per tensor, and around the final renames) so that random kill times cover every phase.
SERVER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from fp8cookbook import files
from fp8cookbook.checkpoint import StreamingShardWriter
from fp8cookbook.cli import main
SLOW = float(os.environ.get("SLOW", "0.002"))
_write, _exchange, _noreplace = StreamingShardWriter.write, files.rename_exchange, files.rename_noreplace
def write(self, *a):
    time.sleep(SLOW); return _write(self, *a)
def exchange(a, b):
    time.sleep(50 * SLOW); _exchange(a, b); time.sleep(50 * SLOW)
def noreplace(a, b):
    time.sleep(50 * SLOW); _noreplace(a, b)
print("READY", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    r, w = os.pipe()
    pids = []
    for i, argv in enumerate(req["argvs"]):
        pid = os.fork()
        if pid == 0:
            os.close(w)
            fd = os.open(req["log"] + f".{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1); os.dup2(fd, 2)
            os.read(r, 1)  # start together
            StreamingShardWriter.write, files.rename_exchange, files.rename_noreplace = write, exchange, noreplace
            try:
                rc = main(argv)
            except BaseException as e:
                import traceback; traceback.print_exc(); rc = 99
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(rc)
        pids.append(pid)
    os.close(r)
    print(json.dumps({"pids": pids}), flush=True)
    sys.stdin.readline()  # "go"
    os.write(w, b"x" * len(pids)); os.close(w)
    rcs = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        rcs.append(os.waitstatus_to_exitcode(status))
    print(json.dumps({"rcs": rcs}), flush=True)
"""


class ForkServer:
    def __init__(self, slow: float = 0.002):
        env = {**os.environ, "SLOW": str(slow), "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(REPO)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout.readline().strip() == "READY"

    def run(self, argvs: list[list[str]], log: Path, kill_after: float | None = None) -> list[int]:
        """Start the converters together; SIGKILL each after `kill_after` seconds if given; return exit codes."""
        self.proc.stdin.write(json.dumps({"argvs": argvs, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        pids = json.loads(self.proc.stdout.readline())["pids"]
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        if kill_after is not None:
            time.sleep(kill_after)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return json.loads(self.proc.stdout.readline())["rcs"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


def _argv(h, out, *extra) -> list[str]:
    return [str(a) for a in ["convert", h["export"], out, "--base-transformer", h["base"], "--quiet", *extra]]


def _fp8_layers(folder: Path) -> int:
    return json.loads((folder / STATS_NAME).read_text())["quantized_weights"]


def _temps(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".fp8c-"))


def _timed_run(server, h, out, log, *extra) -> float:
    t0 = time.monotonic()
    assert server.run([_argv(h, out, *extra)], log) == [0], (log.with_name(log.name + ".0")).read_text()
    return time.monotonic() - t0


@pytest.mark.slow
def test_sigkill_at_random_points(server, handmade, tmp_path):
    """KILL_RUNS kills (half on a new target, half during --overwrite of a complete one): the target is always
    absent, the old complete folder or the new complete one; the next run cleans up every stale temporary."""
    rng = random.Random(int(os.environ.get("FP8COOKBOOK_KILL_SEED", "15")))
    inputs = snapshot(handmade["export"].parent)
    parent = tmp_path / "outs"
    parent.mkdir()
    duration = _timed_run(server, handmade, parent / "probe", tmp_path / "probe")
    outcomes = {"absent": 0, "old": 0, "new": 0}
    left_behind = 0
    for i in range(KILL_RUNS):
        overwrite = i % 2 == 1
        target = parent / f"t{i}"
        if overwrite:  # a complete old target with 12 FP8 layers; the new one has 13
            assert main(_argv(handmade, target, "--keep-bf16", r"single_transformer_blocks\.0\.attn\.to_q$")) == 0
        rcs = server.run([_argv(handmade, target, *(["--overwrite"] if overwrite else []))], tmp_path / f"log{i}",
                         kill_after=rng.uniform(0.0, duration * 1.1))
        assert rcs[0] in (0, -signal.SIGKILL), rcs
        if not target.exists():
            assert not overwrite, "an --overwrite kill left no target"
            outcomes["absent"] += 1
        else:
            assert inspect_checkpoint(target).problems == [], f"run {i}: partial target"
            layers = _fp8_layers(target)
            assert layers in (12, 13)
            outcomes["old" if overwrite and layers == 12 else "new"] += 1
        left_behind += len(_temps(parent))
        assert snapshot(handmade["export"].parent) == inputs
    # the next run in the folder removes what the killed runs left (their owners are gone)
    assert main(_argv(handmade, parent / "next")) == 0
    assert _temps(parent) == []
    print(f"kill runs {KILL_RUNS}: {outcomes}, temporaries left by kills {left_behind} (all removed by the next run)")
    assert outcomes["absent"] + outcomes["new"] + outcomes["old"] == KILL_RUNS


@pytest.mark.slow
def test_racing_writers_exactly_one_wins(server, handmade, tmp_path):
    for i in range(4):
        target = tmp_path / f"race{i}"
        log = tmp_path / f"race{i}.log"
        rcs = server.run([_argv(handmade, target), _argv(handmade, target)], log)
        assert sorted(rcs) == [0, 2], rcs
        loser = (log.with_name(f"{log.name}.{rcs.index(2)}")).read_text().strip()
        assert "already exists" in loser and len(loser.splitlines()) == 1, loser
        assert inspect_checkpoint(target).problems == []
        assert _temps(tmp_path) == []
    # with --overwrite both may win, one after the other; the target is complete
    target = tmp_path / "race-ow"
    rcs = server.run([_argv(handmade, target, "--overwrite")] * 2, tmp_path / "ow.log")
    assert rcs == [0, 0] and inspect_checkpoint(target).problems == [] and _temps(tmp_path) == []


def test_publish_race_in_threads(tmp_path):
    """Eight threads publish to one new target at once: exactly one succeeds, the others get "already exists"."""
    target = tmp_path / "t"
    barrier = threading.Barrier(8)
    results: list[str] = []

    def worker(i: int) -> None:
        d = tmp_path / f"src{i}"
        d.mkdir()
        (d / "who").write_text(str(i))
        barrier.wait()
        try:
            files.publish(d, target)
            results.append(f"won {i}")
        except Fp8CookbookError as e:
            assert "already exists" in str(e)
            results.append("lost")
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if r.startswith("won")]
    assert len(won) == 1 and results.count("lost") == 7
    assert (target / "who").read_text() == won[0].split()[1]


def test_exchange_keeps_a_complete_target(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "v").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "v").write_text("new")
    files.publish(new, target, overwrite=True)
    assert (target / "v").read_text() == "new" and not new.exists()


# ------------------------------------------------------------------------------------------- disk full
def _enospc_after(n: int):
    real = StreamingShardWriter.write
    calls = {"n": 0}

    def write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, tensor)
    return write


@pytest.mark.parametrize("after", [0, 5, 40])
def test_disk_full_during_write(after, handmade, tmp_path, capsys, monkeypatch):
    old = tmp_path / "old"
    assert main(_argv(handmade, old)) == 0
    before_old = snapshot(old)
    inputs = snapshot(handmade["export"].parent)
    monkeypatch.setattr(StreamingShardWriter, "write", _enospc_after(after))
    capsys.readouterr()
    for target, extra in ((tmp_path / "new", []), (old, ["--overwrite"])):
        assert main(_argv(handmade, target, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "disk full" in err and "needs" in err and str(target) in err, err
        assert _temps(tmp_path) == []
    assert not (tmp_path / "new").exists()
    assert snapshot(old) == before_old and snapshot(handmade["export"].parent) == inputs


def test_not_enough_space_is_found_before_writing(handmade, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    assert main(_argv(handmade, tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert "not enough disk space" in err and "needs" in err and "1000 bytes free" in err, err
    assert not (tmp_path / "o").exists() and _temps(tmp_path) == []


def test_disk_full_in_atomic_json(tmp_path, monkeypatch):
    path = files.write_json_atomic(tmp_path / "r.json", {"v": 1})
    monkeypatch.setattr(files.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(Fp8CookbookError, match="r.json: disk full"):
        files.write_json_atomic(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1} and _temps(tmp_path) == []


def test_real_small_tmpfs(handmade, tmp_path, capsys):
    """Where this process may mount (root with CAP_SYS_ADMIN), a real 64 KiB tmpfs; skipped elsewhere."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        assert main(_argv(handmade, mnt / "o")) == 2
        err = capsys.readouterr().err.strip()
        assert "disk" in err and len(err.splitlines()) == 1, err
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)])


# --------------------------------------------------------------------------------------- stale cleanup
def test_stale_temporaries_only_ours_and_only_dead(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = files.temp_name()
    host, _, start = me.split("-")[1:4]
    dead_name = f".fp8c-{host}-{dead.pid}-{start}-0123abcd.tmp"
    other_host = f".fp8c-00000000-{dead.pid}-{start}-0123abcd.tmp"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        alive_start = files._start_time(alive.pid)
        alive_name = f".fp8c-{host}-{alive.pid}-{alive_start}-0123abcd.tmp"
        reused = f".fp8c-{host}-{alive.pid}-{alive_start + 1}-0123abcd.tmp"  # same pid, another process
        for name in (dead_name, other_host, alive_name, reused, "mine.tmp", me):
            (tmp_path / name).mkdir()
        (tmp_path / f".fp8c-{host}-{dead.pid}-{start}-0000abcd.tmp").write_text("f")
        link_name = f".fp8c-{host}-{dead.pid}-{start}-1111abcd.tmp"
        (tmp_path / link_name).symlink_to(tmp_path / "mine.tmp")
        removed = sorted(p.name for p in files.clean_stale(tmp_path))
        assert removed == sorted([dead_name, reused, f".fp8c-{host}-{dead.pid}-{start}-0000abcd.tmp"])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other_host, alive_name, "mine.tmp", me, link_name])
    finally:
        alive.kill()
        alive.wait()
