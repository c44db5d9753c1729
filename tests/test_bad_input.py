"""Bad input: every case gives one line naming the file and tensor, exit 2, no traceback, nothing on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8cookbook.cli import main

WEIGHT = "single_transformer_blocks.0.attn.to_q"


def _shard(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def _edit_tensors(folder: Path, fn) -> None:
    shard = _shard(folder)
    sd = load_file(shard)
    fn(sd)
    save_file(sd, shard)


def _edit_config(folder: Path, fn) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_STATE_FILE",))


def _pickled_code(h):
    torch.save({"model_state_dict": {"x": torch.zeros(1)}, "evil": _RunsCode()}, h["state"])


def _state_amax(value: float):
    def edit(h):
        state = torch.load(h["state"], weights_only=True)
        state["model_state_dict"][f"{WEIGHT}.input_quantizer._amax"] = torch.tensor(value)
        torch.save(state, h["state"])
    return edit


def _scale(value: float):
    return lambda h: _edit_tensors(h["export"], lambda sd: sd.__setitem__(f"{WEIGHT}.weight_scale", torch.tensor(value)))


def _truncate(h):
    shard = _shard(h["export"])
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def _garbage_header(h):
    shard = _shard(h["export"])
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)


def _shape_mismatch(h):
    def edit(sd):
        sd["proj_out.weight"] = torch.zeros(32, 32, dtype=torch.bfloat16)
    _edit_tensors(h["base"], edit)


CASES = {
    "missing config.json": (lambda h: (h["export"] / "config.json").unlink(), [], ["config.json", "missing"]),
    "invalid config.json": (lambda h: (h["export"] / "config.json").write_text("{oops"), [], ["config.json", "invalid JSON"]),
    "quant_algo NVFP4": (lambda h: _edit_config(h["export"], lambda c: c["quantization_config"].update(quant_algo="NVFP4")),
                         [], ["config.json", "NVFP4"]),
    "no quantization_config": (lambda h: _edit_config(h["export"], lambda c: c.pop("quantization_config")), [],
                               ["config.json", "quantization_config"]),
    "FP8 weight without scale": (lambda h: _edit_tensors(h["export"], lambda sd: sd.pop(f"{WEIGHT}.weight_scale")), [],
                                 [WEIGHT, "weight_scale", ".safetensors"]),
    "NaN scale": (_scale(float("nan")), [], [f"{WEIGHT}.weight_scale", "nan", ".safetensors"]),
    "Inf scale": (_scale(float("inf")), [], [f"{WEIGHT}.weight_scale", "inf"]),
    "zero scale": (_scale(0.0), [], [f"{WEIGHT}.weight_scale", "0.0"]),
    "negative scale": (_scale(-1.0), [], [f"{WEIGHT}.weight_scale", "-1.0"]),
    "NaN amax in state file": (_state_amax(float("nan")), ["--state-file", "STATE"], ["transformer.pt", f"{WEIGHT}.input_quantizer._amax", "nan"]),
    "negative amax in state file": (_state_amax(-2.0), ["--state-file", "STATE"], ["transformer.pt", "input_quantizer._amax", "-2.0"]),
    "shape differs from base": (_shape_mismatch, [], ["proj_out.weight", "shape", "base"]),
    "truncated safetensors": (_truncate, [], [".safetensors", "truncated"]),
    "corrupt safetensors header": (_garbage_header, [], [".safetensors", "not a readable safetensors"]),
    "state file with pickled code": (_pickled_code, ["--state-file", "STATE"], ["transformer.pt", "refused"]),
    "unknown family": (lambda h: None, ["--family", "sd3"], ["unknown model family", "sd3", "flux1"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_convert_bad_input(case, handmade, tmp_path, capsys, monkeypatch):
    damage, extra, fragments = CASES[case]
    damage(handmade)
    monkeypatch.chdir(tmp_path)
    extra = [str(handmade["state"]) if a == "STATE" else a for a in extra]
    out = tmp_path / "out"
    rc = main(["convert", str(handmade["export"]), str(out), "--base-transformer", str(handmade["base"]), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == [], "temporary folder left behind"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fp8c-")] == [], "temporary folder left behind"
    assert not (tmp_path / "PWNED_BY_STATE_FILE").exists(), "the state file's pickled code ran"


@pytest.mark.parametrize("case", ["FP8 weight without scale", "NaN scale", "negative scale", "truncated safetensors",
                                  "missing config.json", "quant_algo NVFP4"])
def test_inspect_and_load_refuse_bad_checkpoints(case, handmade, tmp_path, capsys):
    """The same damage done to a converted checkpoint: inspect exits non-zero, the loader names the tensor."""
    out = tmp_path / "ok"
    assert main(["convert", str(handmade["export"]), str(out), "--base-transformer", str(handmade["base"]), "--quiet"]) == 0
    capsys.readouterr()
    damage, _, fragments = CASES[case]
    damage({"export": out})
    rc = main(["inspect", str(out)])
    text = capsys.readouterr()
    assert rc in (1, 2), text
    rc = main(["load", str(out), "--no-forward"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    fragments = [f for f in fragments if f not in (".safetensors",)]
    assert any(f in err for f in fragments), f"{fragments} not in {err!r}"


def test_inspect_flags_fp8_module_in_ignore(handmade, tmp_path, capsys):
    out = tmp_path / "ok"
    assert main(["convert", str(handmade["export"]), str(out), "--base-transformer", str(handmade["base"]), "--quiet"]) == 0
    _edit_config(out, lambda c: c["quantization_config"]["ignore"].append("single_transformer_blocks.*"))
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 1
    assert f"{WEIGHT}.weight: FP8 weight in a module that `ignore` keeps BF16" in capsys.readouterr().out
