"""Full-size stand-ins for a download: a family's real pipeline configs with seeded random weights.

Why: time, GPU memory, host memory and disk of every stage depend on the shapes, not on the values, so a folder of
the real configs with random weights tests a GPU, a disk and a setup before a 60 GB download, and lets the project
measure the real job without the real weights. `write_standin` writes a complete diffusers pipeline folder (every
component's config and weights, tokenizers built offline, scheduler, `model_index.json`) that `load_pipeline` and
`model_path` take exactly like a download; `build_standin_pipeline` builds the same pipeline in memory (for the
models whose folder plus outputs do not fit a disk).

Sizes come from the configs on the meta device (nothing allocated), so the size table is printed before anything
is written. Weights are streamed: each tensor is drawn in fixed 64 MiB slices, each slice from its own generator
seeded by (seed, component, tensor, slice), so the values do not depend on thread count or order, and a folder is
never more than a few slices in memory. Safetensors shards are written tensor by tensor into a staging folder
beside the target, renamed into place only when everything is written.

Values: matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.02), other vectors N(0, 0.02); buffers (e.g. the FLUX.2
VAE's batch-norm statistics) keep the values the class initialises them with. Stored in BF16, like the real
checkpoints.

Deviations from the real folders, none of which changes a tensor shape: tokenizers are the offline ones of the
tiny pipelines (small vocabularies inside the real embedding sizes), so the text encoders' special-token ids are
set to that tokenizer's; FLUX.2's `tokenizer` is the `PixtralProcessor`'s inner tokenizer (see pipelines.py).

`size="reduced"` keeps the classes and config keys with small widths and few layers, for CPU tests of this very
code path (every component, sharding, index files, loading).
"""

from __future__ import annotations

import hashlib
import copy
import json
import math
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .checkpoint import StreamingShardWriter
from .errors import Fp8CookbookError
from .families import Family, get_family
from .files import OWNER_NAME, staged_dir

SIZES = ("full", "reduced")
SLICE_BYTES = 64 * 2**20  # fixed: the values depend on it (one generator per slice)
SHARD_BYTES = 5 * 10**9  # what `save_pretrained(max_shard_size="5GB")` writes
MARKER = "fp8cookbook_standin.json"
DTYPE = torch.bfloat16
_REDUCED_VOCAB = 1024  # > every offline tokenizer's size

# ---------------------------------------------------------------------------------------------- real configs
# FLUX.1-dev. text_encoder: black-forest-labs/FLUX.1-dev text_encoder/config.json (CLIP ViT-L/14 text tower).
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
               attention_dropout=0.0, initializer_factor=1.0)
# text_encoder_2: black-forest-labs/FLUX.1-dev text_encoder_2/config.json (google/t5-v1_1-xxl encoder).
_T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
               layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
               tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False)
# vae: black-forest-labs/FLUX.1-dev vae/config.json.
_FLUX1_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                  act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
                  shift_factor=0.1159, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
                  mid_block_add_attention=True)
# scheduler: black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json.
_FLUX1_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                        base_image_seq_len=256, max_image_seq_len=4096)

# FLUX.2-dev. text_encoder: black-forest-labs/FLUX.2-dev text_encoder/config.json (Mistral-Small-3.1-24B-Instruct-2503,
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
_FLUX2_SCHEDULER = dict(_FLUX1_SCHEDULER, time_shift_type="exponential")

# Wan2.2. text_encoder: Wan-AI/Wan2.2-T2V-A14B-Diffusers (and -TI2V-5B-Diffusers) text_encoder/config.json (umt5-xxl).
_UMT5_XXL = dict(_T5_XXL, vocab_size=256384)
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
# The transformers' real configs are the registry's `full_config` (families.py cites nothing; they are
# <repo> transformer/config.json of FLUX.1-dev, FLUX.2-dev, Wan2.2-T2V-A14B-Diffusers (also transformer_2/) and
# Wan2.2-TI2V-5B-Diffusers).


# --------------------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Component:
    """One weight-bearing pipeline component: its class and constructor config."""

    name: str  # folder in the pipeline: transformer, text_encoder, vae, ...
    library: str  # "diffusers" or "transformers"
    class_name: str
    config: dict[str, Any]
    config_class: str | None = None  # transformers: the config class the model takes
    source: str = ""  # where the real config comes from
    dtype: torch.dtype = DTYPE  # as the real repo stores it (the Wan VAEs are float32 there)


