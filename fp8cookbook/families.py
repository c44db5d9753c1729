"""Model families: one registry entry each, so that adding a family touches nothing else.

An entry is data: the real model's config, a tiny config of the same class that runs on CPU in milliseconds,
the BF16 fallback profile the converter applies (spec section 4), the sensitive layers that calibration leaves
alone, and how to build dummy transformer inputs for a resolution (and frame count). Every pattern carries the
reason it is there.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import Fp8CookbookError


@dataclass(frozen=True)
class LayerRule:
    """A regex that must match a whole module name, and why the layer is treated specially."""

    pattern: str
    why: str

    def matches(self, module_name: str) -> bool:
        return re.fullmatch(self.pattern, module_name) is not None


InputMaker = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Family:
    """Everything the library knows about one model family."""

    name: str
    title: str
    class_name: str  # diffusers transformer class, as in config.json's `_class_name`
    pipeline_class: str
    hub_id: str  # the base model SGLang serves with --model-path
    full_config: dict[str, Any]
    tiny_config: dict[str, Any]
    bf16_fallback: tuple[LayerRule, ...]  # converter profile: these layers stay BF16 in the output
    sensitive: Callable[[dict[str, Any]], tuple[LayerRule, ...]]  # calibration leaves these unquantized
    make_inputs: InputMaker
    experts: tuple[str, ...] = ("transformer",)
    boundary_ratio: float | None = None
    # Defaults a user of the real model would pick.
    height: int = 1024
    width: int = 1024
    num_frames: int | None = None
    num_steps: int = 28
    guidance_scale: float = 3.5
    text_len: int = 512
    sglang_aliases: Callable[[str], list[str]] = field(default=lambda name: [])
    sglang_extra_flags: tuple[str, ...] = ()
    # Offload flags SGLang's own FP8 examples use so the model fits one 80 GB GPU (DiT offload is always off for FP8).
    sglang_memory_flags: tuple[str, ...] = ()
    serve_notes: tuple[str, ...] = ()  # what a user must know before serving this family's FP8 checkpoint
    size_multiple: int = 16  # height and width must be multiples of this (VAE downsampling x patch size)

    @property
    def is_video(self) -> bool:
        return self.num_frames is not None

    def transformer_class(self) -> type[torch.nn.Module]:
        import diffusers

        return getattr(diffusers, self.class_name)

    def is_fallback(self, module_name: str) -> bool:
        return any(rule.matches(module_name) for rule in self.bf16_fallback)

    def skip_in_calibration(self, module_name: str, config: dict[str, Any]) -> bool:
        """Layers calibration leaves in BF16: the sensitive filter plus the fallback profile (quantizing them is waste)."""
        return self.is_fallback(module_name) or any(rule.matches(module_name) for rule in self.sensitive(config))


# --------------------------------------------------------------------------------------------- dummy inputs
def _flux_ids(height: int, width: int, text_len: int, axes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids as the pipelines build them: (row, col) in the last two axes, zeros elsewhere."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    img = torch.zeros(height * width, axes)
    img[:, -2] = rows.flatten()
    img[:, -1] = cols.flatten()
    txt = torch.zeros(text_len, axes)
    return img.to(device), txt.to(device)


def _flux1_inputs(config: dict, *, height: int, width: int, num_frames: int | None = None, batch: int = 1,
                  text_len: int = 512, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                  generator: torch.Generator | None = None) -> dict[str, Any]:
    h, w = height // 16, width // 16  # VAE /8, then 2x2 packing
    img_ids, txt_ids = _flux_ids(h, w, text_len, 3, torch.device(device))
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


def _flux2_inputs(config: dict, *, height: int, width: int, num_frames: int | None = None, batch: int = 1,
                  text_len: int = 512, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                  generator: torch.Generator | None = None) -> dict[str, Any]:
    h, w = height // 16, width // 16
    axes = len(config["axes_dims_rope"])
    img_ids, txt_ids = _flux_ids(h, w, text_len, axes, torch.device(device))
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


def _wan_inputs(spatial: int) -> InputMaker:
    def make(config: dict, *, height: int, width: int, num_frames: int | None = 81, batch: int = 1,
             text_len: int = 512, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
             generator: torch.Generator | None = None) -> dict[str, Any]:
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
# ModelOpt's diffusers example keeps these FLUX layers out of quantization (filter_func_flux_dev).
_MODELOPT_FLUX_FILTER = (
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

FLUX2_FALLBACK = (
    LayerRule(r"time_guidance_embed\.(timestep|guidance)_embedder\.linear_[12]", "conditioning embedders"),
    LayerRule(r"double_stream_modulation_(img|txt)\.linear", "modulation shared by every double block"),
    LayerRule(r"single_stream_modulation\.linear", "modulation shared by every single block"),
    LayerRule(r"x_embedder", "latent-token input projection"),
    LayerRule(r"context_embedder", "text-token input projection (K=15360 text features)"),
    LayerRule(r"norm_out\.linear", "final AdaLN modulation"),
)


def _flux_sensitive(config: dict) -> tuple[LayerRule, ...]:
    return _MODELOPT_FLUX_FILTER


def _wan_sensitive(config: dict) -> tuple[LayerRule, ...]:
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


def _flux1_sglang_aliases(module_name: str) -> list[str]:
    """SGLang's FLUX.1 runtime names the feed-forward layers differently from diffusers; list both in `ignore`."""
    for ours, theirs in ((".net.0.proj", ".proj_in"), (".net.2", ".proj_out")):
        m = re.fullmatch(r"(transformer_blocks\.\d+\.ff(?:_context)?)" + re.escape(ours), module_name)
        if m:
            return [m.group(1) + theirs]
    return []


