"""Property tests (hypothesis) and a mutation fuzzer over headers, configs, indexes, scale tensors and state files,
through convert, inspect and load (issue 15). Every case ends in success or one named error line within a time
bound, never a traceback, a hang or a partial output, and its inputs are byte-identical afterwards.

CI runs a seeded sample (FP8COOKBOOK_FUZZ_N, default 240 cases, the six classes in turn). The full run:
`FP8COOKBOOK_FUZZ_N=10000 PYTHONPATH=$PWD python -m pytest -q tests/test_fuzz.py -k mutation -s`
(docs/reliability.md records its last figures). FP8COOKBOOK_FUZZ_SEED picks another sample.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import time
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fp8cookbook import files
from fp8cookbook.checkpoint import IgnoreRules, _read_header_and_size, scan_tensors
from fp8cookbook.cli import main
from fp8cookbook.errors import Fp8CookbookError

FUZZ_N = int(os.environ.get("FP8COOKBOOK_FUZZ_N", "240"))
FUZZ_SEED = int(os.environ.get("FP8COOKBOOK_FUZZ_SEED", "1515"))
CASE_SECONDS = 30  # per case; an honest case takes well under a second (a 2-core machine under load: a few)
SHARD = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
PROPERTY = settings(max_examples=int(os.environ.get("FP8COOKBOOK_PROPERTY_N", "150")), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------------------- raw files
def write_raw(path: Path, header: bytes, body: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)


def split_raw(data: bytes) -> tuple[bytes, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return data[8:8 + n], data[8 + n:]


def _library_reads(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]] | None:
    try:
        with safe_open(str(path), "pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception:  # noqa: BLE001 - any refusal
        return None


# ----------------------------------------------------------------------------------- property tests
DTYPES = ["F32", "BF16", "F16", "F8_E4M3", "I64", "U8", "BOOL", "F4", "X", 3, None]
SIZES = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "I64": 8, "U8": 1, "BOOL": 1}
ints = st.one_of(st.integers(0, 6), st.integers(-3, 3), st.sampled_from([True, 1.0, "2", None, 2**65]))


@st.composite
def headers(draw):
    """Headers near the valid ones: correct layouts with a few fields or offsets drawn off-by-something."""
    n = draw(st.integers(0, 4))
    header: dict = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
                                                st.dictionaries(st.text(max_size=2), ints, max_size=2), st.none(),
                                                st.just(["x"])))
    offset = 0
    for i in range(n):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.one_of(st.lists(st.integers(0, 4), max_size=3), st.lists(ints, max_size=3), st.just("3")))
        size = SIZES.get(dtype, 1) * (math.prod(shape) if isinstance(shape, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) else 1)
        start, stop = offset, offset + size
        if draw(st.integers(0, 4)) == 0:
            start, stop = draw(ints), draw(ints)
        header[draw(st.sampled_from([f"t{i}", f"t{i}", "t0", "\ud800", ""]))] = {
            "dtype": dtype, "shape": shape, "data_offsets": [start, stop]}
        offset += size
    body_len = offset + draw(st.sampled_from([0, 0, 0, 1, -1]))
    return header, min(max(body_len, 0), 1 << 16)  # a huge promised size gets a short body: "truncated"


@PROPERTY
@given(headers(), st.sampled_from([b"", b" ", b"  "]))
def test_reader_is_at_least_as_strict_as_safetensors(tmp_path, spec, pad):
    """Whatever we accept, the safetensors library accepts too, with the same names, dtypes and shapes."""
    header, body_len = spec
    path = tmp_path / "x.safetensors"
    try:
        blob = json.dumps(header).encode("utf-8", "surrogatepass") + pad
    except (TypeError, ValueError):
        return
    write_raw(path, blob, bytes(body_len))
    try:
        ours, _ = _read_header_and_size(path)
    except Fp8CookbookError as e:
        assert str(path) in str(e)
        return
    theirs = _library_reads(path)
    assert theirs is not None, f"we accepted what safetensors refuses: {header}"
    names = {k for k in ours if k != "__metadata__"}
    assert names == set(theirs)


@PROPERTY
@given(st.dictionaries(st.sampled_from(["a", "b.c", "d_e"]), st.tuples(
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]),
    st.lists(st.integers(0, 5), max_size=3)), min_size=1, max_size=3))
def test_reader_accepts_what_safetensors_writes(tmp_path, spec):
    tensors = {k: torch.zeros(shape, dtype=dt) for k, (dt, shape) in spec.items()}
    path = tmp_path / "y.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    folder = tmp_path
    for p in folder.glob("*.safetensors"):
        if p != path:
            p.unlink()
    info = scan_tensors(folder)
    assert {k: (v.dtype, v.shape) for k, v in info.items()} == {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}


def _reference_glob(pattern: str, name: str) -> bool:
    return re.fullmatch(".*".join(re.escape(p) for p in pattern.split("*")), name, flags=re.DOTALL) is not None


@PROPERTY
@given(st.lists(st.text("ab.*", max_size=8), max_size=5), st.text("ab.", max_size=12))
def test_ignore_rules_match_the_spec(patterns, name):
    rules = IgnoreRules.parse(patterns, "p")
    assert rules.matches(name) == any(_reference_glob(p, name) for p in patterns)


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4)),
                           lambda c: st.one_of(st.lists(c, max_size=3), st.tuples(c, c),
                                               st.dictionaries(st.one_of(st.text(max_size=3), st.integers()), c,
                                                               max_size=3)), max_leaves=12)


@PROPERTY
@given(json_values)
def test_to_jsonable_always_gives_strict_json(value):
    text = json.dumps(files.to_jsonable(value), allow_nan=False)
    assert files.parse_json(text, "x") == json.loads(text)


@PROPERTY
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64),
                 st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
                 st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n)))
def test_parse_json_only_raises_named_errors(data):
    try:
        files.parse_json(data, "where")
    except Fp8CookbookError as e:
        assert str(e).startswith("where: ") and "\n" not in str(e)


# -------------------------------------------------------------------------------------- the fuzzer
WILD = [None, True, False, 0, -1, 1, 3, 2**40, 2**70, 1.5, -0.0, 1e308, "", "x", "*", "F8_E4M3", "../x.safetensors",
        "/etc/passwd", "\ud800", [], [0], [1, 2], [-1, 4], [True], {}, {"a": 1}, ["*"] * 3, "a" * 3000]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            yield from _paths(v, prefix + (i,))


def mutate_obj(obj, rng: random.Random):
    """One structural mutation of a JSON value: replace, delete, add or deepen a node."""
    obj = copy.deepcopy(obj)
    paths = [p for p in _paths(obj) if p]
    if not paths:
        return rng.choice(WILD)
    path = rng.choice(paths)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    op = rng.randrange(5)
    if op == 0 and isinstance(parent, dict):
        del parent[key]
    elif op == 1 and isinstance(parent, dict):
        parent[rng.choice(["__metadata__", "extra", "dtype", "shape", "t0", key + "x"])] = rng.choice(WILD)
    elif op == 2:
        deep = rng.choice(WILD)
        for _ in range(rng.choice([2, 50, 400])):  # deeper ones are written as text (_edit_json_file)
            deep = [deep]
        parent[key] = deep
    elif op == 3 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = parent[key] + rng.choice([-1, 1, 8, -8, 0.5, 10**6])
    else:
        parent[key] = rng.choice(WILD)
    return obj


def _dumps(obj, rng: random.Random) -> bytes:
    text = json.dumps(obj) if rng.random() < 0.9 else json.dumps(obj, indent=1)
    try:
        return text.encode("utf-8", "surrogatepass")
    except UnicodeError:
        return text.encode("utf-8", "replace")


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 8])):
        op = rng.randrange(4)
        i = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(i, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 100])))
        elif op == 2:
            del data[i:i + rng.choice([1, 8, 1000])]
        else:
            data = data[:i]
    return bytes(data)


def _edit_json_file(path: Path, rng: random.Random) -> None:
    if rng.random() < 0.2:
        path.write_bytes(mutate_bytes(path.read_bytes(), rng))
        return
    obj = json.loads(path.read_text())
    if rng.random() < 0.05:
        n = rng.choice([1000, 100_000])
        path.write_text('{"a": ' + "[" * n + "]" * n + "}")
        return
    if rng.random() < 0.1:  # a duplicated key, which a dict cannot hold
        text = path.read_text().rstrip()
        path.write_text(text[:-1] + ', "_class_name": "x"}' if text.endswith("}") else text)
        return
    path.write_bytes(_dumps(mutate_obj(obj, rng), rng))


def m_config(folder: Path, rng: random.Random) -> None:
    path = folder / "config.json"
    obj = json.loads(path.read_text())
    if rng.random() < 0.6:  # aim at the quantization config, where the interesting types live
        qc = obj.get("quantization_config", {})
        key = rng.choice(["ignore", "exclude_modules", "quant_algo", "quantization", "config_groups", "kv_cache_scheme"])
        qc[key] = rng.choice(WILD + [["a", 3], "proj_out", ["*a" * 24 + "*b"], [f"m{i}" for i in range(3000)],
                                     {"quant_algo": "FP8", "exclude_modules": rng.choice(WILD)}])
        obj["quantization_config"] = qc
        if rng.random() < 0.2:
            obj["_class_name"] = rng.choice(["DiffusionPipeline", "models", "FluxPipeline", "AutoencoderKL", 3,
                                             "load_image"])
        path.write_bytes(_dumps(obj, rng))
    else:
        _edit_json_file(path, rng)


def m_header(folder: Path, rng: random.Random) -> None:
    shard = rng.choice(sorted(folder.glob("*.safetensors")))
    data = shard.read_bytes()
    if rng.random() < 0.3:
        shard.write_bytes(mutate_bytes(data[: 8 + struct.unpack("<Q", data[:8])[0] + 64], rng)
                          + data[8 + struct.unpack("<Q", data[:8])[0] + 64:])
        return
    blob, body = split_raw(data)
    header = json.loads(blob)
    if rng.random() < 0.1:
        header = {}
    write_raw(shard, _dumps(mutate_obj(header, rng), rng), body if rng.random() < 0.9 else mutate_bytes(body, rng))


def m_index(folder: Path, rng: random.Random) -> None:
    shard = folder / SHARD
    header = json.loads(split_raw(shard.read_bytes())[0])
    wm = {k: SHARD for k in header if k != "__metadata__"}
    path = folder / INDEX
    path.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": wm}))
    if rng.random() < 0.3:
        name = rng.choice(sorted(wm))
        wm[name] = rng.choice(["../in/x.safetensors", "/etc/passwd", "sub/a.safetensors", "", "..", 3, None,
                               "missing.safetensors", SHARD + "\ud800"])
        path.write_bytes(_dumps({"weight_map": wm}, rng))
    else:
        _edit_json_file(path, rng)


SCALE_VALUES = [float("nan"), float("inf"), -1.0, 0.0, 1e-38, 1e38, 0.02]
SCALE_SHAPES = [(), (1,), (0,), (2,), (4, 4), (16,), (1, 1)]


def m_scale(folder: Path, rng: random.Random) -> None:
    shard = folder / SHARD
    if not shard.exists():
        return
    sd = load_file(shard)
    names = [n for n in sd if n.endswith(("weight_scale", "input_scale"))]
    name = rng.choice(names + ["transformer_blocks.0.attn.q_bmm_quantizer._amax",
                               "transformer_blocks.0.attn.k_bmm_quantizer._amax"])
    shape = rng.choice(SCALE_SHAPES)
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.float8_e4m3fn])
    value = torch.full(shape, rng.choice(SCALE_VALUES))
    sd[name] = value.to(dtype) if dtype.is_floating_point else value.nan_to_num().to(dtype)
    save_file(sd, shard, metadata={"format": "pt"})


def m_state(root: Path, rng: random.Random) -> None:
    state = torch.load(root / "transformer.pt", weights_only=True)
    sd = state["model_state_dict"]
    keys = [k for k in sd if k.endswith("_amax")]
    for _ in range(rng.choice([1, 3])):
        sd[rng.choice(keys)] = torch.full(rng.choice(SCALE_SHAPES), rng.choice(SCALE_VALUES))
    if rng.random() < 0.1:
        state = rng.choice([[1, 2], {"model_state_dict": 3}, torch.zeros(3)])
    torch.save(state, root / "transformer.pt")


def _digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class CaseTimeout(BaseException):
    """Not an OSError (as TimeoutError is), so the CLI's one-line handler cannot swallow a hang."""


