"""Wan2.2: both variants, T2V-A14B (two experts) and TI2V-5B (one transformer); registered on import."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..fp8.fusion_rule import FusionRule
from ..sglang_names import GENERIC_RULES, RuntimeRule, runtime_names
from .registry import (REDUCED_VOCAB, Family, InputMaker, LayerRule, StandinComponent, StandinParts, TinySettings,
                       register)
from .encoders import T5_XXL
from .tiny import SEED, t5_tokenizer, tiny_transformer

if TYPE_CHECKING:  # torch loads when inputs or models are made, not with the registry
    import torch
    from torch import nn


# --------------------------------------------------------------------------------------------- dummy inputs
def _inputs(spatial: int) -> InputMaker:
    def make(config: dict, *, height: int, width: int, num_frames: int | None = 81, batch: int = 1,
             text_len: int = 512, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             generator: torch.Generator | None = None) -> dict[str, Any]:
        import torch

        dtype = torch.bfloat16 if dtype is None else dtype
        frames = ((num_frames or 1) - 1) // 4 + 1  # the Wan VAE compresses time by 4
        g = generator
        return {
            "hidden_states": torch.randn(batch, config["in_channels"], frames, height // spatial, width // spatial,
                                         generator=g).to(device, dtype),
            "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
            "encoder_hidden_states": torch.randn(batch, text_len, config["text_dim"], generator=g).to(device, dtype),
            "return_dict": False,
        }

    return make


# ------------------------------------------------------------------------------------------- layer policies
def _sensitive(config: dict) -> tuple[LayerRule, ...]:
    """ModelOpt's Wan filter: embeddings, the output projection, and the first and last three blocks."""
    n = int(config["num_layers"])
    edge = sorted({i for i in (0, 1, 2, n - 3, n - 2, n - 1) if 0 <= i < n})
    return (
        LayerRule(r"patch_embedding(\..*)?", "Conv3d patch embedding: not a Linear, never FP8"),
        LayerRule(r"condition_embedder(\..*)?", "time/text conditioning embedders"),
        LayerRule(r"proj_out", "final projection back to latent space"),
        LayerRule(r"blocks\.(%s)\..*" % "|".join(map(str, edge)),
                  "first and last three blocks: FP8 there broke Wan2.2 output"),
    )


# ------------------------------------------------------------------------------------------ tiny pipeline
def _build_tiny(family: Family):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = family.tiny_config
    tok = t5_tokenizer(model_max_length=32)
    torch.manual_seed(SEED)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tok), d_model=cfg["text_dim"], d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu"))
    z = cfg["in_channels"]
    two_experts = "transformer_2" in family.experts
    if two_experts:
        # Wan2.1 VAE (used by A14B): 8x spatial, 4x temporal.
        vae = AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True],
                               latents_mean=[0.0] * z, latents_std=[1.0] * z)
    else:
        # Wan2.2 VAE (TI2V-5B): residual blocks and a 2x2 patchify on top of 8x, so 16x spatial.
        vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                               out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
                               latents_mean=[0.0] * z, latents_std=[1.0] * z)
    # What the diffusers conversion script ships: UniPC on flow sigmas, shift 3 (A14B) or 5 (TI2V-5B).
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=family.flow_shift)
    if two_experts:  # high-noise `transformer`, low-noise `transformer_2`: same config, different weights
        extra = dict(transformer_2=tiny_transformer(family, SEED + 1),
                     boundary_ratio=family.boundary_ratio)
    else:
        extra = dict(expand_timesteps=True)  # TI2V-5B: per-token timesteps
    return WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=tiny_transformer(family, SEED), **extra)


