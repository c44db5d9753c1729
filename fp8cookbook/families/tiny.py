"""Shared helpers of the tiny offline pipelines (pipelines.py explains why they exist): tokenizers and the FLUX VAE.

Tokenizers are built locally with the `tokenizers` library over small fixed vocabularies (byte-level BPE for CLIP
and Mistral, a character Unigram for T5/UMT5), wrapped in the transformers classes the real checkpoints use.
"""

from __future__ import annotations

SEED = 0

_WORDS = ("a photo of cat dog red blue green house tree sky sun water city street car light dark small big old new "
          "on in the with and at night day").split()


def clip_tokenizer():
    """CLIP's byte-level BPE over the 256 byte symbols (and their end-of-word forms), no merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer(model_max_length: int):
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


def mistral_tokenizer(model_max_length: int):
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


def flux_vae(cls, latent_channels: int, **extra):
    """Four levels like the real FLUX VAEs, so the /8 spatial compression (and the pipelines' math) is the real one."""
    return cls(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 16, 16), layers_per_block=1,
               latent_channels=latent_channels, norm_num_groups=8, sample_size=64, **extra)


def tiny_transformer(family, seed: int):
    """The family's tiny transformer in float32 (the pipeline builders cast the whole pipeline afterwards)."""
    import torch

    from .registry import build_transformer

    return build_transformer(family, seed=seed, dtype=torch.float32)