def _alarm(*_):
    raise CaseTimeout(f"case ran past {CASE_SECONDS} s")


def m_side(folder: Path, rng: random.Random) -> None:
    """The attention side file (Q/K/V amaxes), read by load with --fp8-attention on."""
    path = folder / "fp8cookbook_attention_scales.json"
    if rng.random() < 0.5:
        obj = json.loads(path.read_text())
        key = rng.choice(sorted(obj["amax"]))
        obj["amax"][key] = rng.choice(WILD + [float("nan"), float("inf"), -1.0, 0.0, [1.0]])
        path.write_text(json.dumps(obj))  # NaN and Infinity as Python writes them
    else:
        _edit_json_file(path, rng)


CLASSES = ["config", "header", "index", "scale", "state", "side"]


def _run_case(i: int, rng: random.Random, seeds: dict[str, Path], work: Path) -> tuple[str, str, str | None]:
    """Mutate one input, run one command, check every promise; returns (class, outcome, failure or None)."""
    kind = CLASSES[i % len(CLASSES)]
    target = ("convert" if kind == "state" else "load" if kind == "side"
              else rng.choice(["convert", "convert", "inspect", "load"]))
    case = work / f"c{i}"
    case.mkdir()
    root = case / "in"
    if target == "convert":
        shutil.copytree(seeds["handmade"], root)
        folder = root / "export"
    else:
        shutil.copytree(seeds["fp8"], root / "fp8")
        folder = root / "fp8"
    {"config": m_config, "header": m_header, "index": m_index, "scale": m_scale,
     "side": m_side}.get(kind, lambda f, r: None)(folder, rng)
    if kind == "state":
        m_state(root, rng)
    before = _digest(root)
    out = case / "out"
    if target == "convert":
        argv = ["convert", str(folder), str(out), "--base-transformer", str(root / "base"), "--quiet"]
        if kind == "state" or rng.random() < 0.3:
            argv += ["--state-file", str(root / "transformer.pt")]
    elif target == "inspect":
        argv = ["inspect", str(folder)]
    else:
        argv = ["load", str(folder), "--no-forward", "--fp8-attention", "on" if kind == "side" else "off"]
    err, failure = io.StringIO(), None
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
    except BaseException as e:  # noqa: BLE001 - a traceback is exactly what the fuzzer looks for
        rc, failure = -1, f"{kind}/{target}: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    text = err.getvalue()
    errors = [line for line in text.splitlines() if ": error: " in line]
    if failure is None:
        if "Traceback" in text:
            failure = f"{kind}/{target}: traceback on stderr: {text[-800:]}"
        elif rc == 2 and len(errors) != 1:
            failure = f"{kind}/{target}: exit 2 without exactly one error line: {text[-800:]!r}"
        elif rc not in ((0, 1, 2) if target == "inspect" else (0, 2)):
            failure = f"{kind}/{target}: exit {rc}"
        elif target == "convert" and rc == 0:
            from fp8cookbook.checkpoint import inspect_checkpoint

            if inspect_checkpoint(out).problems:
                failure = f"{kind}/convert: exit 0 but the output is inconsistent"
        elif target == "convert" and out.exists():
            failure = f"{kind}/convert: exit {rc} left {out}"
        if failure is None and [p.name for p in case.iterdir() if p.name.startswith(".fp8c-")]:
            failure = f"{kind}/{target}: temporary left behind"
        if failure is None and _digest(root) != before:
            failure = f"{kind}/{target}: an input changed"
    if failure is not None:
        failure += f"\n  argv: {argv}\n  case kept in {case}"
    else:
        shutil.rmtree(case)
    outcome = "ok" if rc == 0 else ("flagged" if rc == 1 else "refused")
    return kind + "/" + target, outcome, failure