# ------------------------------------------------------------------------------------------- fast path
def _attention_groups(attn: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """Self-attention to_q/to_k/to_v -> to_qkv, cross-attention to_k/to_v -> to_kv (diffusers' own fused path)."""
    groups = [("to_kv", ("to_k", "to_v"))] if attn.is_cross_attention else [("to_qkv", ("to_q", "to_k", "to_v"))]
    if getattr(attn, "add_k_proj", None) is not None:
        groups.append(("to_added_kv", ("add_k_proj", "add_v_proj")))
    return groups


_FUSION = (FusionRule("WanAttention", groups=_attention_groups),)

_WAN_A14B = dict(patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                 text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                 rope_max_seq_len=1024, pos_embed_seq_len=None)
_WAN_TINY = dict(_WAN_A14B, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
                 freq_dim=32, ffn_dim=64, num_layers=7, rope_max_seq_len=32)

# SGLang's runtime names (`WanVideoArchConfig.param_names_mapping`): its Wan block holds the self-attention
# projections directly. `ignore` covers a layer under any of these names (sglang_names.py).
SGLANG_NAMES: tuple[RuntimeRule, ...] = GENERIC_RULES + (
    (r"(blocks\.\d+)\.attn1\.(to_[qkv])", r"\1.\2", "self-attention Q/K/V live on the block"),
    (r"(blocks\.\d+)\.attn1\.to_out\.0", r"\1.to_out", "self-attention output projection"),
    (r"(blocks\.\d+)\.attn2\.to_out\.0", r"\1.attn2.to_out", "cross-attention output projection"),
    (r"(blocks\.\d+)\.ffn\.net\.0\.proj", r"\1.ffn.fc_in", "feed-forward input"),
    (r"(blocks\.\d+)\.ffn\.net\.2", r"\1.ffn.fc_out", "feed-forward output"),
    (r"condition_embedder\.text_embedder\.linear_1", "condition_embedder.text_embedder.fc_in", "text embedder"),
    (r"condition_embedder\.text_embedder\.linear_2", "condition_embedder.text_embedder.fc_out", "text embedder"),
    (r"condition_embedder\.time_embedder\.linear_1", "condition_embedder.time_embedder.mlp.fc_in", "time embedder"),
    (r"condition_embedder\.time_embedder\.linear_2", "condition_embedder.time_embedder.mlp.fc_out", "time embedder"),
    (r"condition_embedder\.time_proj", "condition_embedder.time_modulation.linear", "timestep modulation"),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", "condition_embedder.image_embedder.ff.fc_in",
     "image embedder FF input (I2V)"),
    (r"condition_embedder\.image_embedder\.ff\.net\.2", "condition_embedder.image_embedder.ff.fc_out",
     "image embedder FF output (I2V)"),
)


def sglang_aliases(module_name: str) -> list[str]:
    """The names SGLang's Wan2.2 runtime gives a module besides its diffusers one."""
    return runtime_names(module_name, SGLANG_NAMES)


# ------------------------------------------------------------------ full-size stand-in (standin.py, `Family.standin`)
# text_encoder: Wan-AI/Wan2.2-T2V-A14B-Diffusers (and -TI2V-5B-Diffusers) text_encoder/config.json (umt5-xxl).
_UMT5_XXL = dict(T5_XXL, vocab_size=256384)
# vae: Wan-AI/Wan2.2-T2V-A14B-Diffusers vae/config.json (the Wan2.1 VAE; diffusers' AutoencoderKLWan defaults).
_WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0,
                  latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                                0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
                  latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                               1.5579, 1.6382, 1.1253, 2.8251, 1.916])
# vae: Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json (the Wan2.2 VAE: 16x spatial, 2x2 patchify, residual).
_WAN22_VAE = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0, is_residual=True, in_channels=12, out_channels=12,
    patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
    latents_mean=[-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
                  0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
                  -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
                  -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667],
    latents_std=[0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                 0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744])
# scheduler: Wan-AI/Wan2.2-T2V-A14B-Diffusers scheduler/scheduler_config.json (TI2V-5B: flow_shift 5.0).
_WAN_SCHEDULER = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                      solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                      final_sigmas_type="zero", timestep_spacing="linspace", beta_start=0.0001, beta_end=0.02,
                      beta_schedule="linear")


