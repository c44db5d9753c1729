"""Complete diffusers pipelines per family: tiny offline ones for tests, and one loader for tiny and real checkpoints.

Why tiny pipelines: the converter, calibration and benchmark code must be exercised end to end (text encoder ->
transformer(s) -> VAE) on a CPU with no network. So every family gets a pipeline of the *real* diffusers and
transformers classes, with random weights at tiny size, built from a fixed seed, saved once with `save_pretrained`
and then loaded through exactly the `from_pretrained` path that a real checkpoint takes.

Tokenizers are built locally with the `tokenizers` library over small fixed vocabularies (byte-level BPE for CLIP
and Mistral, a character Unigram for T5/UMT5), wrapped in the transformers classes the real checkpoints use.

One substitution (FLUX.2): the real `tokenizer` component of FLUX.2-dev is a `PixtralProcessor`. That class needs
torchvision (transformers replaces it with a placeholder otherwise), which the CPU environment does not have. The
tiny pipeline therefore stores the processor's inner tokenizer class, `PreTrainedTokenizerFast` (saved under its
transformers-5 name `TokenizersBackend`), carrying a Mistral-style chat template. For text prompts `Flux2Pipeline`
only calls `tokenizer.apply_chat_template(...)`, which the bare tokenizer implements with the same arguments and
result; only prompt upsampling with images (`caption_upsample_temperature` + `image`) would need the processor.
The text encoder is the real `Mistral3ForConditionalGeneration`, with 30 tiny layers so that the pipeline's default
hidden-state layers (10, 20, 30) exist.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import Fp8CookbookError
from .families import Family, build_transformer, get_family

TINY_VERSION = "v1"  # bump when the tiny build changes, so stale caches are not reused
SEED = 0

_WORDS = ("a photo of cat dog red blue green house tree sky sun water city street car light dark small big old new "
          "on in the with and at night day").split()


# ------------------------------------------------------------------------------------------------ tokenizers
def _clip_tokenizer():
    """CLIP's byte-level BPE over the 256 byte symbols (and their end-of-word forms), no merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer(model_max_length: int):
    """A T5/UMT5 SentencePiece-style Unigram: characters plus a few whole words, so any ASCII prompt tokenizes."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -5.0) for c in chars] + [("\u2581" + c, -4.0) for c in chars]
    vocab += [("\u2581" + w, -1.0) for w in _WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


_MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                     "[IMG]", "[IMG_BREAK]", "[IMG_END]"]

# Mistral-Small-3.1's prompt layout, reduced to text content (what Flux2Pipeline's format_input produces).
_MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def _mistral_tokenizer(model_max_length: int):
    """Byte-level BPE (like Mistral's tekken) with Mistral's control tokens and chat layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_MISTRAL_SPECIALS)}
    for s in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_MISTRAL_SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=model_max_length,
                                   chat_template=_MISTRAL_CHAT_TEMPLATE)


# ---------------------------------------------------------------------------------------------- components
def _flux_vae(cls, latent_channels: int, **extra):
    """Four levels like the real FLUX VAEs, so the /8 spatial compression (and the pipelines' math) is the real one."""
    return cls(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 16, 16), layers_per_block=1,
               latent_channels=latent_channels, norm_num_groups=8, sample_size=64, **extra)


def _build_flux1(family: Family):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cfg = family.tiny_config
    clip_tok = _clip_tokenizer()
    t5_tok = _t5_tokenizer(model_max_length=32)
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
    vae = _flux_vae(AutoencoderKL, cfg["in_channels"] // 4, scaling_factor=0.3611, shift_factor=0.1159,
                    use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=build_transformer(family, seed=SEED, dtype=torch.float32))


def _build_flux2(family: Family):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    cfg = family.tiny_config
    tok = _mistral_tokenizer(model_max_length=256)
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
    vae = _flux_vae(AutoencoderKLFlux2, cfg["in_channels"] // 4)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096, time_shift_type="exponential")
    return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                         transformer=build_transformer(family, seed=SEED, dtype=torch.float32))


