"""Loader: builds the real class, FP8 layers where `ignore` says, both config forms, 0-d and [1] scales, offload off."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8cookbook.convert import convert_checkpoint
from fp8cookbook.families import get_family
from fp8cookbook.fp8.linear import FP8Linear, count_fp8_calls
from fp8cookbook.loader import load_fp8_transformer


@pytest.fixture
def converted(handmade, tmp_path):
    out = tmp_path / "fp8"
    convert_checkpoint(handmade["export"], out, base_transformer=handmade["base"], progress=False)
    return out


def _forward(model):
    fam = get_family("flux1")
    inputs = fam.make_inputs(dict(model.config), height=64, width=64, text_len=8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(**inputs)[0]


def test_load_builds_fp8_layers_and_they_run(converted):
    model, report = load_fp8_transformer(converted)
    assert type(model).__name__ == "FluxTransformer2DModel"
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert report.fp8_layers == len(fp8) == 13
    assert "transformer_blocks.0.ff.net.0.proj" not in fp8 and "single_transformer_blocks.0.attn.to_q" in fp8
    assert model.get_submodule("single_transformer_blocks.0.attn.to_q").weight.dtype == torch.float8_e4m3fn
    with count_fp8_calls(model) as calls:
        out = _forward(model)
    assert set(calls) == fp8, f"FP8 layers that did not run: {fp8 - set(calls)}"
    assert torch.isfinite(out).all()


def test_nested_config_and_0d_scales_load_the_same(converted):
    ref = _forward(load_fp8_transformer(converted)[0])
    cfg = json.loads((converted / "config.json").read_text())
    flat = cfg.pop("quantization_config")
    cfg["quantization_config"] = {"producer": flat["producer"],
                                  "quantization": {"quant_algo": "FP8", "exclude_modules": flat["ignore"]}}
    (converted / "config.json").write_text(json.dumps(cfg))
    shard = next(converted.glob("*.safetensors"))
    sd = load_file(shard)
    for k in [k for k in sd if k.endswith("_scale")]:
        sd[k] = sd[k].reshape(())
    save_file(sd, shard)
    model, report = load_fp8_transformer(converted)
    assert report.fp8_layers == 13
    torch.testing.assert_close(_forward(model), ref, atol=0, rtol=0)


def test_dit_offload_is_refused_with_a_reason(converted):
    with pytest.warns(UserWarning, match="DiT CPU offload disabled.*column-major") as record:
        model, report = load_fp8_transformer(converted, dit_cpu_offload=True, dit_layerwise_offload=True)
    assert report.offload_disabled == ["DiT CPU offload", "DiT layer-wise offload"]
    assert any("layer-wise" in str(w.message) for w in record)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_unknown_tensor_is_refused(converted):
    shard = next(converted.glob("*.safetensors"))
    sd = load_file(shard)
    sd["not_a_module.weight"] = torch.zeros(4, dtype=torch.bfloat16)
    save_file(sd, shard)
    idx = next(converted.glob("*.index.json"))
    index = json.loads(idx.read_text())
    index["weight_map"]["not_a_module.weight"] = shard.name
    idx.write_text(json.dumps(index))
    from fp8cookbook.errors import Fp8CookbookError

    with pytest.raises(Fp8CookbookError, match="not_a_module.weight"):
        load_fp8_transformer(converted)
