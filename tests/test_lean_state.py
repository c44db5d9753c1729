"""The ModelOpt state file without a copy of the BF16 weights where the export holds FP8 ones (issue 11: disk)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8cookbook import quantize as q
from fp8cookbook.checkpoint import inspect_checkpoint
from fp8cookbook.convert import load_amax_table
from fp8cookbook.errors import Fp8CookbookError
from fp8cookbook.families import build_transformer, get_family
from fp8cookbook.pipelines import build_tiny_pipeline


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _calibrated(family_name: str = "flux1"):
    family = get_family(family_name)
    model = build_transformer(family, "tiny")
    batches = q.tiny_calibration_inputs(family)
    return q.quantize_transformer(model, family, lambda m: [m(**b) for b in batches]), batches


def test_lean_state_restores_the_same_fake_quant_model(tmp_path):
    build_transformer(get_family("flux1"), "tiny").save_pretrained(tmp_path / "base")
    model, batches = _calibrated()
    q.save_modelopt_state(model, tmp_path / "full.pt", weights=True)
    q.save_modelopt_state(model, tmp_path / "lean.pt", weights=False)
    lean = _state(tmp_path / "lean.pt")
    assert lean[q.LEAN_STATE_KEY] is True
    assert lean["model_state_dict"] and all("_quantizer." in k for k in lean["model_state_dict"])
    assert load_amax_table(tmp_path / "lean.pt") == load_amax_table(tmp_path / "full.pt")  # what convert reads
    weights = sum(v.numel() * v.element_size() for k, v in _state(tmp_path / "full.pt")["model_state_dict"].items()
                  if "_quantizer." not in k)
    assert (tmp_path / "lean.pt").stat().st_size < (tmp_path / "full.pt").stat().st_size - 0.95 * weights
    with torch.no_grad():
        want = q.load_fake_quant(tmp_path / "base", tmp_path / "full.pt")(**batches[0])[0]
        got = q.load_fake_quant(tmp_path / "base", tmp_path / "lean.pt")(**batches[0])[0]
        assert torch.equal(got, want) and torch.equal(got, model(**batches[0])[0])


def test_lean_state_with_a_base_that_lacks_weights_is_one_line(tmp_path):
    base = tmp_path / "base"
    build_transformer(get_family("flux1"), "tiny").save_pretrained(base)
    shard = base / "diffusion_pytorch_model.safetensors"
    tensors = load_file(shard)
    tensors.pop("proj_out.weight")
    save_file(tensors, shard)
    model, _ = _calibrated()
    q.save_modelopt_state(model, tmp_path / "lean.pt", weights=False)
    with pytest.raises(Fp8CookbookError, match=r"base: lacks proj_out.weight .*holds no weights"):
        q.load_fake_quant(base, tmp_path / "lean.pt")


def test_quantize_pipeline_writes_the_lean_state(tmp_path):
    pipe = build_tiny_pipeline("wan22-a14b")
    result = q.quantize_pipeline("wan22-a14b", pipe, tmp_path / "out", num_prompts=1, progress=False)
    for name, paths in result.paths.items():
        state = _state(paths["state"])
        assert state[q.LEAN_STATE_KEY] is True and all("_quantizer." in k for k in state["model_state_dict"])
        base_bytes = sum(p.stat().st_size for p in paths["base"].glob("*.safetensors"))
        assert paths["state"].stat().st_size < base_bytes  # tiny: ModelOpt's own state is most of it
        assert not inspect_checkpoint(paths["fp8"]).problems
        with torch.no_grad():  # the fake-quant reference still comes back, from base + lean state
            q.load_fake_quant(paths["base"], paths["state"])


def test_bf16_flavour_export_keeps_the_full_state(tmp_path, monkeypatch):
    """An export without FP8 weights (what offloaded calibration leaves) keeps the weights in the state file."""

    def bf16_export(model, export_dir, dtype=torch.bfloat16, **kwargs):
        ignore = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                        and not getattr(getattr(m, "weight_quantizer", None), "is_enabled", False))
        plain = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                 for k, v in model.state_dict().items() if "_quantizer." not in k}
        export_dir.mkdir(parents=True)
        save_file(plain, export_dir / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        config = dict(model.config, _class_name=type(model).__name__)
        config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ignore,
                                         "producer": {"name": "modelopt", "version": "test"}}
        (export_dir / "config.json").write_text(json.dumps(config, default=list))
        return export_dir

    monkeypatch.setattr(q.pipeline, "export_transformer", bf16_export)
    pipe = build_tiny_pipeline("flux1")
    result = q.quantize_pipeline("flux1", pipe, tmp_path / "out", num_prompts=1, progress=False)
    paths = result.paths["transformer"]
    assert not q.export_has_fp8_weights(paths["export"])
    state = _state(paths["state"])
    assert q.LEAN_STATE_KEY not in state and "proj_out.weight" in state["model_state_dict"]
    assert result.convert_stats["transformer"].quantized_from_state_file > 0  # the amaxes came from the state
    assert not inspect_checkpoint(paths["fp8"]).problems


def test_tiny_export_flavours():
    """make_tiny_export follows the same rule: lean for the FP8 export, full for the BF16 flavour."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        fp8 = q.make_tiny_export("flux1", Path(d) / "a")
        bf16 = q.make_tiny_export("flux1", Path(d) / "b", bf16_export=True)
        assert _state(fp8["state"]).get(q.LEAN_STATE_KEY) is True
        assert q.LEAN_STATE_KEY not in _state(bf16["state"])