def _build_wan(family: Family):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = family.tiny_config
    tok = _t5_tokenizer(model_max_length=32)
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
                                        num_train_timesteps=1000, flow_shift=3.0 if two_experts else 5.0)
    if two_experts:  # high-noise `transformer`, low-noise `transformer_2`: same config, different weights
        extra = dict(transformer_2=build_transformer(family, seed=SEED + 1, dtype=torch.float32),
                     boundary_ratio=family.boundary_ratio)
    else:
        extra = dict(expand_timesteps=True)  # TI2V-5B: per-token timesteps
    return WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=build_transformer(family, seed=SEED, dtype=torch.float32), **extra)


_BUILDERS = {"flux1": _build_flux1, "flux2": _build_flux2, "wan22-a14b": _build_wan, "wan22-ti2v-5b": _build_wan}


def build_tiny_pipeline(family_name: str):
    """A tiny random pipeline of the family's real classes, in BF16 (like the real checkpoints), not saved."""
    family = get_family(family_name)
    if family.name not in _BUILDERS:
        raise Fp8CookbookError(f"no tiny pipeline recipe for family {family.name!r}")
    import diffusers

    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # silence "keep in float32" advice: from_pretrained applies it
    try:
        return _BUILDERS[family.name](family).to(torch.bfloat16)
    finally:
        diffusers.utils.logging.set_verbosity(level)


# ------------------------------------------------------------------------------------------------- caching
def _cache_root(cache_dir: str | Path | None) -> Path:
    root = cache_dir or os.environ.get("FP8COOKBOOK_CACHE") or Path.home() / ".cache" / "fp8cookbook"
    return Path(root).expanduser()


def _is_current(folder: Path, family: Family) -> bool:
    """A cached tiny pipeline is reused only if complete and built from today's tiny_config."""
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text())
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    wanted = json.loads(json.dumps(family.tiny_config))  # tuples -> lists, as config.json stores them
    return (all(config.get(k) == v for k, v in wanted.items())
            and index.get("boundary_ratio", family.boundary_ratio) == family.boundary_ratio)


