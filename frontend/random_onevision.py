"""A tiny random LLaVA-OneVision checkpoint in the Hugging Face layout, for the parity tests.

Kept apart from `frontend/random_model.py` (whose tokenizer and templates it reuses) so that file
stays one builder per family it already had.
"""

from __future__ import annotations

import os
from pathlib import Path

from frontend.random_model import (
    IMAGE_TOKEN,
    build_tokenizer,
    is_norm_gain,
    save_random_model,
    tiny_text_kwargs,
)

VIDEO_TOKEN = "<video>"
# ChatML rendering image parts as <image> and video parts as <video>, as OneVision's own
# template does (`random_model.CHATML_MM_TEMPLATE` knows only images).
ONEVISION_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'video' %}{{ '<video>' }}{% endif %}{% endfor %}{% endif %}"
    "{% if not (loop.last and continue_final_message) %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Tower-size multiples up to 3 tiles a side, so tiles go 1x1 to 3x1 / 1x3 and 2x2.
TINY_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


def build_random_llava_onevision(
    out_dir: str | os.PathLike,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    num_layers: int = 2,
    grid_pinpoints: list[list[int]] | None = None,
    vision_aspect_ratio: str = "anyres_max_2",
    std: float = 0.2,
    seed: int = 0,
) -> Path:
    """A tiny random `LlavaOnevisionForConditionalGeneration` (SigLIP tower, MLP projector,
    image newline, Qwen2 LM) with a tokenizer holding ``<image>`` and ``<video>``
    (``video_token_index``), a chat template with image and video parts and the image
    processor config (whose settings the video half reads too, as transformers does).

    The defaults make a tile 4x4 = 16 features; ``anyres_max_2`` lets up to 2 tiles' worth of
    unpadded features through, so a 2x2-tile image is downsampled and a 1x2 one is not (both
    paths of the model's packing run in the tests). ``std`` 0.2: at 0.1-0.15 this model's
    ~50 image rows per image often drown the prompt and greedy answers collapse to one token
    whatever the image (a swap test could not tell images apart).
    """
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, chat_template=ONEVISION_TEMPLATE)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    tok.add_tokens([VIDEO_TOKEN], special_tokens=True)
    tok.save_pretrained(out)
    pinpoints = grid_pinpoints or TINY_PINPOINTS
    vision = transformers.SiglipVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=2,
        num_attention_heads=2, image_size=image_size, patch_size=patch_size,
        vision_use_head=False,
    )
    text = transformers.Qwen2Config(**tiny_text_kwargs(tok, text_hidden, num_layers),
                                    tie_word_embeddings=False)
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tok.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints, vision_aspect_ratio=vision_aspect_ratio,
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    save_random_model(transformers.LlavaOnevisionForConditionalGeneration, config, out, std=std,
                      seed=seed, norm_gain=is_norm_gain,
                      eos_token_id=tok.eos_token_id)
    # The image processor alone, flat in preprocessor_config.json: the whole processor needs the
    # video processor, which needs torchvision. OneVision normalizes with mean = std = 0.5.
    image_processor = transformers.LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    image_processor.save_pretrained(out)
    return out