@pytest.fixture(scope="module")
def fuzz_seeds(tmp_path_factory, _handmade_cache):
    root = tmp_path_factory.mktemp("fuzz-seeds")
    shutil.copytree(_handmade_cache["export"].parent, root / "handmade")
    # the hand-made export with Q/K/V amaxes, so the attention side file is fuzzed too
    sd = load_file(root / "handmade" / "export" / SHARD)
    for q in "qkv":
        sd[f"transformer_blocks.0.attn.{q}_bmm_quantizer._amax"] = torch.tensor(2.0)
    save_file(sd, root / "handmade" / "export" / SHARD, metadata={"format": "pt"})
    h = root / "handmade"
    assert main(["convert", str(h / "export"), str(root / "fp8"), "--base-transformer", str(h / "base"),
                 "--quiet"]) == 0
    return {"handmade": h, "fp8": root / "fp8"}


def test_mutation_fuzzer(fuzz_seeds, tmp_path, one_thread):
    rng = random.Random(FUZZ_SEED)
    counts: Counter = Counter()
    failures: list[str] = []
    t0 = time.monotonic()
    slowest, slowest_label = 0.0, ""
    for i in range(FUZZ_N):
        t = time.monotonic()
        label, outcome, failure = _run_case(i, rng, fuzz_seeds, tmp_path)
        if time.monotonic() - t > slowest:
            slowest, slowest_label = time.monotonic() - t, f"case {i} {label} {outcome}"
        counts[(label, outcome)] += 1
        if failure:
            failures.append(failure)
            if len(failures) >= 5:
                break
    seconds = time.monotonic() - t0
    summary = {"cases": sum(counts.values()), "seed": FUZZ_SEED, "seconds": round(seconds, 1),
               "slowest_case_s": round(slowest, 2), "slowest_case": slowest_label, "failures": len(failures),
               "by_class": {f"{k[0]} {k[1]}": v for k, v in sorted(counts.items())}}
    print(json.dumps(summary, indent=1))
    if os.environ.get("FP8COOKBOOK_FUZZ_REPORT"):
        Path(os.environ["FP8COOKBOOK_FUZZ_REPORT"]).write_text(json.dumps(summary, indent=1) + "\n")
    assert not failures, "\n\n".join(failures)
    assert summary["cases"] == FUZZ_N