def tiny_pipeline_dir(family_name: str, cache_dir: str | Path | None = None) -> Path:
    """Folder holding the family's tiny pipeline; built and saved on first use.

    Saved (not kept in memory) so tests load it through the same `from_pretrained` path as a real checkpoint.
    The folder is written beside its final place and renamed in, so concurrent callers never see half a pipeline.
    """
    family = get_family(family_name)
    final = _cache_root(cache_dir) / "tiny" / f"{family.name}-{TINY_VERSION}"
    if _is_current(final, family):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build_tiny_pipeline(family.name).save_pretrained(tmp)
        if final.exists() and not _is_current(final, family):  # stale (tiny_config changed): move it aside
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
            try:
                final.rename(trash / "old")
            except FileNotFoundError:  # another caller moved it first
                pass
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_current(final, family):  # not just "another caller got there first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------- loading
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load_pipeline(family_name: str, model_path: str | Path | None = None, *, dtype: torch.dtype = torch.bfloat16,
                  device: str | torch.device = "cpu"):
    """The family's diffusers pipeline from a local folder or hub id; None means the tiny test pipeline.

    Tiny and real take the same `from_pretrained` path, so what the tests exercise is what users run. The
    per-step progress bar is off (re-enable with `pipe.set_progress_bar_config(disable=False)`).
    """
    import diffusers

    family = get_family(family_name)
    source = str(tiny_pipeline_dir(family.name) if model_path is None else model_path)
    local = Path(source).expanduser()
    absent: dict[str, None] = {}
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            raise Fp8CookbookError(f"{source}: not a diffusers pipeline folder (no model_index.json)")
        try:
            entries = json.loads(index.read_text())
            class_name = entries.get("_class_name")
        except ValueError as e:
            raise Fp8CookbookError(f"{source}: unreadable model_index.json ({e})") from e
        if class_name != family.pipeline_class:
            raise Fp8CookbookError(f"{source}: model_index.json names {class_name}, but {family.title} needs "
                                   f"{family.pipeline_class}")
        source = str(local)
        # Components listed as [null, null] (e.g. a stand-in written with --components) load as None.
        absent = {k: None for k, v in entries.items() if not k.startswith("_") and v == [None, None]}
    elif not _HUB_ID.fullmatch(source):
        raise Fp8CookbookError(f"{source}: no such folder (and not a hub id like {family.hub_id})")
    cls = getattr(diffusers, family.pipeline_class)
    try:
        pipe = cls.from_pretrained(source, dtype=dtype, **absent)
    except Exception as e:  # noqa: BLE001 - whatever the hub or a broken folder raises, say which path failed
        raise Fp8CookbookError(f"cannot load {family.title} pipeline from {source}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def transformer_names(pipe) -> list[str]:
    """The denoiser components to quantize/calibrate: "transformer", plus "transformer_2" for Wan2.2 A14B."""
    return [name for name in ("transformer", "transformer_2") if getattr(pipe, name, None) is not None]


# ---------------------------------------------------------------------------------------------- generation
# Tiny defaults: small enough for CPU tests, and for A14B 4 steps whose timesteps fall on both sides of the
# boundary (UniPC, shift 3: timesteps 999, 900 >= 875 go to `transformer`; 750, 500 to `transformer_2`).
_TINY_SETTINGS = {
    "flux1": dict(height=64, width=64, num_frames=None, num_inference_steps=3, guidance_scale=3.5),
    "flux2": dict(height=64, width=64, num_frames=None, num_inference_steps=3, guidance_scale=4.0),
    "wan22-a14b": dict(height=64, width=64, num_frames=5, num_inference_steps=4, guidance_scale=4.0),
    "wan22-ti2v-5b": dict(height=64, width=64, num_frames=5, num_inference_steps=3, guidance_scale=5.0),
}


def default_tiny_settings(family_name: str) -> dict[str, Any]:
    """height, width, num_frames, num_inference_steps, guidance_scale for the tiny pipeline (splat into
    `generation_kwargs`)."""
    return dict(_TINY_SETTINGS[get_family(family_name).name])


def _text_tokenizer(pipe):
    """The tokenizer whose length limit bounds `max_sequence_length` (T5 for FLUX.1; a processor's inner one)."""
    tok = getattr(pipe, "tokenizer_2", None) or pipe.tokenizer
    return getattr(tok, "tokenizer", tok)


def generation_kwargs(family: Family | str, pipe, *, prompt: str = "a photo of a red house", height: int | None = None,
                      width: int | None = None, num_frames: int | None = None, num_inference_steps: int | None = None,
                      guidance_scale: float | None = None, seed: int = 0, output_type: str = "pt",
                      max_sequence_length: int | None = None) -> dict[str, Any]:
    """Keyword arguments for `pipe(**kwargs)`, the same way for every family.

    Unset values take the real model's defaults from the registry. The generator is a CPU one seeded with `seed`,
    so a run is reproducible on any device. `max_sequence_length` defaults to the family's text length, capped by
    the tokenizer's own limit (which is what makes the tiny pipelines use short prompts).
    """
    family = get_family(family) if isinstance(family, str) else family
    if max_sequence_length is None:
        max_sequence_length = min(family.text_len, int(_text_tokenizer(pipe).model_max_length))
    kwargs: dict[str, Any] = dict(
        prompt=prompt,
        height=height or family.height,
        width=width or family.width,
        num_inference_steps=num_inference_steps or family.num_steps,
        guidance_scale=family.guidance_scale if guidance_scale is None else guidance_scale,
        generator=torch.Generator(device="cpu").manual_seed(seed),
        output_type=output_type,
        max_sequence_length=max_sequence_length,
    )
    if family.is_video:
        kwargs["num_frames"] = num_frames or family.num_frames
    return kwargs
