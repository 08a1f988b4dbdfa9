"""Shared by the Qwen2-VL end-to-end tests: transformers' greedy answer for a prompt with images.

transformers' `Qwen2VLProcessor` needs torchvision (for its video half), so the reference is
assembled from its parts: the PIL image processor gives pixel values and grids, each
``<|image_pad|>`` is widened to its grid's count and marked in ``mm_token_type_ids`` as the
processor does, and the model generates from those."""

from __future__ import annotations

import numpy as np
import torch
import transformers
from PIL import Image

VISION = "<|vision_start|><|image_pad|><|vision_end|>"
MODELS = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
          "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}


def image(seed: int, size=(40, 50)) -> Image.Image:
    """A random RGB image of (height, width) ``size``."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), np.uint8))


class HFQwen2VL:
    def __init__(self, path: str, arch: str = "qwen2_vl"):
        self.tok = transformers.AutoTokenizer.from_pretrained(path)
        self.images = transformers.Qwen2VLImageProcessorPil.from_pretrained(path)
        self.model = MODELS[arch].from_pretrained(path, dtype=torch.float32).eval()
        self.pad = self.model.config.image_token_id

    def chat_prompt(self, content: list[dict]) -> str:
        parts = [{"type": "image"} if p["type"] != "text" else p for p in content]
        return self.tok.apply_chat_template([{"role": "user", "content": parts}],
                                            add_generation_prompt=True, tokenize=False)

    def greedy(self, prompt: str, images: list[Image.Image], n: int) -> list[int]:
        ids = self.tok.encode(prompt, add_special_tokens=False)
        kw = {}
        if images:
            inputs = self.images(images=images, return_tensors="pt")
            counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
            assert ids.count(self.pad) == len(counts)
            widened, k = [], 0
            for t in ids:
                widened.extend([t] * (counts[k] if t == self.pad else 1))
                k += t == self.pad
            ids = widened
            kw = {"pixel_values": inputs["pixel_values"],
                  "image_grid_thw": inputs["image_grid_thw"],
                  # which tokens are image rows: M-RoPE positions come from it (the processor's
                  # output; without it transformers falls back to 1-D positions in generate)
                  "mm_token_type_ids": torch.tensor([[int(t == self.pad) for t in ids]])}
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
        return out[0, len(ids):].tolist()
