"""Stand-in pipelines: the real configs' sizes, and reduced folders that load like a download, byte for byte."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from fp8cookbook import standin
from fp8cookbook.checkpoint import TensorReader, scan_tensors
from fp8cookbook.cli import main
from fp8cookbook.errors import Fp8CookbookError
from fp8cookbook.pipelines import generation_kwargs, load_pipeline

FAMILIES = ["flux1", "flux2", "wan22-a14b", "wan22-ti2v-5b"]
QUIET = dict(log=lambda line: None, progress=False)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("family, total_gb, parts", [
    ("flux1", 33.74, {"transformer": 23.80, "text_encoder_2": 9.52}),
    ("flux2", 112.64, {"transformer": 64.45, "text_encoder": 48.02}),
    ("wan22-a14b", 69.14, {"transformer": 28.64, "transformer_2": 28.64, "text_encoder": 11.36}),
    ("wan22-ti2v-5b", 24.20, {"transformer": 10.02, "text_encoder": 11.36, "vae": 2.82}),
])
def test_full_size_table_is_the_real_download(family, total_gb, parts, one_thread):
    """From the meta device (nothing allocated): the sizes of the real repositories' weights, to 10 MB."""
    sizes = {s.name: s for s in standin.size_table(standin.recipe(family, "full"))}
    assert sum(s.nbytes for s in sizes.values()) / 1e9 == pytest.approx(total_gb, abs=0.01)
    for name, gb in parts.items():
        assert sizes[name].nbytes / 1e9 == pytest.approx(gb, abs=0.01)
    assert all(s.source.startswith(standin.get_family(family).hub_id) for s in sizes.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_folder_loads_with_every_tensor_from_the_files(family, tmp_path, one_thread):
    out = tmp_path / "standin"
    result = standin.write_standin(family, out, size="reduced", shard_bytes=60_000, **QUIET)
    pipe = load_pipeline(family, out)
    plan = standin.recipe(family, "reduced")
    assert sorted(c.name for c in plan.components) == sorted(
        n for n, m in pipe.components.items() if isinstance(m, torch.nn.Module))
    table = {s.name: s for s in result.sizes}
    for c in plan.components:
        module = getattr(pipe, c.name)
        assert type(module).__name__ == c.class_name
        tensors = scan_tensors(out / c.name)
        assert sum(t.nbytes for t in tensors.values()) == table[c.name].nbytes  # the table is what was written
        state = module.state_dict()
        with TensorReader(out / c.name) as reader:
            for name, value in state.items():
                if name not in reader:  # a tied copy: the same storage as the one that was written
                    assert name.endswith("embed_tokens.weight") and any(
                        torch.equal(value, state[k]) for k in reader.index), name
                    continue
                assert torch.equal(reader.get(name).to(value.dtype), value), f"{c.name}.{name} not loaded from the file"
    shards = list((out / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    marker = json.loads((out / standin.MARKER).read_text())
    assert marker["family"] == standin.get_family(family).name and marker["seed"] == 0
    assert result.written_bytes == sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) - len(
        (out / standin.MARKER).read_bytes())
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in out.rglob("*") if p.is_file())


def test_reduced_pipeline_generates(tmp_path, one_thread):
    """The folder is a working pipeline: text encoders, transformer and VAE run through `pipe(...)`."""
    out = tmp_path / "f1"
    standin.write_standin("flux1", out, size="reduced", **QUIET)
    pipe = load_pipeline("flux1", out, dtype=torch.float32)
    image = pipe(**generation_kwargs("flux1", pipe, height=64, width=64, num_inference_steps=2,
                                     max_sequence_length=32)).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, one_thread):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    standin.write_standin("wan22-ti2v-5b", a, size="reduced", seed=3, workers=1, **QUIET)
    standin.write_standin("wan22-ti2v-5b", b, size="reduced", seed=3, workers=3, **QUIET)  # threads change nothing
    standin.write_standin("wan22-ti2v-5b", c, size="reduced", seed=4, **QUIET)
    fa, fb, fc = files(a), files(b), files(c)
    fa.pop(standin.MARKER), fb.pop(standin.MARKER), fc.pop(standin.MARKER)  # it records the time taken
    assert fa == fb
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert fa[weights] != fc[weights] and fa["transformer/config.json"] == fc["transformer/config.json"]