@dataclass(frozen=True)
class Recipe:
    """Everything `write_standin` writes for one family at one size."""

    family: Family
    size: str
    components: tuple[Component, ...]
    scheduler: tuple[str, dict[str, Any]]
    tokenizers: dict[str, Callable[[], Any]]
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)  # boundary_ratio, expand_timesteps

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)


def _tokenizers(kind: str) -> dict[str, Callable[[], Any]]:
    from .families.tiny import clip_tokenizer, mistral_tokenizer, t5_tokenizer

    return {"FluxPipeline": {"tokenizer": clip_tokenizer, "tokenizer_2": lambda: t5_tokenizer(model_max_length=512)},
            "Flux2Pipeline": {"tokenizer": lambda: mistral_tokenizer(model_max_length=512)},
            "WanPipeline": {"tokenizer": lambda: t5_tokenizer(model_max_length=512)}}[kind]


def _with_layers(family: Family, config: dict[str, Any], layers: int | None) -> dict[str, Any]:
    """The transformer config with `layers` blocks of each kind (FLUX: double and single; Wan: blocks)."""
    config = dict(config)
    if layers is not None:
        for key in ("num_layers", "num_single_layers"):
            if key in config:
                config[key] = layers
    return config


def recipe(family_name: str, size: str = "full", *, layers: int | None = None) -> Recipe:
    """The family's pipeline as classes and configs: real ones (`full`) or small ones of the same classes."""
    family = get_family(family_name)
    if size not in SIZES:
        raise Fp8CookbookError(f"unknown stand-in size {size!r}; use one of {', '.join(SIZES)}")
    if layers is not None and (isinstance(layers, bool) or int(layers) != layers or layers < 1):
        raise Fp8CookbookError(f"layers must be a positive integer, got {layers!r}")
    full = size == "full"
    tf = _with_layers(family, family.full_config if full else family.tiny_config, layers)
    repo = family.hub_id
    transformers = tuple(Component(name, "diffusers", family.class_name, tf, source=f"{repo} {name}/config.json")
                         for name in family.experts)
    if family.pipeline_class not in ("FluxPipeline", "Flux2Pipeline", "WanPipeline"):
        raise Fp8CookbookError(f"no stand-in recipe for {family.title} ({family.pipeline_class})")
    # Keyed by pipeline class (library modules outside families/ name no family): Wan2.2 covers A14B and TI2V-5B.
    tokenizers = _tokenizers(family.pipeline_class)
    tok = {name: make() for name, make in tokenizers.items()}  # their special-token ids go into the encoders

    if family.pipeline_class == "FluxPipeline":
        clip_tok, t5_tok = tok["tokenizer"], tok["tokenizer_2"]
        clip = dict(_CLIP_L) if full else dict(_CLIP_L, vocab_size=_REDUCED_VOCAB, hidden_size=tf["pooled_projection_dim"],
                                                intermediate_size=64, projection_dim=tf["pooled_projection_dim"],
                                                num_hidden_layers=2, num_attention_heads=2)
        # Token ids of the offline tokenizer (the real config's eos id 2 would select CLIP's legacy pooling rule).
        clip.update(bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                    pad_token_id=clip_tok.pad_token_id)
        t5 = dict(_T5_XXL) if full else dict(_T5_XXL, vocab_size=_REDUCED_VOCAB, d_model=tf["joint_attention_dim"],
                                              d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                              relative_attention_num_buckets=8)
        t5.update(pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id)
        vae = dict(_FLUX1_VAE) if full else dict(_FLUX1_VAE, block_out_channels=[16] * 4, layers_per_block=1,
                                                  norm_num_groups=8, latent_channels=tf["in_channels"] // 4,
                                                  sample_size=64)
        others = (Component("text_encoder", "transformers", "CLIPTextModel", clip, "CLIPTextConfig",
                            f"{repo} text_encoder/config.json"),
                  Component("text_encoder_2", "transformers", "T5EncoderModel", t5, "T5Config",
                            f"{repo} text_encoder_2/config.json"),
                  Component("vae", "diffusers", "AutoencoderKL", vae, source=f"{repo} vae/config.json"))
        return Recipe(family, size, transformers + others, ("FlowMatchEulerDiscreteScheduler", _FLUX1_SCHEDULER),
                      tokenizers)

    if family.pipeline_class == "Flux2Pipeline":
        mtok = tok["tokenizer"]
        mistral = copy.deepcopy(_MISTRAL_SMALL)
        if not full:  # 30 layers: Flux2Pipeline reads hidden states 10, 20 and 30
            hidden = tf["joint_attention_dim"] // 3
            mistral["text_config"].update(vocab_size=_REDUCED_VOCAB, hidden_size=hidden, intermediate_size=32,
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
        others = (Component("text_encoder", "transformers", "Mistral3ForConditionalGeneration", mistral,
                            "Mistral3Config", f"{repo} text_encoder/config.json"),
                  Component("vae", "diffusers", "AutoencoderKLFlux2", vae, source=f"{repo} vae/config.json"))
        return Recipe(family, size, transformers + others, ("FlowMatchEulerDiscreteScheduler", _FLUX2_SCHEDULER),
                      tokenizers)

    # Wan2.2: T2V-A14B (two experts, Wan2.1 VAE) or TI2V-5B (one transformer, Wan2.2 VAE)
    ttok = tok["tokenizer"]
    umt5 = dict(_UMT5_XXL) if full else dict(_UMT5_XXL, vocab_size=_REDUCED_VOCAB, d_model=tf["text_dim"], d_kv=16,
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
    others = (Component("text_encoder", "transformers", "UMT5EncoderModel", umt5, "UMT5Config",
                        f"{repo} text_encoder/config.json"),
              Component("vae", "diffusers", "AutoencoderKLWan", vae, source=f"{repo} vae/config.json",
                        dtype=torch.float32))
    scheduler = dict(_WAN_SCHEDULER, flow_shift=3.0 if two else 5.0)
    extra = dict(boundary_ratio=family.boundary_ratio) if two else dict(expand_timesteps=True)
    return Recipe(family, size, transformers + others, ("UniPCMultistepScheduler", scheduler), tokenizers, extra)


# ------------------------------------------------------------------------------------------- meta models
def _meta_model(component: Component) -> nn.Module:
    """The component's model with parameters on the meta device and buffers as the class initialises them."""
    from accelerate import init_empty_weights

    import diffusers
    import transformers

    with init_empty_weights(include_buffers=False):
        if component.library == "diffusers":
            return getattr(diffusers, component.class_name)(**component.config)
        config = getattr(transformers, component.config_class)(**component.config)
        config.dtype = "bfloat16"
        model = getattr(transformers, component.class_name)(config)
    model.tie_weights()  # transformers ties embeddings on load, so a checkpoint holds them once
    return model


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    buffer: torch.Tensor | None = None  # a buffer's own value (written as it is), None for a random parameter

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _keep_fp32(model: nn.Module, name: str) -> bool:
    """The modules `from_pretrained` keeps in float32 whatever dtype is asked for (diffusers' and transformers' rule)."""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    keep += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return any(k in name.split(".") for k in keep)


def tensor_specs(model: nn.Module, dtype: torch.dtype = DTYPE, *, keep_fp32: bool = False) -> list[TensorSpec]:
    """What `save_pretrained` writes: the state dict, tied tensors once (the first name, as transformers keeps), floats
    in `dtype`, and with `keep_fp32` the `_keep_in_fp32_modules` in float32 (diffusers saves a loaded model so: the
    Wan2.2 repos hold their time embedders in float32)."""
    seen: set[int] = set()
    specs = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if not t.is_floating_point():
            dtype_here = t.dtype
        else:
            dtype_here = torch.float32 if keep_fp32 and _keep_fp32(model, name) else dtype
        buffer = None if isinstance(t, nn.Parameter) else t.detach()
        specs.append(TensorSpec(name, tuple(t.shape), dtype_here, buffer))
    return specs


def _specs(component: Component, model: nn.Module) -> list[TensorSpec]:
    return tensor_specs(model, component.dtype, keep_fp32=component.library == "diffusers")


@dataclass
class ComponentSize:
    name: str
    class_name: str
    parameters: int
    nbytes: int
    tensors: int
    source: str

    def as_dict(self) -> dict[str, Any]:
        return dict(name=self.name, class_name=self.class_name, parameters=self.parameters, bytes=self.nbytes,
                    tensors=self.tensors, source=self.source)


def size_table(plan: Recipe, components: list[str] | None = None,
               models: dict[str, nn.Module] | None = None) -> list[ComponentSize]:
    """Per weight component: parameter count and bytes as stored, from the configs on the meta device."""
    out = []
    for c in plan.components:
        if components is not None and c.name not in components:
            continue
        specs = _specs(c, models[c.name] if models else _meta_model(c))
        out.append(ComponentSize(c.name, c.class_name, sum(math.prod(s.shape) for s in specs),
                                 sum(s.nbytes for s in specs), len(specs), c.source))
    return out


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.2f} MB"


def size_lines(plan: Recipe, sizes: list[ComponentSize]) -> list[str]:
    """The size table: one line per component and the total."""
    lines = [f"{plan.family.title} stand-in ({plan.size} size): weights",
             f"  {'component':16s} {'class':34s} {'parameters':>14s} {'size':>10s}"]
    for s in sizes:
        lines.append(f"  {s.name:16s} {s.class_name:34s} {s.parameters:14,d} {_gb(s.nbytes):>10s}")
    total = sum(s.nbytes for s in sizes)
    lines.append(f"  {'total':16s} {'':34s} {sum(s.parameters for s in sizes):14,d} {_gb(total):>10s}")
    return lines


# ------------------------------------------------------------------------------------------------- values
def _slice_seed(seed: int, component: str, tensor: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{component}/{tensor}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _slices(spec: TensorSpec) -> list[tuple[int, int]]:
    """Row ranges of at most SLICE_BYTES each (a 0-d or 1-d tensor is one slice)."""
    if len(spec.shape) < 2:
        return [(0, spec.shape[0] if spec.shape else 1)]
    row_bytes = math.prod(spec.shape[1:]) * spec.dtype.itemsize
    step = max(1, SLICE_BYTES // row_bytes)
    return [(i, min(i + step, spec.shape[0])) for i in range(0, spec.shape[0], step)]


def _draw(spec: TensorSpec, rows: tuple[int, int], seed: int) -> torch.Tensor:
    """One slice of a tensor's values (see the module docstring for the distribution)."""
    lo, hi = rows
    if spec.buffer is not None:
        t = spec.buffer if spec.buffer.dim() == 0 else spec.buffer[lo:hi]
        return t.to(spec.dtype).contiguous()
    shape = (hi - lo, *spec.shape[1:]) if spec.shape else ()
    g = torch.Generator().manual_seed(seed)
    t = torch.empty(shape, dtype=spec.dtype)
    leaf = spec.name.rsplit(".", 1)[-1]
    if "norm" in spec.name and leaf in ("weight", "gamma"):
        return t.normal_(0.0, 0.02, generator=g).add_(1.0)
    if len(spec.shape) >= 2:
        return t.normal_(0.0, 1.0 / math.sqrt(math.prod(spec.shape[1:])), generator=g)
    return t.normal_(0.0, 0.02, generator=g)


def _stream(component: str, specs: list[TensorSpec], seed: int, workers: int
            ) -> Iterator[tuple[TensorSpec, Iterator[torch.Tensor]]]:
    """Each tensor with an iterator over its slices, drawn by `workers` threads a few slices ahead, in order."""
    jobs = [(spec, rows, _slice_seed(seed, component, spec.name, i))
            for spec in specs for i, rows in enumerate(_slices(spec))]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        position = 0

        def fill() -> None:
            nonlocal position
            while position < len(jobs) and len(pending) < 2 * workers:
                spec, rows, s = jobs[position]
                pending.append((spec, pool.submit(_draw, spec, rows, s)))
                position += 1

        def parts(spec: TensorSpec) -> Iterator[torch.Tensor]:
            for _ in _slices(spec):
                fill()
                got, future = pending.popleft()
                assert got is spec
                yield future.result()

        for spec in specs:
            yield spec, parts(spec)


# ------------------------------------------------------------------------------------------------ writing
def _weights_names(library: str) -> tuple[str, str]:
    """(single-file name, shard stem) as `save_pretrained` names them."""
    return (("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model") if library == "diffusers"
            else ("model.safetensors", "model"))


def _shard(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _write_component(component: Component, model: nn.Module, folder: Path, seed: int, workers: int,
                     shard_bytes: int, advance: Callable[[int], None]) -> None:
    folder.mkdir(parents=True)
    if component.library == "diffusers":
        model.save_config(folder)
    else:
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(folder)
    specs = _specs(component, model)
    shards = _shard(specs, shard_bytes)
    single, stem = _weights_names(component.library)
    names = ([single] if len(shards) == 1 else
             [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    stream = _stream(component.name, specs, seed, workers)
    for file_name, shard in zip(names, shards):
        layout = [(s.name, s.dtype, s.shape) for s in shard]
        with StreamingShardWriter(folder / file_name, layout, {"format": "pt"}) as writer:
            for spec in shard:
                got, parts = next(stream)
                writer.write_parts(got.name, parts)
                advance(spec.nbytes)
    stream.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: n for n, shard in zip(names, shards) for s in shard}}
        (folder / f"{single}.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _pipeline_object(plan: Recipe, modules: dict[str, Any]):
    """The diffusers pipeline object for `modules` (models, tokenizers, scheduler; absent components as None)."""
    import diffusers

    cls = getattr(diffusers, plan.family.pipeline_class)
    kwargs = {c.name: modules.get(c.name) for c in plan.components}
    kwargs.update({name: modules[name] for name in plan.tokenizers})
    kwargs["scheduler"] = modules["scheduler"]
    return cls(**kwargs, **plan.pipeline_kwargs)


def _scheduler(plan: Recipe):
    import diffusers

    name, config = plan.scheduler
    return getattr(diffusers, name)(**config)


def _check_components(plan: Recipe, components: list[str] | None) -> list[str]:
    names = [c.name for c in plan.components]
    if components is None:
        return names
    unknown = [c for c in components if c not in names]
    if unknown or not components:
        raise Fp8CookbookError(f"{plan.family.title} has components {', '.join(names)}; got {components or '[]'}")
    return [n for n in names if n in components]


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


@dataclass
class StandinResult:
    family: str
    size: str
    output_dir: Path | None
    sizes: list[ComponentSize]
    seed: int
    seconds: float = 0.0
    written_bytes: int = 0  # every file under the folder
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(family=self.family, size=self.size, output_dir=str(self.output_dir), seed=self.seed,
                    components=[s.as_dict() for s in self.sizes], seconds=round(self.seconds, 3),
                    written_bytes=self.written_bytes, dry_run=self.dry_run)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != OWNER_NAME)


def write_standin(family_name: str, output_dir: str | Path, *, size: str = "full", layers: int | None = None,
                  components: list[str] | None = None, seed: int = 0, overwrite: bool = False, dry_run: bool = False,
                  workers: int | None = None, shard_bytes: int = SHARD_BYTES, progress: bool | None = None,
                  log: Callable[[str], None] = print) -> StandinResult:
    """Write the family's pipeline folder of real configs (or `reduced` ones) with seeded random weights.

    `components` limits the weight components written (e.g. ["transformer"]); the others are listed as absent
    (`[null, null]`) in model_index.json, so the folder loads with them as None (pass prompt embeddings, or add the
    component yourself). Tokenizers and the scheduler are always written (a few kB). The size table is logged first;
    `dry_run` stops there. The folder is staged beside `output_dir` and renamed in at the end: a failure leaves
    nothing. `progress` None = a bar on a terminal, plain lines otherwise.
    """
    t0 = time.perf_counter()
    plan = recipe(family_name, size, layers=layers)
    wanted = _check_components(plan, components)
    output_dir = Path(output_dir).expanduser()
    if output_dir.exists() and not dry_run:
        if not overwrite:
            raise Fp8CookbookError(f"{output_dir}: already exists (pass --overwrite to replace it)")
        if not output_dir.is_dir():
            raise Fp8CookbookError(f"{output_dir}: exists and is not a folder")
    models = {c.name: _meta_model(c) for c in plan.components if c.name in wanted}
    sizes = size_table(plan, wanted, models)
    total = sum(s.nbytes for s in sizes)
    for line in size_lines(plan, sizes):
        log(line)
    result = StandinResult(plan.family.name, size, output_dir, sizes, seed, dry_run=dry_run)
    if dry_run:
        log("dry run: nothing written")
        result.seconds = time.perf_counter() - t0
        return result
    free = _free_bytes(output_dir.absolute().parent)
    need = total + 64 * 2**20
    if free < need:
        raise Fp8CookbookError(f"{output_dir}: needs {need / 1e9:.2f} GB, the disk has {free / 1e9:.2f} GB free "
                               "(use --components / --transformer-only, or another disk)")

    from tqdm.auto import tqdm

    workers = workers or min(16, os.cpu_count() or 1)
    bar_on = sys.stderr.isatty() if progress is None else progress
    with staged_dir(output_dir, overwrite=overwrite, wrap_os_errors=False) as tmp:  # renamed in at once
        with tqdm(total=total, unit="B", unit_scale=True, desc="stand-in", disable=not bar_on) as bar:
            for c in plan.components:
                if c.name not in wanted:
                    continue
                tc = time.perf_counter()
                _write_component(c, models[c.name], tmp / c.name, seed, workers, shard_bytes, bar.update)
                if not bar_on:
                    n = next(s.nbytes for s in sizes if s.name == c.name)
                    log(f"  wrote {c.name} ({_gb(n)}) in {time.perf_counter() - tc:.1f} s")
        modules: dict[str, Any] = {name: make() for name, make in plan.tokenizers.items()}
        for name, tok in modules.items():
            tok.save_pretrained(tmp / name)
        modules["scheduler"] = _scheduler(plan)
        modules["scheduler"].save_pretrained(tmp / "scheduler")
        modules.update(models)
        _pipeline_object(plan, modules).save_config(tmp)  # model_index.json; absent components are [null, null]
        result.seconds = time.perf_counter() - t0
        result.written_bytes = _folder_bytes(tmp)
        info = dict(result.as_dict(), layers=layers, all_components=[c.name for c in plan.components],
                    note="random weights in the real configs: for time, memory and disk, not for images")
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")  # the whole folder is renamed in at once
    log(f"wrote {output_dir} ({_gb(result.written_bytes)} in {result.seconds:.1f} s)")
    return result


# ---------------------------------------------------------------------------------------------- in memory
def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


@torch.no_grad()
def build_component(component: Component, *, seed: int = 0, device: str | torch.device = "cpu",
                    workers: int | None = None) -> nn.Module:
    """One component in memory with the same values `write_standin` writes, as `load_pipeline` holds it (BF16, a
    diffusers model's `_keep_in_fp32_modules` float32), drawn slice by slice straight into tensors on `device`."""
    model = _meta_model(component)
    specs = {s.name: s for s in _specs(component, model)}
    params = [(n, p) for n, p in model.named_parameters()]  # tied parameters appear once
    order = [specs[n] for n, _ in params if n in specs]
    for spec, parts in _stream(component.name, order, seed, workers or min(16, os.cpu_count() or 1)):
        # diffusers keeps `_keep_in_fp32_modules` float32 in a BF16 load; transformers 5 does so only for float16
        keep = component.library == "diffusers" and _keep_fp32(model, spec.name)
        dtype = torch.float32 if keep else DTYPE if spec.dtype.is_floating_point else spec.dtype
        t = torch.empty(spec.shape, dtype=dtype, device=device)
        row = 0
        for part in parts:
            n = part.shape[0] if part.dim() else 1
            (t if t.dim() == 0 else t[row:row + n]).copy_(part)
            row += n
        _set_param(model, spec.name, t)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for name, b in list(model.named_buffers()):
        if b.is_floating_point() and not (component.library == "diffusers" and _keep_fp32(model, name)):
            b.data = b.data.to(DTYPE)
    return model.to(device).eval().requires_grad_(False)


def build_standin_pipeline(family_name: str, *, size: str = "full", layers: int | None = None,
                           components: list[str] | None = None, seed: int = 0, device: str | torch.device = "cpu",
                           component_devices: dict[str, str] | None = None, workers: int | None = None):
    """The stand-in pipeline in memory (no disk): the same values as the folder `write_standin` writes.

    For models whose folder plus outputs do not fit a disk (FLUX.2-dev, Wan2.2 A14B). `component_devices` puts
    single components elsewhere, e.g. {"text_encoder": "cpu"} to keep a text encoder off the GPU; components left
    out of `components` are None.
    """
    plan = recipe(family_name, size, layers=layers)
    wanted = _check_components(plan, components)
    modules: dict[str, Any] = {name: make() for name, make in plan.tokenizers.items()}
    modules["scheduler"] = _scheduler(plan)
    for c in plan.components:
        if c.name in wanted:
            where = (component_devices or {}).get(c.name, device)
            modules[c.name] = build_component(c, seed=seed, device=where, workers=workers)
    pipe = _pipeline_object(plan, modules)
    pipe.set_progress_bar_config(disable=True)
    return pipe
