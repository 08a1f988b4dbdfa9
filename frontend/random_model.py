"""Builds small random-weight checkpoints in the Hugging Face layout, offline.

They serve two purposes: the placeholder default model of `mmserve serve` (until the trained demo
model lands; its outputs are random text and it says so in its config), and the tiny models that the
parity tests compare against transformers. The tokenizer is a byte-level BPE trained in about a
second, so any UTF-8 text (emoji, CJK) round-trips.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if not (loop.last and continue_final_message) %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
IMAGE_TOKEN = "<image>"

# ChatML that also renders image parts as the model's image token (LLaVA-style checkpoints).
CHATML_MM_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "{% if not (loop.last and continue_final_message) %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """The quick brown fox jumps over the lazy dog. A serving system answers requests.
Hello world! How are you today? I am fine, thank you. What is the capital of France? Paris.
Tokens, blocks, caches and schedulers: continuous batching keeps the accelerator busy.
def main(): return 42  # code is text too
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000; punctuation , . ; : ! ? ' " ( ) [ ] { }
Über café naïve — “quotes” 你好世界 こんにちは 🙂🚀
"""

DEFAULT_RANDOM_MODEL = "mmserve-random-llama"


def build_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 384,
                    chat_template: str = CHATML_TEMPLATE) -> None:
    """Train a byte-level BPE and save it as a transformers fast tokenizer with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = chat_template
    fast.save_pretrained(out_dir)


RANDOM_MARKER = "This checkpoint has random weights: it produces arbitrary text.\n"


def save_random_model(model_cls, config, out: Path, *, std: float, seed: int,
                      norm_gain=lambda name: False, eos_token_id: int | None = None,
                      **save_kwargs) -> None:
    """Build ``model_cls(config)`` with every weight drawn from N(0, ``std``) (and the ones
    ``norm_gain(name)`` picks from N(1, ``std``): norms near identity keep the signal alive),
    save it to ``out`` and mark the folder as random weights."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if norm_gain(name) else 0.0, std)
    if eos_token_id is not None:
        model.generation_config.eos_token_id = eos_token_id
    model.save_pretrained(out, **save_kwargs)
    (out / "MMSERVE_RANDOM_WEIGHTS").write_text(RANDOM_MARKER)


def is_norm_gain(name: str) -> bool:
    return "norm" in name and name.endswith("weight")


def build_random_checkpoint(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    std: float = 0.15,
    seed: int = 0,
    max_shard_size: str | None = None,
    **config_overrides,
) -> Path:
    """Write a tiny random `LlamaForCausalLM` / `Qwen2ForCausalLM` / `MistralForCausalLM` checkpoint.

    Weights are drawn with ``std`` (0.1-0.2): the HF default init gives near-tied logits, which
    makes greedy parity flaky, while 0.3+ collapses generation into one repeated token.
    """
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    config = config_cls(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **config_overrides,
    )
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    save_random_model(model_cls, config, out, std=std, seed=seed, **kwargs)
    return out


def tiny_text_kwargs(tok, hidden: int, num_layers: int) -> dict:
    """The tiny LM's config keywords every multimodal builder shares (4 heads over 2 KV heads,
    so tensor parallelism at 2 splits every shard), with the tokenizer's special ids."""
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def tiny_clip_vision(hidden: int, image_size: int, patch_size: int):
    """A 3-layer CLIP tower config (LLaVA-1.5 and LLaVA-NeXT builders)."""
    import transformers

    return transformers.CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
        num_attention_heads=2, image_size=image_size, patch_size=patch_size,
        projection_dim=hidden)


def build_random_llava(
    out_dir: str | os.PathLike,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    num_layers: int = 2,
    std: float = 0.15,
    seed: int = 0,
    select_strategy: str = "default",
    feature_layer: int = -2,
) -> Path:
    """A tiny random `LlavaForConditionalGeneration` (CLIP tower + MLP projector + Llama) saved
    with an HF `LlavaProcessor` (CLIP image processor) and a chat template with image parts."""
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, chat_template=CHATML_MM_TEMPLATE)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = tiny_clip_vision(vision_hidden, image_size, patch_size)
    text = transformers.LlamaConfig(**tiny_text_kwargs(tok, text_hidden, num_layers))
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        vision_feature_select_strategy=select_strategy, vision_feature_layer=feature_layer,
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    save_random_model(transformers.LlavaForConditionalGeneration, config, out, std=std, seed=seed,
                      norm_gain=is_norm_gain, eos_token_id=tok.eos_token_id)
    mean, std_ = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=mean, image_std=std_, do_convert_rgb=True,
    )
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
        vision_feature_select_strategy=select_strategy, image_token=IMAGE_TOKEN,
        chat_template=CHATML_MM_TEMPLATE, num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
    return out


