"""FLUX.2-dev: everything the library knows about it (registered in families/__init__.py on import)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from ..fp8.fusion_rule import FusionRule
from .registry import REDUCED_VOCAB, Family, LayerRule, StandinComponent, StandinParts, TinySettings, register
from .tiny import SEED, flux_vae, mistral_tokenizer, tiny_transformer
from .flux1 import FLUX1_SCHEDULER, flux_attention_groups, flux_ids, flux_sensitive

if TYPE_CHECKING:  # torch loads when inputs or models are made, not with the registry
    import torch


# --------------------------------------------------------------------------------------------- dummy inputs
def _inputs(config: dict, *, height: int, width: int, num_frames: int | None = None, batch: int = 1,
                  text_len: int = 512, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  generator: torch.Generator | None = None) -> dict[str, Any]:
    import torch

    dtype = torch.bfloat16 if dtype is None else dtype
    h, w = height // 16, width // 16
    axes = len(config["axes_dims_rope"])
    img_ids, txt_ids = flux_ids(h, w, text_len, axes, torch.device(device))
    g = generator
    out = {
        "hidden_states": torch.randn(batch, h * w, config["in_channels"], generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(batch, text_len, config["joint_attention_dim"], generator=g).to(device, dtype),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "img_ids": img_ids.unsqueeze(0).expand(batch, -1, -1),
        "txt_ids": txt_ids.unsqueeze(0).expand(batch, -1, -1),
        "return_dict": False,
    }
    if config.get("guidance_embeds"):
        out["guidance"] = torch.full((batch,), 4.0, device=device, dtype=dtype)
    return out


# ------------------------------------------------------------------------------------------- layer policies
FLUX2_FALLBACK = (
    LayerRule(r"time_guidance_embed\.(timestep|guidance)_embedder\.linear_[12]", "conditioning embedders"),
    LayerRule(r"double_stream_modulation_(img|txt)\.linear", "modulation shared by every double block"),
    LayerRule(r"single_stream_modulation\.linear", "modulation shared by every single block"),
    LayerRule(r"x_embedder", "latent-token input projection"),
    LayerRule(r"context_embedder", "text-token input projection (K=15360 text features)"),
    LayerRule(r"norm_out\.linear", "final AdaLN modulation"),
)


# ------------------------------------------------------------------------------------------ tiny pipeline
def _build_tiny(family: Family):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    cfg = family.tiny_config
    tok = mistral_tokenizer(model_max_length=256)
    layers = 3  # Flux2Pipeline stacks hidden states (10, 20, 30): joint_attention_dim = 3 * hidden_size
    hidden = cfg["joint_attention_dim"] // layers
    torch.manual_seed(SEED)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tok), hidden_size=hidden, intermediate_size=32,
                         num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                         max_position_embeddings=1024, rope_theta=1e9, sliding_window=None,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, patch_size=4, image_size=32),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2))
    vae = flux_vae(AutoencoderKLFlux2, cfg["in_channels"] // 4)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096, time_shift_type="exponential")
    return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                         transformer=tiny_transformer(family, SEED))


# ------------------------------------------------------------------ full-size stand-in (standin.py, `Family.standin`)
# text_encoder: black-forest-labs/FLUX.2-dev text_encoder/config.json (Mistral-Small-3.1-24B-Instruct-2503,
# with its language-model head: 24.0 B parameters).
_MISTRAL_SMALL = dict(
    text_config=dict(model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768,
                     num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=1e9,
                     sliding_window=None, attention_dropout=0.0, tie_word_embeddings=False),
    vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, head_dim=64, num_channels=3, patch_size=14, image_size=1540,
                       hidden_act="silu", rope_theta=10000.0, attention_dropout=0.0),
    projector_hidden_act="gelu", multimodal_projector_bias=False, spatial_merge_size=2, vision_feature_layer=-1,
    tie_word_embeddings=False)
# vae: black-forest-labs/FLUX.2-dev vae/config.json (AutoencoderKLFlux2; diffusers' defaults are this config).
_FLUX2_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                  act_fn="silu", latent_channels=32, norm_num_groups=32, sample_size=1024, use_quant_conv=True,
                  use_post_quant_conv=True, mid_block_add_attention=True, batch_norm_eps=1e-4,
                  batch_norm_momentum=0.1, patch_size=[2, 2])
# scheduler: black-forest-labs/FLUX.2-dev scheduler/scheduler_config.json.
_FLUX2_SCHEDULER = dict(FLUX1_SCHEDULER, time_shift_type="exponential")


def _standin(family: Family, full: bool, tf: dict[str, Any]):
    """A stand-in's components besides the transformer: the Mistral-Small text encoder, the VAE, the scheduler."""
    tokenizers = {"tokenizer": lambda: mistral_tokenizer(model_max_length=512)}
    tok = {name: make() for name, make in tokenizers.items()}  # their special-token ids go into the encoder
    repo = family.hub_id
    mtok = tok["tokenizer"]
    mistral = copy.deepcopy(_MISTRAL_SMALL)
    if not full:  # 30 layers: Flux2Pipeline reads hidden states 10, 20 and 30
        hidden = tf["joint_attention_dim"] // 3
        mistral["text_config"].update(vocab_size=REDUCED_VOCAB, hidden_size=hidden, intermediate_size=32,
                                      num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=hidden // 2, max_position_embeddings=1024)
        mistral["vision_config"].update(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, head_dim=8, patch_size=4, image_size=32)
    mistral["text_config"].update(bos_token_id=mtok.bos_token_id, eos_token_id=mtok.eos_token_id,
                                  pad_token_id=mtok.pad_token_id)
    mistral["image_token_index"] = mtok.convert_tokens_to_ids("[IMG]")
    vae = dict(_FLUX2_VAE) if full else dict(_FLUX2_VAE, block_out_channels=[16] * 4, layers_per_block=1,
                                                    norm_num_groups=8, latent_channels=tf["in_channels"] // 4,
                                                    sample_size=64)
    others = (StandinComponent("text_encoder", "transformers", "Mistral3ForConditionalGeneration", mistral,
                               "Mistral3Config", f"{repo} text_encoder/config.json"),
              StandinComponent("vae", "diffusers", "AutoencoderKLFlux2", vae, source=f"{repo} vae/config.json"))
    return StandinParts(others, ("FlowMatchEulerDiscreteScheduler", _FLUX2_SCHEDULER), tokenizers)


register(Family(
    name="flux2",
    title="FLUX.2-dev",
    class_name="Flux2Transformer2DModel",
    pipeline_class="Flux2Pipeline",
    hub_id="black-forest-labs/FLUX.2-dev",
    full_config=dict(patch_size=1, in_channels=128, out_channels=None, num_layers=8, num_single_layers=48,
                     attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360,
                     timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=[32, 32, 32, 32],
                     rope_theta=2000, eps=1e-6, guidance_embeds=True),
    tiny_config=dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,  # 3 x tiny Mistral width
                     timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=[4, 4, 4, 4],
                     rope_theta=2000, eps=1e-6, guidance_embeds=True),
    bf16_fallback=FLUX2_FALLBACK,
    sensitive=flux_sensitive,
    make_inputs=_inputs,
    build_tiny_pipeline=_build_tiny,
    standin=_standin,
    tiny_settings=TinySettings(height=64, width=64, num_frames=None, num_inference_steps=3, guidance_scale=4.0),
    num_steps=50,
    guidance_scale=4.0,
    sglang_memory_flags=("--text-encoder-cpu-offload true", "--vae-cpu-offload true"),  # 24B Mistral text encoder
    # The single blocks ship their Q/K/V/MLP-in projection fused already.
    fusion_rules=(FusionRule("Flux2Attention", groups=flux_attention_groups),),
), "flux.2")
