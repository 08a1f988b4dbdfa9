"""Tiny random audio-language checkpoints in the Hugging Face layout, offline, for parity tests:
Qwen2-Audio (transformers' own classes, saved with ``save_pretrained``) and Ultravox (its
published config keys and weight names; no transformers class exists for it).

Weights are drawn with std 0.15 and norm gains from N(1, 0.15) and the LM head is untied, so the
answer depends on the audio. The audio window is shortened (``chunk_length`` seconds, with the
tower's ``max_source_positions`` to match) so a CPU forward is quick.
"""

from __future__ import annotations

import os
from pathlib import Path

from frontend.random_model import build_tokenizer, save_random_model, tiny_text_kwargs

AUDIO_TOKENS = ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]
# Qwen2-Audio's own template: each clip is "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>\n".
QWEN2_AUDIO_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{{ 'Audio ' + audio_count.value|string + ': <|audio_bos|><|AUDIO|><|audio_eos|>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _audio_tokenizer(out: Path):
    import transformers

    build_tokenizer(out, chat_template=QWEN2_AUDIO_TEMPLATE)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    tok.add_tokens(AUDIO_TOKENS, special_tokens=True)
    tok.save_pretrained(out)
    return tok


def _is_gain(name: str) -> bool:
    return name.endswith(("norm.weight", "layer_norm.weight", "ln_pre.weight", "ln_mid.weight",
                          "ln_post.weight"))


def build_random_qwen2_audio(
    out_dir: str | os.PathLike,
    *,
    num_mel_bins: int = 32,
    chunk_length: int = 4,
    audio_hidden: int = 32,
    audio_layers: int = 2,
    audio_heads: int = 2,
    text_hidden: int = 64,
    num_layers: int = 2,
    std: float = 0.15,
    seed: int = 0,
) -> Path:
    """A tiny random `Qwen2AudioForConditionalGeneration` with its tokenizer (the audio tokens the
    config names), Qwen2-Audio's chat template and a `WhisperFeatureExtractor` config with a
    ``chunk_length`` s window (the tower's positions cover it: 50 per second)."""
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _audio_tokenizer(out)
    audio = transformers.Qwen2AudioEncoderConfig(
        num_mel_bins=num_mel_bins, encoder_layers=audio_layers,
        encoder_attention_heads=audio_heads, encoder_ffn_dim=2 * audio_hidden,
        d_model=audio_hidden, max_source_positions=chunk_length * 50)
    text = transformers.Qwen2Config(**tiny_text_kwargs(tok, text_hidden, num_layers),
                                    tie_word_embeddings=False)
    config = transformers.Qwen2AudioConfig(
        audio_config=audio, text_config=text,
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"), tie_word_embeddings=False)
    save_random_model(transformers.Qwen2AudioForConditionalGeneration, config, out, std=std,
                      seed=seed, norm_gain=_is_gain, eos_token_id=tok.eos_token_id)
    features = transformers.WhisperFeatureExtractor(
        feature_size=num_mel_bins, chunk_length=chunk_length, return_attention_mask=True)
    features.save_pretrained(out)
    return out


# The same ChatML, each clip written as Ultravox's placeholder.
ULTRAVOX_TEMPLATE = QWEN2_AUDIO_TEMPLATE.replace(
    "{{ 'Audio ' + audio_count.value|string + ': <|audio_bos|><|AUDIO|><|audio_eos|>\n' }}",
    "{{ '<|audio|>' }}")


def build_random_ultravox(
    out_dir: str | os.PathLike,
    *,
    num_mel_bins: int = 32,
    window_seconds: int = 2,
    audio_hidden: int = 32,
    audio_layers: int = 2,
    audio_heads: int = 2,
    stack_factor: int = 4,
    projector_hidden: int = 96,
    text_hidden: int = 64,
    num_layers: int = 2,
    std: float = 0.15,
    seed: int = 0,
    audio_token_in_vocab: bool = True,
) -> Path:
    """A tiny random Ultravox checkpoint in the published layout: config.json with Ultravox's
    keys (``audio_config`` a Whisper config, ``text_config`` a Llama one, ``stack_factor``,
    ``hidden_size``, ``projector_act: swiglu``, ``projector_ln_mid``, ``norm_init``,
    ``audio_token_index``, ``audio_model_id`` / ``text_model_id``), one safetensors file with
    ``audio_tower.*`` (transformers' WhisperEncoder names), ``multi_modal_projector.*`` and
    ``language_model.*``, the tokenizer (``<|audio|>`` is the audio token) and a
    `WhisperFeatureExtractor` config. The Whisper window is ``window_seconds`` (50 positions
    per second), so a few seconds of audio make several chunks.

    ``audio_token_in_vocab=False`` is the released checkpoints' layout: the tokenizer has no
    ``<|audio|>`` token and ``audio_token_index`` is the LM's vocab size, one past its last id.
    The weights are the default build's with the audio token's embedding and LM-head rows cut
    off, so both layouts answer alike wherever the in-vocab one never samples that token."""
    import json

    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, chat_template=ULTRAVOX_TEMPLATE)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text_vocab = len(tok)  # the released layout's LM vocabulary: no audio token
    tok.add_tokens(["<|audio|>"], special_tokens=True)
    audio_token_index = tok.convert_tokens_to_ids("<|audio|>")
    if audio_token_in_vocab:
        tok.save_pretrained(out)
    audio = transformers.WhisperConfig(
        num_mel_bins=num_mel_bins, d_model=audio_hidden, encoder_layers=audio_layers,
        encoder_attention_heads=audio_heads, encoder_ffn_dim=2 * audio_hidden,
        decoder_layers=1, decoder_attention_heads=audio_heads, decoder_ffn_dim=2 * audio_hidden,
        max_source_positions=window_seconds * 50)
    text = transformers.LlamaConfig(**tiny_text_kwargs(tok, text_hidden, num_layers),
                                    tie_word_embeddings=False)
    torch.manual_seed(seed)
    gain = lambda name: name.endswith(("norm.weight", "layer_norm.weight"))  # noqa: E731
    weights: dict[str, torch.Tensor] = {}
    for prefix, module in (("audio_tower.", WhisperEncoder(audio)),
                           ("language_model.", transformers.LlamaForCausalLM(text))):
        for name, p in module.state_dict().items():
            weights[prefix + name] = torch.empty_like(p).normal_(1.0 if gain(name) else 0.0, std)
    dim_in = audio_hidden * stack_factor
    shapes = {"ln_pre.weight": (dim_in,), "linear_1.weight": (projector_hidden, dim_in),
              "ln_mid.weight": (projector_hidden // 2,),
              "linear_2.weight": (text_hidden, projector_hidden // 2)}
    for name, shape in shapes.items():
        weights[f"multi_modal_projector.{name}"] = torch.empty(shape).normal_(
            1.0 if name.startswith("ln_") else 0.0, std)
    if not audio_token_in_vocab:  # the same draws, less the audio token's rows
        for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            weights[name] = weights[name][:text_vocab]
        text.vocab_size = text_vocab
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    audio_dict = {k: v for k, v in audio.to_dict().items() if not k.startswith("_")}
    text_dict = {k: v for k, v in text.to_dict().items() if not k.startswith("_")}
    config = {
        "architectures": ["UltravoxModel"], "model_type": "ultravox",
        "audio_config": audio_dict, "text_config": text_dict,
        "audio_model_id": "openai/whisper-large-v3-turbo",
        "text_model_id": "meta-llama/Llama-3.2-1B-Instruct",
        "audio_token_index": audio_token_index,
        "hidden_size": projector_hidden, "stack_factor": stack_factor,
        "projector_act": "swiglu", "projector_ln_mid": True, "norm_init": 0.4,
        "ignore_index": -100, "initializer_range": 0.02, "pad_token_id": tok.pad_token_id,
        "vocab_size": text.vocab_size, "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}))
    transformers.WhisperFeatureExtractor(feature_size=num_mel_bins).save_pretrained(out)
    (out / "MMSERVE_RANDOM_WEIGHTS").write_text(
        "This checkpoint has random weights: it produces arbitrary text.\n")
    return out
