"""Hostile input (issue 15): one test per class of attack or accident. Each ends in success or one named line and
exit 2, never a traceback or a hang; inputs are byte-identical afterwards and nothing is left half-written."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8cookbook import files
from fp8cookbook.checkpoint import IgnoreRules, inspect_checkpoint, scan_tensors
from fp8cookbook.cli import main
from fp8cookbook.convert import compile_keep_bf16
from fp8cookbook.errors import Fp8CookbookError

from conftest import snapshot

WEIGHT = "single_transformer_blocks.0.attn.to_q"
SHARD = "diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def _time_bound():
    """A hang fails the test after 60 s instead of stalling the suite."""
    class Hung(BaseException):  # not an OSError (as TimeoutError is), which the CLI would print as one line
        pass

    def boom(*_):
        raise Hung("hung")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------------------------- helpers
def read_raw(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw(path: Path, header: dict | bytes | str, body: bytes) -> None:
    blob = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode(
        "utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def edit_header(folder: Path, fn, name: str = SHARD) -> None:
    header, body = read_raw(folder / name)
    fn(header)
    write_raw(folder / name, header, body)


def edit_config(folder: Path, fn) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def edit_tensors(folder: Path, fn) -> None:
    sd = load_file(folder / SHARD)
    fn(sd)
    save_file(sd, folder / SHARD)


def make_index(folder: Path, fn=lambda wm: None) -> Path:
    header, _ = read_raw(folder / SHARD)
    wm = {k: SHARD for k in header if k != "__metadata__"}
    fn(wm)
    path = folder / "diffusion_pytorch_model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err.strip()


def assert_refused(capsys, argv: list, fragments: list[str], *, out: Path | None = None, inputs: Path | None = None,
                   before: dict | None = None) -> str:
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, f"{f!r} not in {err!r}"
    if out is not None:
        assert not out.exists() or out.is_symlink() or before is not None
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".fp8c-")]
        assert leftovers == [], leftovers
    if inputs is not None and before is not None:
        assert snapshot(inputs) == before, "an input changed"
    return err


def convert_args(h, out, *extra):
    return ["convert", h["export"], out, "--base-transformer", h["base"], "--quiet", *extra]


# ------------------------------------------------------------------------------------------- data loss
def _pipe_layout(h, tmp_path):
    """A pipeline-style export: PIPE/transformer holds the export."""
    pipe = tmp_path / "PIPE"
    pipe.mkdir()
    os.rename(h["export"], pipe / "transformer")
    (pipe / "model_index.json").write_text("{}")
    return pipe


def test_overwrite_refuses_every_input_relation(handmade, tmp_path, capsys):
    pipe = _pipe_layout(handmade, tmp_path)
    root = handmade["base"].parent
    before = snapshot(tmp_path)
    base, state = handmade["base"], handmade["state"]
    link = tmp_path / "link-to-pipe"
    link.symlink_to(pipe)
    targets = [pipe, pipe / "transformer", pipe / "transformer" / "sub", base.parent, base, state.parent, link,
               tmp_path]
    for target in targets:
        argv = ["convert", pipe / "transformer", target, "--base-transformer", base, "--state-file", state,
                "--quiet", "--overwrite"]
        assert_refused(capsys, argv, ["the output", "input"])
        assert snapshot(tmp_path) == before, f"{target}: an input changed"
        # and via the pipeline folder as given
        argv[1] = pipe
        assert_refused(capsys, argv, ["the output", "input"])
        assert snapshot(tmp_path) == before, f"{target}: an input changed"
    assert root.exists()


def test_target_symlink_file_and_dangling_link_are_refused(handmade, tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("x")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    assert_refused(capsys, convert_args(handmade, f, "--overwrite"), [str(f), "not a folder"])
    assert f.read_text() == "x"
    assert_refused(capsys, convert_args(handmade, dangling, "--overwrite"), [str(dangling), "symbolic link"])
    assert_refused(capsys, convert_args(handmade, link, "--overwrite"), [str(link), "symbolic link"])
    assert dangling.is_symlink() and link.is_symlink() and list(elsewhere.iterdir()) == []
    assert_refused(capsys, convert_args(handmade, f / "sub"), [str(f), "not a folder"])


def test_read_only_parent_is_one_line(handmade, tmp_path, capsys, monkeypatch):
    real = os.mkdir

    def erofs(path, *a, **k):
        if Path(path).name.startswith(".fp8c-"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(files.os, "mkdir", erofs)
    out = tmp_path / "o"
    assert_refused(capsys, convert_args(handmade, out), [str(out), "Read-only file system"], out=out)


# --------------------------------------------------------------------------------- reading outside inputs
@pytest.mark.parametrize("shard", ["../evil/x.safetensors", "/etc/passwd", "../../../../../../etc/passwd",
                                   "sub/x.safetensors", "..", "x.bin", 7])
def test_index_shard_names_must_be_plain(shard, handmade, tmp_path, capsys, monkeypatch):
    export = handmade["export"]
    evil = export.parent / "evil"
    evil.mkdir()
    os.mkfifo(evil / "x.safetensors")  # opened, it would block: proof that nothing outside is opened
    make_index(export, lambda wm: wm.__setitem__(f"{WEIGHT}.weight", shard))
    opened: list[str] = []
    real = files.os.open
    monkeypatch.setattr(files.os, "open", lambda p, *a, **k: (opened.append(str(p)), real(p, *a, **k))[1])
    out = tmp_path / "o"
    assert_refused(capsys, convert_args(handmade, out), ["index.json", "plain", WEIGHT], out=out)
    assert not any("evil" in p or "passwd" in p for p in opened), opened


@pytest.mark.parametrize("what", ["shard", "config.json", "state", "index"])
def test_non_regular_files_are_refused_without_hanging(what, handmade, tmp_path, capsys):
    export = handmade["export"]
    extra = []
    if what == "shard":
        (export / SHARD).unlink()
        os.mkfifo(export / SHARD)
    elif what == "config.json":
        (export / "config.json").unlink()
        os.mkfifo(export / "config.json")
    elif what == "index":
        os.mkfifo(export / "diffusion_pytorch_model.safetensors.index.json")
    else:
        handmade["state"].unlink()
        os.mkfifo(handmade["state"])
        extra = ["--state-file", handmade["state"]]
    t0 = time.monotonic()
    out = tmp_path / "o"
    assert_refused(capsys, convert_args(handmade, out, *extra), ["not a regular file"], out=out)
    assert time.monotonic() - t0 < 30


# ----------------------------------------------------------------------------------------- blow-ups
def test_keep_bf16_regex_is_linear_time(handmade, tmp_path, capsys):
    rules = compile_keep_bf16([r"(a+)+$"])
    t0 = time.monotonic()
    assert rules[0].search("a" * 100_000 + "b") is None
    assert time.monotonic() - t0 < 1
    rc, _, err = run_cli(capsys, *convert_args(handmade, tmp_path / "o", "--keep-bf16", "(a+)+$"))
    assert rc == 0, err
    assert_refused(capsys, convert_args(handmade, tmp_path / "p", "--keep-bf16", r"(a)\1"), ["--keep-bf16", "RE2"])
    assert_refused(capsys, convert_args(handmade, tmp_path / "p", "--keep-bf16", "x" * 2000), ["--keep-bf16", "1000"])


def test_ignore_globs_and_long_lists_are_bounded(handmade, tmp_path, capsys):
    evil = "*a" * 24 + "*b"
    rules = IgnoreRules.parse([evil], "test")
    t0 = time.monotonic()
    assert not rules.matches("a" * 5000)
    assert time.monotonic() - t0 < 1
    export = handmade["export"]
    names = [f"m{i}.x" for i in range(50_000)]
    edit_config(export, lambda c: c["quantization_config"]["ignore"].extend([evil, *names]))
    t0 = time.monotonic()
    rc, _, err = run_cli(capsys, *convert_args(handmade, tmp_path / "o"))
    assert rc == 0, err
    assert time.monotonic() - t0 < 30
    t0 = time.monotonic()
    rc, _, _ = run_cli(capsys, "inspect", tmp_path / "o")
    assert rc == 0 and time.monotonic() - t0 < 30
    edit_config(export, lambda c: c["quantization_config"]["ignore"].extend(f"*x{i}*" for i in range(5000)))
    assert_refused(capsys, convert_args(handmade, tmp_path / "p"), ["config.json", "patterns with `*`", "512"])
    edit_config(export, lambda c: c["quantization_config"].update(ignore=["y" * 5000]))
    assert_refused(capsys, convert_args(handmade, tmp_path / "p"), ["config.json", "5000 characters"])


@pytest.mark.parametrize("where", ["config.json", "index", "header"])
def test_deep_json_is_one_line(where, handmade, tmp_path, capsys):
    export = handmade["export"]
    deep = "[" * 100_000 + "]" * 100_000
    if where == "config.json":
        (export / "config.json").write_text(deep)
    elif where == "index":
        make_index(export).write_text('{"weight_map": ' + deep + "}")
    else:
        _, body = read_raw(export / SHARD)
        write_raw(export / SHARD, '{"a": ' + deep + "}", body)
    name = {"config.json": "config.json", "index": "index.json", "header": SHARD}[where]
    assert_refused(capsys, convert_args(handmade, tmp_path / "o"), [name, "nested deeper"])


def test_oversized_json_is_refused(handmade, tmp_path, capsys):
    with open(handmade["export"] / "config.json", "r+b") as f:
        f.truncate(17 * 2**20)  # sparse: no real disk use
    assert_refused(capsys, convert_args(handmade, tmp_path / "o"), ["config.json", "larger than"])


# -------------------------------------------------------------------------------- malformed headers
def _set_entry(key, value, tensor=f"{WEIGHT}.weight"):
    return lambda h: h[tensor].__setitem__(key, value)


def _swap_offsets(h):
    h[f"{WEIGHT}.weight"]["data_offsets"] = h[f"{WEIGHT}.weight"]["data_offsets"][::-1]


def _point_at_other(h):
    a, b = f"{WEIGHT}.weight", f"single_transformer_blocks.0.attn.to_k.weight"
    h[a]["data_offsets"] = list(h[b]["data_offsets"])


def _duplicate_name(folder: Path):
    header, body = read_raw(folder / SHARD)
    text = json.dumps(header)
    entry = json.dumps(header[f"{WEIGHT}.weight_scale"])
    text = text[:-1] + f', "{WEIGHT}.weight_scale": {entry}' + "}"
    write_raw(folder / SHARD, text, body)


def _lone_surrogate(folder: Path):
    header, body = read_raw(folder / SHARD)
    text = json.dumps(header).replace(f'"{WEIGHT}.weight"', f'"{WEIGHT}.weight\\ud800"')
    write_raw(folder / SHARD, text, body)


HEADER_CASES = {
    "offsets as floats": (_set_entry("data_offsets", [0.0, 4.0]), "data_offsets"),
    "shape a string": (_set_entry("shape", "16,16"), "shape"),
    "shape null": (_set_entry("shape", None), "shape"),
    "shape [true]": (_set_entry("shape", [True]), "shape"),
    "shape [-1, -1]": (_set_entry("shape", [-1, -1]), "shape"),
    "offsets out of order": (_swap_offsets, "out of order"),
    "offsets at another tensor": (_point_at_other, "overlap"),
    "unknown dtype": (_set_entry("dtype", "F4"), "dtype"),
    "entry not an object": (lambda h: h.__setitem__(f"{WEIGHT}.weight", [1, 2]), "expected an object"),
    "non-string metadata": (lambda h: h.__setitem__("__metadata__", {"format": "pt", "n": 3}), "__metadata__"),
    "metadata a list": (lambda h: h.__setitem__("__metadata__", ["x"]), "__metadata__"),
    "header {}": (lambda h: [h.pop(k) for k in list(h)], "after the last tensor"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_malformed_headers_are_named(case, handmade, tmp_path, capsys):
    fn, fragment = HEADER_CASES[case]
    edit_header(handmade["export"], fn)
    before = snapshot(handmade["export"])
    out = tmp_path / "o"
    assert_refused(capsys, convert_args(handmade, out), [SHARD, fragment], out=out, inputs=handmade["export"],
                   before=before)
    rc, _, err = run_cli(capsys, "inspect", handmade["export"])
    assert rc == 2 and SHARD in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("damage,fragment", [(_duplicate_name, "duplicate key"), (_lone_surrogate, "UTF-8")])
def test_duplicate_and_lone_surrogate_names(damage, fragment, handmade, tmp_path, capsys):
    damage(handmade["export"])
    assert_refused(capsys, convert_args(handmade, tmp_path / "o"), [SHARD, fragment], out=tmp_path / "o")


def test_index_not_utf8(handmade, tmp_path, capsys):
    make_index(handmade["export"]).write_bytes(b'{"weight_map": {"\xff\xfe": "a.safetensors"}}')
    assert_refused(capsys, convert_args(handmade, tmp_path / "o"), ["index.json", "UTF-8"])


def test_index_and_headers_must_agree(handmade, tmp_path, capsys):
    """One shard of a two-shard export with header `{}` is an error, not a model with half its FP8 layers."""
    export = handmade["export"]
    sd = load_file(export / SHARD)
    names = sorted(sd)
    half = names[: len(names) // 2]
    save_file({k: sd[k] for k in half}, export / "a.safetensors")
    save_file({k: v for k, v in sd.items() if k not in half}, export / "b.safetensors")
    (export / SHARD).unlink()
    wm = {k: ("a.safetensors" if k in half else "b.safetensors") for k in names}
    (export / "m.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    assert main([*map(str, convert_args(handmade, tmp_path / "ok"))]) == 0
    capsys.readouterr()
    write_raw(export / "b.safetensors", {}, b"")
    assert_refused(capsys, convert_args(handmade, tmp_path / "o"), ["b.safetensors"], out=tmp_path / "o")
    write_raw(tmp_path / "ok" / "b.safetensors", {}, b"")
    rc, _, err = run_cli(capsys, "inspect", tmp_path / "ok")
    assert rc == 2 and "b.safetensors" in err


# -------------------------------------------------------------------------------------- scales, ignore
@pytest.mark.parametrize("shape", [[0], [4, 4], [16]])
def test_scale_shapes_are_refused(shape, handmade, tmp_path, capsys):
    edit_tensors(handmade["export"], lambda sd: sd.__setitem__(f"{WEIGHT}.weight_scale", torch.full(shape, 0.01)))
    assert_refused(capsys, convert_args(handmade, tmp_path / "o"), [f"{WEIGHT}.weight_scale", str(shape)],
                   out=tmp_path / "o")


@pytest.mark.parametrize("value", [float("nan"), -1.0, [1.0, 2.0]])
def test_attention_amax_is_checked(value, handmade, tmp_path, capsys):
    name = "transformer_blocks.0.attn.q_bmm_quantizer._amax"
    edit_tensors(handmade["export"], lambda sd: sd.__setitem__(name, torch.tensor(value)))
    assert_refused(capsys, convert_args(handmade, tmp_path / "o"), [name], out=tmp_path / "o")


@pytest.mark.parametrize("value,fragment", [("abc", "found str"), (3, "found int"), (["a", 3], "entry 1 is int"),
                                            ({"a": 1}, "found dict")])
def test_ignore_types(value, fragment, handmade, tmp_path, capsys):
    edit_config(handmade["export"], lambda c: c["quantization_config"].update(ignore=value))
    assert_refused(capsys, convert_args(handmade, tmp_path / "o"), ["config.json", "ignore", fragment])


def test_exclude_modules_string_and_nested_form(handmade, tmp_path, capsys):
    edit_config(handmade["export"], lambda c: c["quantization_config"].update(exclude_modules="proj_out"))
    assert_refused(capsys, convert_args(handmade, tmp_path / "o"), ["exclude_modules", "found str"])
    edit_config(handmade["export"], lambda c: c.update(quantization_config={"quantization": "x"}))
    assert_refused(capsys, convert_args(handmade, tmp_path / "o"), ["quantization must be an object"])


def test_class_name_must_be_a_string(handmade, tmp_path, capsys):
    edit_config(handmade["export"], lambda c: c.update(_class_name=["x"]))
    assert_refused(capsys, convert_args(handmade, tmp_path / "o"), ["config.json", "_class_name"])


# ------------------------------------------------------------------------------------- names and modes
def test_long_output_name(handmade, tmp_path, capsys):
    out = tmp_path / ("n" * 250)
    rc, _, err = run_cli(capsys, *convert_args(handmade, out))
    assert rc == 0, err
    assert inspect_checkpoint(out).problems == []


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                     (0o002, 0o664, 0o775)])
def test_output_modes_follow_umask(umask, file_mode, dir_mode, handmade, tmp_path, capsys):
    old = os.umask(umask)
    try:
        out = tmp_path / "o"
        rc, _, err = run_cli(capsys, *convert_args(handmade, out))
        json_out = files.write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert rc == 0, err
    assert out.stat().st_mode & 0o777 == dir_mode
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == file_mode, p
    assert json_out.stat().st_mode & 0o777 == file_mode


def test_scan_tensors_matches_safetensors_on_good_files(handmade):
    ours = scan_tensors(handmade["export"])
    theirs = load_file(handmade["export"] / SHARD)
    assert set(ours) == set(theirs)
    for k, t in theirs.items():
        assert ours[k].dtype == t.dtype and ours[k].shape == tuple(t.shape)


def test_json_cleaner_and_scale_check():
    import dataclasses

    import numpy as np

    @dataclasses.dataclass
    class D:
        p: Path
        x: float

    out = files.to_jsonable({"a": (1, float("nan")), 2: D(Path("/x"), float("inf")), "t": torch.tensor(2.5),
                             "n": np.float32(1.5), "s": {3, 1}, "dt": torch.float8_e4m3fn})
    assert out == {"a": [1, None], "2": {"p": "/x", "x": None}, "t": 2.5, "n": 1.5, "s": [1, 3],
                   "dt": "torch.float8_e4m3fn"}
    assert files.check_scale("s", torch.tensor([0.5]), "f") == 0.5
    for bad in (torch.zeros(0), torch.ones(4, 4), torch.ones(16), float("nan"), 0.0, -1.0, "x"):
        with pytest.raises(Fp8CookbookError, match="f: s"):
            files.check_scale("s", bad, "f")


# ---------------------------------------------------------------------------------------------- load
@pytest.fixture
def converted(handmade, tmp_path):
    out = tmp_path / "fp8"
    assert main([str(a) for a in convert_args(handmade, out)]) == 0
    return out


@pytest.mark.parametrize("class_name", ["DiffusionPipeline", "FluxPipeline", "models", "load_image", "AutoencoderKL"])
def test_load_refuses_non_transformer_class_names(class_name, converted, capsys):
    edit_config(converted, lambda c: c.update(_class_name=class_name))
    capsys.readouterr()
    err = assert_refused(capsys, ["load", converted, "--no-forward"], ["config.json"])
    assert class_name in err


@pytest.mark.parametrize("key,value,fragment", [("num_layers", 10**9, "config.json"), ("num_single_layers", 1_000_001, "config.json"),
                                                ("num_layers", -3, "does not exist in FluxTransformer2DModel"),
                                                ("num_layers", "two", "config.json")])
def test_load_refuses_impossible_config_values(key, value, fragment, converted, capsys):
    edit_config(converted, lambda c: c.update({key: value}))
    capsys.readouterr()
    t0 = time.monotonic()
    assert_refused(capsys, ["load", converted, "--no-forward"], [fragment])
    assert time.monotonic() - t0 < 30


def test_load_and_inspect_refuse_a_fifo_shard(converted, capsys):
    shard = next(converted.glob("*.safetensors"))
    shard.unlink()
    os.mkfifo(shard)
    capsys.readouterr()
    assert_refused(capsys, ["load", converted, "--no-forward"], ["not a regular file"])
    assert_refused(capsys, ["inspect", converted], ["not a regular file"])