def test_in_memory_pipeline_equals_the_folder(tmp_path, one_thread):
    out = tmp_path / "a14b"
    standin.write_standin("wan22-a14b", out, size="reduced", **QUIET)
    loaded = load_pipeline("wan22-a14b", out)
    built = standin.build_standin_pipeline("wan22-a14b", size="reduced")
    for name in ("transformer", "transformer_2", "text_encoder", "vae"):
        a, b = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{name}.{k}"
    assert not torch.equal(loaded.transformer.proj_out.weight, loaded.transformer_2.proj_out.weight)


def test_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "deep" / "er" / "standin"
    assert main(["standin", "flux1", str(out), "--size", "reduced", "--dry-run"]) == 0
    assert not (tmp_path / "deep").exists()
    text = capsys.readouterr().out
    assert "transformer" in text and "total" in text and "dry run" in text


def test_failure_leaves_nothing(tmp_path, monkeypatch, one_thread):
    calls = {"n": 0}
    real = standin.StreamingShardWriter.write_parts

    def failing(self, name, parts):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError("disk on fire")
        return real(self, name, parts)

    monkeypatch.setattr(standin.StreamingShardWriter, "write_parts", failing)
    out = tmp_path / "new" / "standin"
    with pytest.raises(OSError, match="disk on fire"):
        standin.write_standin("flux1", out, size="reduced", **QUIET)
    assert calls["n"] == 40
    assert not (tmp_path / "new").exists()  # no staging folder, and the parents it created are gone
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_refused_without_overwrite(tmp_path, capsys, one_thread):
    out = tmp_path / "standin"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["standin", "flux1", str(out), "--size", "reduced", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert files(out) == {"mine.txt": b"keep me"}
    assert main(["standin", "flux1", str(out), "--size", "reduced", "--quiet", "--overwrite"]) == 0
    assert not (out / "mine.txt").exists() and (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["standin"]


def test_not_enough_disk_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(standin, "_free_bytes", lambda path: 10**6)
    with pytest.raises(Fp8CookbookError, match=r"needs .* GB, the disk has 0.00 GB free"):
        standin.write_standin("flux1", tmp_path / "x", size="reduced", **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_transformer_only_folder_loads_with_the_rest_none(tmp_path, capsys, one_thread):
    out = tmp_path / "a14b"
    assert main(["standin", "wan22", str(out), "--size", "reduced", "--transformer-only", "--layers", "2",
                 "--quiet"]) == 0
    assert "wrote transformer_2" in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["vae"] == [None, None]
    pipe = load_pipeline("wan22", out)
    assert pipe.text_encoder is None and pipe.vae is None and pipe.tokenizer is not None
    assert len(pipe.transformer.blocks) == 2 and len(pipe.transformer_2.blocks) == 2
    from fp8cookbook.compare import compare_trajectories
    from fp8cookbook.quantize import quantize_pipeline

    # what needs the whole pipeline says so in one line, before any slow work
    with pytest.raises(Fp8CookbookError, match=r"has no vae, text_encoder .*--transformer-only.*: calibration runs"):
        quantize_pipeline("wan22", pipe, tmp_path / "q", progress=False)
    with pytest.raises(Fp8CookbookError, match=r"has no vae, text_encoder .*: a comparison runs the whole pipeline"):
        compare_trajectories(pipe, {}, {}, family="wan22")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("argv, message", [
    (["--components", "transformer,unet"], "has components transformer, text_encoder, text_encoder_2, vae"),
    (["--components", "vae", "--transformer-only"], "exclude each other"),
    (["--size", "reduced", "--layers", "0"], None),  # argparse: exit 2 with usage
])
def test_bad_options_are_one_line(tmp_path, capsys, argv, message):
    args = ["standin", "flux1", str(tmp_path / "x")] + (argv if "--size" in argv else argv + ["--size", "reduced"])
    if message is None:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
    else:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_unknown_size_and_family():
    with pytest.raises(Fp8CookbookError, match="unknown stand-in size"):
        standin.recipe("flux1", "huge")
    with pytest.raises(Fp8CookbookError, match="unknown model family"):
        standin.recipe("sdxl")


def _full_size_script():
    """scripts/full_size.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("full_size", Path(__file__).parents[1] / "scripts" / "full_size.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_full_size_script_runs_every_stage_at_reduced_size(tmp_path, capsys, one_thread):
    """scripts/full_size.py (the lead's GPU script) end to end on the CPU, so a GPU run does not find its bugs."""
    script = _full_size_script()
    out, work = tmp_path / "stages.json", tmp_path / "work"
    assert script.main(["--family", "wan22", "--size", "reduced", "--device", "cpu", "--out", str(out),
                        "--work", str(work), "--stages", "build,quantize,convert,load,compare,e2e"]) == 0
    data = json.loads(out.read_text())
    names = [s["name"] for s in data["stages"]]
    assert names == ["build", "base-transformer", "base-transformer_2", "calibrate", "state-transformer",
                     "export-transformer", "convert-transformer", "state-transformer_2", "export-transformer_2",
                     "convert-transformer_2", "quantize", "cp-transformer", "convert-transformer", "cp-transformer_2",
                     "convert-transformer_2", "cat-transformer", "load-transformer", "cat-transformer_2",
                     "load-transformer_2", "compare", "e2e"]
    assert all(s["status"] == "ok" and s["peak_rss_mb"] > 0 for s in data["stages"])
    quantize = data["stages"][names.index("quantize")]
    assert quantize["bytes_written"] > 0 and set(quantize["extra"]["disk"]) == {"transformer", "transformer_2"}
    assert quantize["extra"]["calibration"]["forward_calls"]["transformer_2"] > 0
    assert data["stages"][-2]["extra"]["final_latents"]["cosine"] > 0.99
    e2e = data["stages"][-1]["extra"]  # decoded generations, BF16 then both FP8 experts, one process
    assert e2e["end_to_end_speedup"] > 0 and [x["name"] for x in e2e["sides"]][0] == "bf16", e2e
    assert all(x["phase_s"]["decode"] > 0 and x["call_s"]["median"] > x["loop_s"]["median"] for x in e2e["sides"])
    convert = data["stages"][names.index("convert-transformer", names.index("quantize"))]["extra"]
    # the converter ran in its own process: its peak is its own, below this test process's (which holds torch and
    # the pipelines) and far below what a carried-over ru_maxrss would say
    assert 0 < convert["converter_peak_rss_mb"] < data["stages"][names.index("quantize")]["peak_rss_mb"]
    assert convert["child_seconds"] >= convert["converter_seconds"] > 0
    assert not work.exists()  # removed unless --keep
    assert "summary" in capsys.readouterr().out


def test_full_size_script_base_elsewhere_and_export_dropped(tmp_path, one_thread):
    """--base-dir takes the BF16 base to another folder (a tmpfs on the GPU machine), removed once served;
    --drop-export leaves one FP8 checkpoint per expert and no export; the two refuse the convert stage together."""
    script = _full_size_script()
    out, work, base = tmp_path / "stages.json", tmp_path / "work", tmp_path / "elsewhere" / "base"
    with pytest.raises(SystemExit):
        script.parse_args(["--family", "flux1", "--out", str(out), "--drop-export", "--stages", "build,quantize,convert"])
    assert script.main(["--family", "flux1", "--size", "reduced", "--device", "cpu", "--out", str(out),
                        "--work", str(work), "--base-dir", str(base), "--drop-export", "--keep",
                        "--stages", "build,quantize,load"]) == 0
    data = json.loads(out.read_text())
    records = {s["name"]: s for s in data["stages"]}
    assert records["base"]["output"] == [str(base / "transformer")] and records["base"]["bytes_written"] > 0
    assert not base.exists()  # served, then removed
    assert not (work / "quantize" / "export").exists() and (work / "quantize" / "fp8" / "transformer").is_dir()
    quantized = json.loads((work / "quantize" / "quantize.json").read_text())
    assert quantized["paths"]["transformer"]["base"] == str((base / "transformer").resolve())  # no copy of its own
    assert records["load-transformer"]["extra"]["fp8_layers"] > 0
    assert data["disk"]["estimate_base_bytes"] > 0 and data["disk"]["estimate_work_bytes"] > 0
    # a second run takes those checkpoints (a long run split over two device calls), FP8 side idle on the CPU
    again = tmp_path / "again.json"
    assert script.main(["--family", "flux1", "--size", "reduced", "--device", "cpu", "--out", str(again),
                        "--work", str(tmp_path / "work2"), "--fp8", str(work / "quantize" / "fp8"),
                        "--offload-idle", "--stages", "build,load,compare"]) == 0
    names = [s["name"] for s in json.loads(again.read_text())["stages"]]
    assert names == ["build", "cat-transformer", "load-transformer", "compare"]
    with pytest.raises(Fp8CookbookError, match="no FP8 checkpoint"):
        script.main(["--family", "flux1", "--size", "reduced", "--device", "cpu", "--out", str(again),
                     "--work", str(tmp_path / "work3"), "--fp8", str(tmp_path), "--stages", "load"])


def test_full_size_script_e2e_without_checkpoints_quantises_in_process(tmp_path, one_thread):
    """build,e2e alone: no export or checkpoint on disk (FLUX.2 at full depth does not fit one), the FP8 side made
    in process from one short calibration generation, the warm-up shortened, and the record says both."""
    script = _full_size_script()
    out, work = tmp_path / "stages.json", tmp_path / "work"
    assert script.main(["--family", "flux1", "--size", "reduced", "--device", "cpu", "--out", str(out),
                        "--work", str(work), "--keep", "--stages", "build,e2e", "--e2e-warmup-steps", "1"]) == 0
    data = json.loads(out.read_text())
    assert [s["name"] for s in data["stages"]] == ["build", "e2e"]
    e2e = data["stages"][-1]["extra"]
    assert "in-process" in e2e["fp8_source"] and e2e["warmup_steps"] == 1 and e2e["steps"] == 3, e2e
    assert e2e["fp8_attention"] == "off" and e2e["end_to_end_speedup"] > 0
    assert "after 1 warm-up of 1 steps" in e2e["summary"][0], e2e["summary"]
    assert not any(work.rglob("*.safetensors"))  # nothing written


def test_full_size_script_e2e_one_expert_resident(tmp_path, one_thread):
    """A14B with --offload-idle: the e2e stage keeps one expert on the device at a time on both sides (what an 80 GB
    card needs for the BF16 baseline), and each side records the moves its generations made."""
    script = _full_size_script()
    out = tmp_path / "stages.json"
    assert script.main(["--family", "wan22", "--size", "reduced", "--device", "cpu", "--out", str(out),
                        "--work", str(tmp_path / "work"), "--stages", "build,e2e", "--offload-idle"]) == 0
    e2e = json.loads(out.read_text())["stages"][-1]["extra"]
    assert e2e["one_expert_resident"] is True
    for side in e2e["sides"]:
        moved = {m.split("->")[0] for m in side["expert_moves"]}
        assert moved == {"transformer", "transformer_2"}, side