# Qwen2-VL's vision tokens: an image part renders as start, one pad (the processor expands it to
# the image's token count) and end, as the Qwen2-VL chat template does.
QWEN2_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% if not (loop.last and continue_final_message) %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_random_qwen2_vl(
    out_dir: str | os.PathLike,
    *,
    arch: str = "qwen2_vl",
    vision_depth: int = 2,
    vision_embed_dim: int = 32,
    vision_heads: int = 2,
    text_hidden: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
    min_pixels: int = 28 * 28 * 2,
    max_pixels: int = 28 * 28 * 16,
    std: float = 0.15,
    seed: int = 0,
) -> Path:
    """A tiny random `Qwen2VLForConditionalGeneration` (``arch`` "qwen2_vl") or
    `Qwen2_5_VLForConditionalGeneration` ("qwen2_5_vl") with its tokenizer (vision special
    tokens whose ids the config names), a chat template with image parts, and the image
    processor config. ``mrope_section`` must sum to half the LM head dim (64 / 4 heads = 16 ->
    8). The default pixel bounds make a 30-120 px image 2-16 placeholder tokens (grids 2x4 to
    8x8). Qwen2.5-VL's windows are 56 px (2x2 merged tokens), so such images have several, and
    its last vision block attends over the whole image."""
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, chat_template=QWEN2_VL_TEMPLATE)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    tok.add_tokens(QWEN2_VL_TOKENS, special_tokens=True)
    tok.save_pretrained(out)
    ids = dict(zip(QWEN2_VL_TOKENS, tok.convert_tokens_to_ids(QWEN2_VL_TOKENS)))
    if arch == "qwen2_vl":
        vision = {"depth": vision_depth, "embed_dim": vision_embed_dim,
                  "num_heads": vision_heads, "hidden_size": text_hidden, "mlp_ratio": 2}
    else:
        vision = {"depth": vision_depth, "hidden_size": vision_embed_dim,
                  "num_heads": vision_heads, "out_hidden_size": text_hidden,
                  "intermediate_size": 2 * vision_embed_dim, "window_size": 56,
                  "fullatt_block_indexes": [vision_depth - 1]}
    config_cls, model_cls = {
        "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (transformers.Qwen2_5_VLConfig,
                       transformers.Qwen2_5_VLForConditionalGeneration),
    }[arch]
    text = {"vocab_size": len(tok), "hidden_size": text_hidden,
            "intermediate_size": 2 * text_hidden, "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
            "max_position_embeddings": 2048, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": list(mrope_section)}}
    config = config_cls(
        vision_config=vision, text_config=text, tie_word_embeddings=False,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    save_random_model(
        model_cls, config, out, std=std, seed=seed, eos_token_id=tok.eos_token_id,
        norm_gain=lambda name: name.endswith(("norm.weight", "norm1.weight", "norm2.weight",
                                              "ln_q.weight")))
    # The image processor alone, flat in preprocessor_config.json: a whole Qwen2VLProcessor
    # needs the video processor, which needs torchvision. The PIL backend saves the same config
    # as the default (torchvision) one.
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=min_pixels,
                                                            max_pixels=max_pixels)
    image_processor.save_pretrained(out)
    return out


DEMO_MODEL = "mmserve-demo-shapes"


def demo_model_path() -> Path | None:
    """The trained demo VLM shipped in the repository (deploy/demo_model/checkpoint), if this
    is a source checkout / editable install that has it."""
    path = Path(__file__).resolve().parents[1] / "deploy" / "demo_model" / "checkpoint"
    return path if (path / "config.json").is_file() else None


def default_model() -> tuple[Path, str]:
    """(folder, served name) of the built-in default: the trained demo model, else (e.g. a
    wheel install without deploy/) the random placeholder."""
    demo = demo_model_path()
    if demo is not None:
        return demo, DEMO_MODEL
    return default_model_path(), DEFAULT_RANDOM_MODEL


def default_model_path() -> Path:
    """The random placeholder model, created on first use under the mmserve cache folder."""
    from frontend.env import cache_dir

    path = cache_dir() / DEFAULT_RANDOM_MODEL
    if not (path / "config.json").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        build_random_checkpoint(tmp, num_layers=2, hidden_size=128, intermediate_size=256)
        meta = {"note": "random weights, placeholder default model of mmserve"}
        (tmp / "mmserve_model.json").write_text(json.dumps(meta))
        try:
            tmp.rename(path)
        except OSError:  # another process won the race; use its copy
            pass
    return path
