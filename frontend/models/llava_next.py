"""LLaVA-NeXT, frontend slice: each image's placeholder count depends on its size (anyres
tiling, `protocol.geometry.llava_next`), so the frontend sizes it from the probed header, and an
item sent by uuid alone cannot be placed. The template's single ``<image>`` token is the one
widened to the item's run, as in LLaVA-1.5."""

from __future__ import annotations

import json
from pathlib import Path

from frontend.models import MediaPlaceholders
from protocol.checkpoint import image_processor_config
from protocol.geometry.llava_next import LlavaNextGeometry

_IMAGE_TOKEN = 32000  # transformers' LlavaNextConfig default, for configs saved without it
_LLAMA_HIDDEN = 4096  # transformers' LlamaConfig default (the text_config default)


class LlavaNextPlaceholders(MediaPlaceholders):
    def __init__(self, image_token_id: int, geometry: LlavaNextGeometry, hidden_size: int):
        self.image_token_id = image_token_id
        self.geometry = geometry
        self.hidden_size = hidden_size

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> LlavaNextPlaceholders:
        folder = Path(model_dir)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        token = config.get("image_token_index", config.get("image_token_id", _IMAGE_TOKEN))
        if not isinstance(token, int):
            raise ValueError(f"{folder}/config.json: image_token_index {token!r} is not an int")
        hidden = int((config.get("text_config") or {}).get("hidden_size", _LLAMA_HIDDEN))
        geometry = LlavaNextGeometry(config, image_processor_config(folder) or {})
        return cls(token, geometry, hidden)
