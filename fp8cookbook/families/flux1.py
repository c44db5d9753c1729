"""FLUX.1-dev: everything the library knows about it (registered in families/__init__.py on import).

Also home of what FLUX.2 shares with it: the position ids, ModelOpt's FLUX filter, the joint-attention fusion groups.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

from ..fp8.fusion_rule import FusionRule
from ..sglang_names import GENERIC_RULES, RuntimeRule, runtime_names
from .registry import REDUCED_VOCAB, Family, LayerRule, StandinComponent, StandinParts, TinySettings, register
from .encoders import T5_XXL
from .tiny import SEED, clip_tokenizer, flux_vae, t5_tokenizer, tiny_transformer

if TYPE_CHECKING:  # torch loads when inputs or models are made, not with the registry
    import torch
    from torch import nn


# --------------------------------------------------------------------------------------------- dummy inputs
def flux_ids(height: int, width: int, text_len: int, axes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids as the pipelines build them: (row, col) in the last two axes, zeros elsewhere."""
    import torch

    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    img = torch.zeros(height * width, axes)
    img[:, -2] = rows.flatten()
    img[:, -1] = cols.flatten()
    txt = torch.zeros(text_len, axes)
    return img.to(device), txt.to(device)


def _inputs(config: dict, *, height: int, width: int, num_frames: int | None = None, batch: int = 1,
                  text_len: int = 512, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  generator: torch.Generator | None = None) -> dict[str, Any]:
    import torch

    dtype = torch.bfloat16 if dtype is None else dtype
    h, w = height // 16, width // 16  # VAE /8, then 2x2 packing
    img_ids, txt_ids = flux_ids(h, w, text_len, 3, torch.device(device))
    g = generator
    out = {
        "hidden_states": torch.randn(batch, h * w, config["in_channels"], generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(batch, text_len, config["joint_attention_dim"], generator=g).to(device, dtype),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], generator=g).to(device, dtype),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "img_ids": img_ids.to(dtype),
        "txt_ids": txt_ids.to(dtype),
        "return_dict": False,
    }
    if config.get("guidance_embeds"):
        out["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return out


# ------------------------------------------------------------------------------------------- layer policies
# ModelOpt's diffusers example keeps these FLUX layers out of quantization (filter_func_flux_dev).
MODELOPT_FLUX_FILTER = (
    LayerRule(r"proj_out", "final projection back to latent space: small, error goes straight to the output"),
    LayerRule(r"time_text_embed(\..*)?", "timestep/text conditioning embedders: tiny and precision-critical"),
    LayerRule(r"time_guidance_embed(\..*)?", "timestep/guidance conditioning embedders (FLUX.2)"),
    LayerRule(r"context_embedder(\..*)?", "text-token input projection"),
    LayerRule(r"x_embedder(\..*)?", "latent-token input projection"),
    LayerRule(r"norm_out(\..*)?", "final AdaLN modulation"),
    LayerRule(r".*stream_modulation(\..*)?", "FLUX.2 shared modulation linears: their output scales every block"),
)

FLUX1_FALLBACK = (
    LayerRule(r"transformer_blocks\.\d+\.norm1\.linear", "AdaLN modulation of the image stream: BF16 in SGLang's validated profile"),
    LayerRule(r"transformer_blocks\.\d+\.norm1_context\.linear", "AdaLN modulation of the text stream"),
    LayerRule(r"transformer_blocks\.\d+\.ff\.net\.0\.proj", "image feed-forward in: FP8 here hurt FLUX.1 quality"),
    LayerRule(r"transformer_blocks\.\d+\.ff\.net\.2", "image feed-forward out"),
    LayerRule(r"transformer_blocks\.\d+\.ff_context\.net\.0\.proj", "text feed-forward in"),
    LayerRule(r"transformer_blocks\.\d+\.ff_context\.net\.2", "text feed-forward out"),
    LayerRule(r"single_transformer_blocks\.\d+\.norm\.linear", "AdaLN modulation of single blocks"),
)


def flux_sensitive(config: dict) -> tuple[LayerRule, ...]:
    return MODELOPT_FLUX_FILTER


# SGLang's runtime names (sglang_names.py): its converter writes `ff.proj_in`/`ff.proj_out` for the image
# feed-forward; the text-stream FF is listed under both names too (spec section 4), whichever name a runtime uses.
SGLANG_NAMES: tuple[RuntimeRule, ...] = GENERIC_RULES + (
    (r"(transformer_blocks\.\d+\.ff_context)\.net\.0\.proj", r"\1.proj_in", "text-stream FF input, runtime name"),
    (r"(transformer_blocks\.\d+\.ff_context)\.net\.2", r"\1.proj_out", "text-stream FF output, runtime name"),
)


def sglang_aliases(module_name: str) -> list[str]:
    """The names SGLang may give a FLUX.1 module besides its diffusers one; the converter lists both in `ignore`."""
    return runtime_names(module_name, SGLANG_NAMES)


# ------------------------------------------------------------------------------------------ tiny pipeline
def _build_tiny(family: Family):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cfg = family.tiny_config
    clip_tok = clip_tokenizer()
    t5_tok = t5_tokenizer(model_max_length=32)
    torch.manual_seed(SEED)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=cfg["pooled_projection_dim"], intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=clip_tok.model_max_length, hidden_act="quick_gelu",
        projection_dim=cfg["pooled_projection_dim"], bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=cfg["joint_attention_dim"], d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    # FLUX.1's VAE: no quant convs, and its latent scaling and shift.
    vae = flux_vae(AutoencoderKL, cfg["in_channels"] // 4, scaling_factor=0.3611, shift_factor=0.1159,
                    use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=tiny_transformer(family, SEED))


# ------------------------------------------------------------------------------------------- fast path
def flux_attention_groups(attn: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """Joint attention: to_q/to_k/to_v -> to_qkv and add_q/k/v_proj -> to_added_qkv (diffusers' own fused path)."""
    groups = [("to_qkv", ("to_q", "to_k", "to_v"))]
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        groups.append(("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))
    return groups


def _flux1_single_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                                joint_attention_kwargs=None):
    """FluxSingleTransformerBlock.forward (diffusers 0.42) with Q, K, V and the MLP input as one FP8 GEMM."""
    import torch
    from diffusers.models.embeddings import apply_rotary_emb

    from ..fp8.attention_diffusers import fp8_dispatch_attention_fn as dispatch_attention_fn  # diffusers' own, + FP8

    if joint_attention_kwargs:
        raise NotImplementedError("fused FLUX.1 single block: joint_attention_kwargs (IP-Adapter) are not supported; "
                                  "use the plain path (FP8COOKBOOK_PLAIN=1)")
    attn = self.attn
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    qkv_mlp = self.to_qkv_mlp(norm_hidden_states)
    query, key, value, mlp = qkv_mlp.split([attn.inner_dim] * 3 + [self.mlp_hidden_dim], dim=-1)
    mlp_hidden_states = self.act_mlp(mlp)

    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    attn_output = dispatch_attention_fn(query, key, value, attn_mask=None, backend=attn.processor._attention_backend,
                                        parallel_config=attn.processor._parallel_config)
    attn_output = attn_output.flatten(2, 3).to(query.dtype)

    hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
    gate = gate.unsqueeze(1)
    hidden_states = gate * self.proj_out(hidden_states)
    hidden_states = residual + hidden_states
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    encoder_hidden_states, hidden_states = hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    return encoder_hidden_states, hidden_states


def _fuse_flux1_single_block(block: nn.Module) -> list[str]:
    """to_q/to_k/to_v/proj_mlp -> to_qkv_mlp, with a forward that splits it (FLUX.2 ships that one fused already)."""
    from ..fp8.attention_diffusers import bind_diffusers_dispatch
    from ..fp8.fusion import all_fp8, fuse_layers

    attn = block.attn
    layers = [getattr(attn, "to_q", None), getattr(attn, "to_k", None), getattr(attn, "to_v", None),
              getattr(block, "proj_mlp", None)]
    if not all_fp8(layers):
        return []
    block.to_qkv_mlp = fuse_layers(layers)
    for name in ("to_q", "to_k", "to_v"):
        delattr(attn, name)
    del block.proj_mlp
    bind_diffusers_dispatch()  # the fused forward calls fp8cookbook's dispatch
    block.forward = types.MethodType(_flux1_single_block_forward, block)
    return ["to_qkv_mlp"]


# ------------------------------------------------------------------ full-size stand-in (standin.py, `Family.standin`)
# FLUX.1-dev. text_encoder: black-forest-labs/FLUX.1-dev text_encoder/config.json (CLIP ViT-L/14 text tower).
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
               attention_dropout=0.0, initializer_factor=1.0)
# vae: black-forest-labs/FLUX.1-dev vae/config.json.
_FLUX1_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                  act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
                  shift_factor=0.1159, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
                  mid_block_add_attention=True)
# scheduler: black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json.
FLUX1_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                       max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def _standin(family: Family, full: bool, tf: dict[str, Any]):
    """A stand-in's components besides the transformer: CLIP-L and T5-XXL text encoders, the VAE, the scheduler."""
    tokenizers = {"tokenizer": clip_tokenizer, "tokenizer_2": lambda: t5_tokenizer(model_max_length=512)}
    tok = {name: make() for name, make in tokenizers.items()}  # their special-token ids go into the encoders
    repo = family.hub_id
    clip_tok, t5_tok = tok["tokenizer"], tok["tokenizer_2"]
    clip = dict(_CLIP_L) if full else dict(_CLIP_L, vocab_size=REDUCED_VOCAB, hidden_size=tf["pooled_projection_dim"],
                                           intermediate_size=64, projection_dim=tf["pooled_projection_dim"],
                                           num_hidden_layers=2, num_attention_heads=2)
    # Token ids of the offline tokenizer (the real config's eos id 2 would select CLIP's legacy pooling rule).
    clip.update(bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id)
    t5 = dict(T5_XXL) if full else dict(T5_XXL, vocab_size=REDUCED_VOCAB, d_model=tf["joint_attention_dim"],
                                        d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                        relative_attention_num_buckets=8)
    t5.update(pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id)
    vae = dict(_FLUX1_VAE) if full else dict(_FLUX1_VAE, block_out_channels=[16] * 4, layers_per_block=1,
                                                    norm_num_groups=8, latent_channels=tf["in_channels"] // 4,
                                                    sample_size=64)
    others = (StandinComponent("text_encoder", "transformers", "CLIPTextModel", clip, "CLIPTextConfig",
                               f"{repo} text_encoder/config.json"),
              StandinComponent("text_encoder_2", "transformers", "T5EncoderModel", t5, "T5Config",
                               f"{repo} text_encoder_2/config.json"),
              StandinComponent("vae", "diffusers", "AutoencoderKL", vae, source=f"{repo} vae/config.json"))
    return StandinParts(others, ("FlowMatchEulerDiscreteScheduler", FLUX1_SCHEDULER), tokenizers)


register(Family(
    name="flux1",
    title="FLUX.1-dev",
    class_name="FluxTransformer2DModel",
    pipeline_class="FluxPipeline",
    hub_id="black-forest-labs/FLUX.1-dev",
    full_config=dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                     attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                     pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56]),
    tiny_config=dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                     pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 6, 6]),
    bf16_fallback=FLUX1_FALLBACK,
    sensitive=flux_sensitive,
    make_inputs=_inputs,
    build_tiny_pipeline=_build_tiny,
    standin=_standin,
    tiny_settings=TinySettings(height=64, width=64, num_frames=None, num_inference_steps=3, guidance_scale=3.5),
    num_steps=28,
    guidance_scale=3.5,
    sglang_aliases=sglang_aliases,
    fusion_rules=(FusionRule("FluxSingleTransformerBlock", fuse_block=_fuse_flux1_single_block),
                  FusionRule("FluxAttention", groups=flux_attention_groups)),
), "flux", "flux.1")

