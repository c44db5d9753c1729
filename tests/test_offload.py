"""Offload with FP8 transformers: DiT offload is turned off (with the reason), text-encoder offload stays, FP8 runs."""

from __future__ import annotations

import pytest
import torch

from fp8cookbook.fp8.linear import FP8Linear, count_fp8_calls
from fp8cookbook.offload import has_offload_hooks, place_pipeline
from fp8cookbook.pipelines import default_tiny_settings, generation_kwargs, load_pipeline


@pytest.fixture
def fp8_pipe():
    pipe = load_pipeline("flux1", dtype=torch.float32)
    name = "single_transformer_blocks.0.attn.to_q"
    parent, _, child = name.rpartition(".")
    linear = pipe.transformer.get_submodule(name)
    setattr(pipe.transformer.get_submodule(parent), child, FP8Linear.quantize(linear, 8.0))
    return pipe


def test_dit_offload_is_refused_and_fp8_layers_run(fp8_pipe):
    from accelerate import cpu_offload_with_hook

    cpu_offload_with_hook(fp8_pipe.transformer, "cpu")  # as if the user had enabled DiT offload already
    assert has_offload_hooks(fp8_pipe.transformer)
    with pytest.warns(UserWarning, match="DiT CPU offload disabled.*column-major"):
        off = place_pipeline(fp8_pipe, "cpu", dit_cpu_offload=True, dit_layerwise_offload=True, text_encoder_cpu_offload=True)
    assert off == ["DiT CPU offload (transformer)", "DiT layer-wise offload (transformer)", "offload hooks already on transformer"]
    assert not has_offload_hooks(fp8_pipe.transformer)
    assert has_offload_hooks(fp8_pipe.text_encoder) and has_offload_hooks(fp8_pipe.text_encoder_2)
    assert not has_offload_hooks(fp8_pipe.vae)
    kwargs = generation_kwargs("flux1", fp8_pipe, seed=0, output_type="latent", **default_tiny_settings("flux1"))
    with count_fp8_calls(fp8_pipe.transformer) as calls:
        fp8_pipe(**kwargs)
    assert calls == {"single_transformer_blocks.0.attn.to_q": default_tiny_settings("flux1")["num_inference_steps"]}


def test_bf16_pipeline_keeps_dit_offload():
    pipe = load_pipeline("flux1", dtype=torch.float32)
    assert place_pipeline(pipe, "cpu", dit_cpu_offload=True) == []
    assert has_offload_hooks(pipe.transformer)
