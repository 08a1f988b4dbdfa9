"""Shared by the LLaVA end-to-end tests: images, and transformers' greedy answer for a prompt."""

from __future__ import annotations

import io

import numpy as np
import torch
import transformers
from PIL import Image


def image(seed: int, size=(40, 50)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), np.uint8))


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class HFLlava:
    def __init__(self, path: str):
        self.proc = transformers.AutoProcessor.from_pretrained(path)
        self.model = transformers.LlavaForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32)

    def chat_prompt(self, content: list[dict]) -> str:
        """Render like a chat request whose media parts are images (in the same order)."""
        parts = [{"type": "image"} if p["type"] != "text" else p for p in content]
        return self.proc.apply_chat_template([{"role": "user", "content": parts}],
                                             add_generation_prompt=True)

    def greedy(self, prompt: str, images: list[Image.Image], n: int) -> list[int]:
        inputs = self.proc(images=images or None, text=prompt, return_tensors="pt")
        # ignore_eos lets EOS be generated; no eos ids (not min_new_tokens, which forbids EOS)
        out = self.model.generate(**inputs, max_new_tokens=n, eos_token_id=[], do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    def features(self, img: Image.Image) -> torch.Tensor:
        pixels = self.proc(images=[img], text="<image>", return_tensors="pt")["pixel_values"]
        feats = self.model.get_image_features(pixel_values=pixels)
        feats = getattr(feats, "pooler_output", feats)
        if isinstance(feats, (list, tuple)):
            feats = torch.cat(list(feats))
        return feats.reshape(-1, feats.shape[-1]).detach()  # [num_tokens, hidden]
