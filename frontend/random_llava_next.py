"""A tiny random LLaVA-NeXT checkpoint in the Hugging Face layout, for the parity tests.

Kept apart from `frontend/random_model.py` (whose tokenizer, template and random init it reuses),
as `random_onevision.py` is.
"""

from __future__ import annotations

import os
from pathlib import Path

from frontend.random_model import (
    CHATML_MM_TEMPLATE,
    IMAGE_TOKEN,
    build_tokenizer,
    is_norm_gain,
    save_random_model,
    tiny_clip_vision,
    tiny_text_kwargs,
)

# The released checkpoints' five canvases (1x2, 2x1, 2x2, 3x1, 1x3 tiles), at a 32 px tile.
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]


def build_random_llava_next(
    out_dir: str | os.PathLike,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    num_layers: int = 2,
    grid_pinpoints: list[list[int]] | None = None,
    std: float = 0.15,
    seed: int = 0,
) -> Path:
    """A tiny random `LlavaNextForConditionalGeneration` (CLIP tower, LLaVA-1.5 projector, image
    newline, Llama LM; "default" strategy and feature layer -2, as the released checkpoints)
    saved with a `LlavaNextProcessor` (its PIL image processor: the torchvision one needs
    torchvision) and a chat template with image parts.

    The defaults make a tile 4x4 = 16 features: an image is 16 base rows plus up to 3 tiles'
    worth of unpadded rows and their newlines.
    """
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, chat_template=CHATML_MM_TEMPLATE)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    pinpoints = grid_pinpoints or TINY_PINPOINTS
    vision = tiny_clip_vision(vision_hidden, image_size, patch_size)
    text = transformers.LlamaConfig(**tiny_text_kwargs(tok, text_hidden, num_layers),
                                    tie_word_embeddings=False)
    config = transformers.LlavaNextConfig(
        vision_config=vision, text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_grid_pinpoints=pinpoints, projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    save_random_model(transformers.LlavaNextForConditionalGeneration, config, out, std=std,
                      seed=seed, norm_gain=is_norm_gain, eos_token_id=tok.eos_token_id)
    image_processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
        vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
        chat_template=CHATML_MM_TEMPLATE, num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
    return out