# ------------------------------------------------------------------------------------------------- registry
FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


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
    sensitive=_flux_sensitive,
    make_inputs=_flux1_inputs,
    num_steps=28,
    guidance_scale=3.5,
    sglang_aliases=_flux1_sglang_aliases,
))

register(Family(
    name="flux2",
    sglang_memory_flags=("--text-encoder-cpu-offload true", "--vae-cpu-offload true"),  # 24B Mistral text encoder
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
    sensitive=_flux_sensitive,
    make_inputs=_flux2_inputs,
    num_steps=50,
    guidance_scale=4.0,
))

_WAN_A14B = dict(patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                 text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                 rope_max_seq_len=1024, pos_embed_seq_len=None)
_WAN_TINY = dict(_WAN_A14B, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
                 freq_dim=32, ffn_dim=64, num_layers=7, rope_max_seq_len=32)

register(Family(
    name="wan22-a14b",
    title="Wan2.2 T2V-A14B",
    class_name="WanTransformer3DModel",
    pipeline_class="WanPipeline",
    hub_id="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    full_config=_WAN_A14B,
    tiny_config=_WAN_TINY,
    bf16_fallback=(),  # spec section 4: ModelOpt's Wan filter already keeps the sensitive layers BF16
    sensitive=_wan_sensitive,
    make_inputs=_wan_inputs(spatial=8),
    experts=("transformer", "transformer_2"),
    boundary_ratio=0.875,
    height=480, width=832, num_frames=81, num_steps=40, guidance_scale=4.0,
    sglang_extra_flags=("--num-gpus 4", "--ulysses-degree 4"),
    sglang_memory_flags=("--text-encoder-cpu-offload true",),  # UMT5-XXL beside two 14B experts
))

register(Family(
    name="wan22-ti2v-5b",
    size_multiple=32,  # VAE /16, then 2x2 patches
    serve_notes=("TI2V-5B FP8 is not in SGLang's validated ModelOpt matrix (FLUX.1, FLUX.2, Wan2.2-T2V-A14B): check "
                 "the served output against this notebook's comparison",),
    title="Wan2.2 TI2V-5B",
    class_name="WanTransformer3DModel",
    pipeline_class="WanPipeline",
    hub_id="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    full_config=dict(_WAN_A14B, num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30),
    tiny_config=dict(_WAN_TINY, in_channels=12, out_channels=12),
    bf16_fallback=(),
    sensitive=_wan_sensitive,
    make_inputs=_wan_inputs(spatial=16),
    height=704, width=1280, num_frames=121, num_steps=50, guidance_scale=5.0,
))

# `wan22` is what a user types; it means the flagship A14B.
ALIASES = {"wan22": "wan22-a14b", "wan": "wan22-a14b", "flux": "flux1", "flux.1": "flux1", "flux.2": "flux2"}


def get_family(name: str) -> Family:
    """Look a family up by name or alias; an unknown name lists the known ones."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FAMILIES:
        known = ", ".join(sorted(FAMILIES) + sorted(ALIASES))
        raise Fp8CookbookError(f"unknown model family {name!r}; known: {known}")
    return FAMILIES[key]


def family_for_class(class_name: str | None) -> Family | None:
    """The profile for a config.json `_class_name` (both Wan2.2 variants share one, with the same empty profile)."""
    for family in FAMILIES.values():
        if family.class_name == class_name:
            return family
    return None


def build_transformer(family: Family, size: str = "tiny", *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                      device: str | torch.device = "cpu") -> torch.nn.Module:
    """A transformer of the family's real class with random weights: `tiny` for CPU tests, `full` for timing.

    `full` is built on the meta device, cast there (so FLUX.2 never exists in float32: that would be 128 GB), with
    `_keep_in_fp32_modules` kept float32 as `from_pretrained` keeps them, and its values drawn on `device`:
    N(0, 1/fan_in) for matrices, N(0, 0.02) elsewhere, 1 + N(0, 0.02) for norm weights.
    """
    if size not in ("tiny", "full"):
        raise Fp8CookbookError(f"unknown size {size!r}; use 'tiny' or 'full'")
    cls = family.transformer_class()
    if size == "tiny":
        torch.manual_seed(seed)
        return cls(**family.tiny_config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        model = cls(**family.full_config)
    model = model.to(dtype)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, p in model.named_parameters():
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                t.zero_()
            elif t.dim() >= 2:
                t.normal_(0.0, 1.0 / math.sqrt(math.prod(t.shape[1:])), generator=g)
            else:
                t.normal_(0.0, 0.02, generator=g)
                if "norm" in name and name.endswith("weight"):
                    t.add_(1.0)
    return model.eval().requires_grad_(False)