def _standin(family: Family, full: bool, tf: dict[str, Any]):
    """A stand-in's components besides the transformers: T2V-A14B (two experts, the Wan2.1 VAE) or TI2V-5B (one
    transformer, the Wan2.2 VAE); the umt5 text encoder and the UniPC scheduler."""
    tokenizers = {"tokenizer": lambda: t5_tokenizer(model_max_length=512)}
    tok = {name: make() for name, make in tokenizers.items()}  # their special-token ids go into the encoder
    repo = family.hub_id
    ttok = tok["tokenizer"]
    umt5 = dict(_UMT5_XXL) if full else dict(_UMT5_XXL, vocab_size=REDUCED_VOCAB, d_model=tf["text_dim"], d_kv=16,
                                              d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=8)
    umt5.update(pad_token_id=ttok.pad_token_id, eos_token_id=ttok.eos_token_id)
    two = "transformer_2" in family.experts
    vae = dict(_WAN21_VAE if two else _WAN22_VAE)
    if not full:
        z = tf["in_channels"]
        vae.update(base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * z,
                   latents_std=[1.0] * z)
        if not two:
            vae["decoder_base_dim"] = 8
    others = (StandinComponent("text_encoder", "transformers", "UMT5EncoderModel", umt5, "UMT5Config",
                               f"{repo} text_encoder/config.json"),
              StandinComponent("vae", "diffusers", "AutoencoderKLWan", vae, source=f"{repo} vae/config.json",
                               dtype="float32"))
    scheduler = dict(_WAN_SCHEDULER, flow_shift=3.0 if two else 5.0)
    extra = dict(boundary_ratio=family.boundary_ratio) if two else dict(expand_timesteps=True)
    return StandinParts(others, ("UniPCMultistepScheduler", scheduler), tokenizers, extra)


register(Family(
    name="wan22-a14b",
    title="Wan2.2 T2V-A14B",
    class_name="WanTransformer3DModel",
    pipeline_class="WanPipeline",
    hub_id="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    full_config=_WAN_A14B,
    tiny_config=_WAN_TINY,
    bf16_fallback=(),  # spec section 4: ModelOpt's Wan filter already keeps the sensitive layers BF16
    sensitive=_sensitive,
    make_inputs=_inputs(spatial=8),
    build_tiny_pipeline=_build_tiny,
    standin=_standin,
    # 4 tiny steps whose timesteps fall on both sides of the boundary (UniPC, shift 3: timesteps 999, 900 >= 875
    # go to `transformer`; 750, 500 to `transformer_2`).
    tiny_settings=TinySettings(height=64, width=64, num_frames=5, num_inference_steps=4, guidance_scale=4.0),
    experts=("transformer", "transformer_2"),
    boundary_ratio=0.875,
    height=480, width=832, num_frames=81, num_steps=40, guidance_scale=4.0,
    forwards_per_step=2,
    flow_shift=3.0,
    sglang_aliases=sglang_aliases,
    sglang_extra_flags=("--num-gpus 4", "--ulysses-degree 4"),
    sglang_memory_flags=("--text-encoder-cpu-offload true",),  # UMT5-XXL beside two 14B experts
    fusion_rules=_FUSION,
), "wan22", "wan")

register(Family(
    name="wan22-ti2v-5b",
    title="Wan2.2 TI2V-5B",
    class_name="WanTransformer3DModel",
    pipeline_class="WanPipeline",
    hub_id="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    full_config=dict(_WAN_A14B, num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30),
    tiny_config=dict(_WAN_TINY, in_channels=12, out_channels=12),
    bf16_fallback=(),
    sensitive=_sensitive,
    make_inputs=_inputs(spatial=16),
    build_tiny_pipeline=_build_tiny,
    standin=_standin,
    tiny_settings=TinySettings(height=64, width=64, num_frames=5, num_inference_steps=3, guidance_scale=5.0),
    height=704, width=1280, num_frames=121, num_steps=50, guidance_scale=5.0,
    size_multiple=32,  # the Wan2.2 VAE's 16x spatial compression, then the 2x2 patch
    forwards_per_step=2,
    flow_shift=5.0,
    sglang_aliases=sglang_aliases,
    serve_notes=("TI2V-5B FP8 is not in SGLang's validated ModelOpt matrix (FLUX.1, FLUX.2, Wan2.2-T2V-A14B): check "
                 "the served output against this notebook's comparison",),
    fusion_rules=_FUSION,
))
