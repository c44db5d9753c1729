"""Converter: output matches the spec, both export flavours, streaming writer, atomicity, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fp8cookbook.checkpoint import FP8_DTYPE, INDEX_NAME, STATS_NAME, StreamingShardWriter, ignored, inspect_checkpoint
from fp8cookbook.cli import main
from fp8cookbook.convert import convert_checkpoint
from fp8cookbook.errors import Fp8CookbookError

from conftest import snapshot


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def test_output_follows_the_spec(handmade, tmp_path):
    out = tmp_path / "fp8"
    before = snapshot(handmade["export"].parent)
    stats = convert_checkpoint(handmade["export"], out, base_transformer=handmade["base"], progress=False)
    assert snapshot(handmade["export"].parent) == before, "converter changed its inputs"

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "FP8"
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert qc["ignore"] == sorted(set(qc["ignore"]))
    assert "kv_cache_scheme" not in qc

    index = json.loads((out / INDEX_NAME).read_text())
    tensors = _all_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in set(index["weight_map"].values()):
        with safe_open(str(out / shard), "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt"
        assert json.loads(meta["_quantization_metadata"]) == qc == json.loads(meta["quantization_config"])

    fp8 = [n for n, t in tensors.items() if t.dtype == FP8_DTYPE]
    assert len(fp8) == stats.quantized_weights == 13
    for name in fp8:
        module = name.removesuffix(".weight")
        assert not ignored(module, qc["ignore"]), module
        for s in ("weight_scale", "input_scale"):
            scale = tensors[f"{module}.{s}"]
            assert scale.dtype == torch.float32 and scale.shape == (1,) and float(scale) > 0
    assert not any("_quantizer." in n for n in tensors)

    # every FLUX.1 fallback layer is BF16, taken from the base, and listed under both of SGLang's names
    base = load_file(next(handmade["base"].glob("*.safetensors")))
    ff = "transformer_blocks.0.ff.net.0.proj"
    assert tensors[f"{ff}.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors[f"{ff}.weight"], base[f"{ff}.weight"])
    assert {ff, "transformer_blocks.0.ff.proj_in", "transformer_blocks.0.ff_context.proj_out"} <= set(qc["ignore"])
    assert stats.bf16_fallback_weights == 7
    assert json.loads((out / STATS_NAME).read_text())["quantized_weights"] == 13
    assert inspect_checkpoint(out).problems == []


def test_bf16_export_with_state_file_matches_fp8_export(handmade, tmp_path):
    """The second flavour: BF16 weights, no scales, amaxes only in the state file -> same FP8 tensors."""
    ref = tmp_path / "ref"
    convert_checkpoint(handmade["export"], ref, base_transformer=handmade["base"], progress=False)
    bf16_export = tmp_path / "bf16_export"
    bf16_export.mkdir()
    base = load_file(next(handmade["base"].glob("*.safetensors")))
    save_file(base, bf16_export / "diffusion_pytorch_model.safetensors")
    (bf16_export / "config.json").write_text((handmade["export"] / "config.json").read_text())
    with pytest.raises(Fp8CookbookError, match="state-file"):
        convert_checkpoint(bf16_export, tmp_path / "nostate", base_transformer=handmade["base"], progress=False)
    out = tmp_path / "from_state"
    stats = convert_checkpoint(bf16_export, out, state_file=handmade["state"], base_transformer=handmade["base"], progress=False)
    assert stats.quantized_from_state_file == stats.quantized_weights == 13
    a, b = _all_tensors(ref), _all_tensors(out)
    assert set(a) == set(b)
    for name in a:
        if a[name].dtype == FP8_DTYPE:
            # the state file's weight amax is bf16-rounded, so allow one E4M3 step of difference
            diff = (a[name].float() - b[name].float()).abs() / a[name].float().abs().clamp_min(2 ** -6)
            assert float(diff.max()) <= 0.13, name
        elif name.endswith("input_scale"):
            assert torch.allclose(a[name], b[name], rtol=1e-2), name
        elif not name.endswith("weight_scale"):
            assert torch.equal(a[name], b[name]), name


def test_quantizer_leftovers_and_kv_cache_scheme_are_dropped(handmade, tmp_path):
    export = handmade["export"]
    shard = next(export.glob("*.safetensors"))
    sd = load_file(shard)
    sd["transformer_blocks.0.attn.q_bmm_quantizer._amax"] = torch.tensor(3.0)
    sd["transformer_blocks.0.attn.k_bmm_quantizer._amax"] = torch.tensor(4.0)
    save_file(sd, shard)
    cfg = json.loads((export / "config.json").read_text())
    cfg["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float"}
    (export / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o"
    stats = convert_checkpoint(export, out, base_transformer=handmade["base"], progress=False)
    assert stats.dropped_quantizer_tensors == 2
    assert not any("_quantizer" in n for n in _all_tensors(out))
    assert "kv_cache_scheme" not in json.loads((out / "config.json").read_text())["quantization_config"]
    side = json.loads((out / "fp8cookbook_attention_scales.json").read_text())
    assert side["amax"]["transformer_blocks.0.attn.k_bmm_quantizer"] == 4.0
    assert "fp8cookbook_attention_scales.json" not in json.loads((out / INDEX_NAME).read_text())["weight_map"].values()


def test_keep_bf16_and_family_none(handmade, tmp_path):
    stats = convert_checkpoint(handmade["export"], tmp_path / "a", base_transformer=handmade["base"],
                               keep_bf16=[r"single_transformer_blocks\.0\.attn\.to_q$"], progress=False)
    assert stats.quantized_weights == 12 and stats.bf16_fallback_weights == 8
    assert "single_transformer_blocks.0.attn.to_q" in stats.ignore
    # family none: the export's FP8 fallback layers stay FP8 (no profile to apply)
    stats = convert_checkpoint(handmade["export"], tmp_path / "b", family="none", progress=False)
    assert stats.bf16_fallback_weights == 0


def test_fallback_without_base_is_refused(handmade, tmp_path):
    with pytest.raises(Fp8CookbookError, match=r"transformer_blocks\.0\..*--base-transformer"):
        convert_checkpoint(handmade["export"], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == [tmp_path / "in"]


def test_export_shards_and_metadata_are_kept(handmade, tmp_path):
    """SGLang keeps the export's shard names and header keys, and adds _class_name and config."""
    shard = next(handmade["export"].glob("*.safetensors"))
    sd = load_file(shard)
    half = sorted(sd)[: len(sd) // 2]
    save_file({k: sd[k] for k in half}, handmade["export"] / "part-1.safetensors", metadata={"format": "pt", "source": "kept"})
    save_file({k: v for k, v in sd.items() if k not in half}, handmade["export"] / "part-2.safetensors")
    shard.unlink()
    out = tmp_path / "o"
    stats = convert_checkpoint(handmade["export"], out, base_transformer=handmade["base"], progress=False)
    assert stats.shards == 2 and sorted(p.name for p in out.glob("*.safetensors")) == ["part-1.safetensors", "part-2.safetensors"]
    with safe_open(str(out / "part-1.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["source"] == "kept" and meta["_class_name"] == "FluxTransformer2DModel"
    assert json.loads(meta["config"])["quantization_config"]["quant_algo"] == "FP8"
    assert inspect_checkpoint(out).problems == []


def _split_into_shards(export: Path, parts: int) -> None:
    shard = next(export.glob("*.safetensors"))
    sd = load_file(shard)
    names = sorted(sd)
    for i in range(parts):
        save_file({k: sd[k] for k in names[i::parts]}, export / f"part-{i}.safetensors", metadata={"format": "pt"})
    shard.unlink()


def test_parallel_shard_writers_write_the_bytes_of_one(handmade, tmp_path, monkeypatch):
    """Shards are written by several threads under a memory budget: the files are byte for byte those of a single
    writer, and the budget was honoured (never more held than it, except one tensor alone)."""
    import fp8cookbook.convert as conv

    _split_into_shards(handmade["export"], 5)
    stats = {}
    for writers in (1, 4):
        monkeypatch.setattr(conv, "WRITERS", writers)
        stats[writers] = convert_checkpoint(handmade["export"], tmp_path / f"w{writers}",
                                            base_transformer=handmade["base"], progress=False)
    files = sorted(p.name for p in (tmp_path / "w1").iterdir() if p.name != STATS_NAME)
    assert files == sorted(p.name for p in (tmp_path / "w4").iterdir() if p.name != STATS_NAME)
    assert sum(f.endswith(".safetensors") for f in files) == 5
    for name in files:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w4" / name).read_bytes(), name

    budget, peak, lock = conv._MemoryBudget(100), [0, 0], __import__("threading").Lock()

    def job(n: int) -> None:
        with budget.hold(n):
            with lock:
                peak[0] += n
                peak[1] = max(peak[1], peak[0])
            __import__("time").sleep(0.01)
            with lock:
                peak[0] -= n

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(job, [30] * 20 + [250] + [30] * 20))
    assert peak[1] == 250 and budget.held == 0  # 30s shared the budget; the 250 ran alone


def test_a_failing_shard_fails_the_whole_conversion_and_leaves_nothing(handmade, tmp_path, monkeypatch):
    import fp8cookbook.convert as conv

    _split_into_shards(handmade["export"], 4)
    real = conv.StreamingShardWriter.write

    def fail_on_part_2(self, name, tensor):
        if self._file.name.endswith("part-2.safetensors"):
            raise OSError(28, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(conv.StreamingShardWriter, "write", fail_on_part_2)
    with pytest.raises(Fp8CookbookError, match=r"/o: disk full while writing \(No space left on device"):
        convert_checkpoint(handmade["export"], tmp_path / "o", base_transformer=handmade["base"], progress=False)
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == [tmp_path / "in"]


def test_streaming_writer_roundtrip(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(16, 16).to(FP8_DTYPE),
               "d": torch.tensor([2.0])}
    w = StreamingShardWriter(tmp_path / "x.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], {"k": "v"})
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    back = load_file(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k].view(torch.uint8), v.view(torch.uint8))


def test_streaming_writer_starts_the_disk_early_and_writes_the_same_bytes(tmp_path, monkeypatch):
    """Early writeback: one background fdatasync per `writeback_bytes` written (never two at once), the same file as
    without it, and a failed background sync raised by close() instead of lost."""
    import os
    import threading

    tensors = {f"t{i}": torch.randn(64, 64) for i in range(6)}  # 16 KiB each
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    calls, overlap, running = [], [], []
    real = os.fdatasync

    def counting(fd):
        overlap.append(len(running))
        running.append(fd)
        calls.append(threading.current_thread().name)
        real(fd)
        running.pop()

    monkeypatch.setattr(os, "fdatasync", counting)
    for name, every in (("late.safetensors", 0), ("early.safetensors", 20_000)):
        with StreamingShardWriter(tmp_path / name, layout, {"k": "v"}, writeback_bytes=every) as w:
            for k, v in tensors.items():
                w.write(k, v)
        if every == 0:
            assert calls == []
    assert 1 <= len(calls) <= 6 and set(calls) == {"shard-writeback"} and max(overlap) == 0, (calls, overlap)
    assert (tmp_path / "early.safetensors").read_bytes() == (tmp_path / "late.safetensors").read_bytes()

    def failing(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", failing)
    w = StreamingShardWriter(tmp_path / "full.safetensors", layout, {}, writeback_bytes=1)
    for k, v in tensors.items():
        w.write(k, v)
    with pytest.raises(OSError, match="No space left"):
        w.close()


def test_existing_output_needs_overwrite_and_dry_run_writes_nothing(handmade, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = [str(handmade["export"]), str(out), "--base-transformer", str(handmade["base"]), "--quiet"]
    assert main(["convert", *args]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["convert", *args, "--dry-run"]) == 0
    assert "plan (dry run" in capsys.readouterr().out and (out / "keep.txt").exists()
    assert main(["convert", *args, "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "quantized weights (FP8)       13" in text and "BF16-fallback weights         7" in text
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fp8c-")] == []
    assert main(["inspect", str(out)]) == 0
