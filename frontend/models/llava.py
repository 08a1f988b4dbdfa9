"""LLaVA-1.5, frontend slice: every image becomes the same number of placeholder tokens
(`protocol.geometry.llava`), which also lets an item sent by uuid alone be placed without its
bytes."""

from __future__ import annotations

import json
from pathlib import Path

from frontend.models import MediaPlaceholders
from protocol.checkpoint import image_processor_config
from protocol.geometry.llava import LlavaGeometry

_LLAMA_HIDDEN = 4096  # transformers' LlamaConfig default, for configs saved without it


class LlavaPlaceholders(MediaPlaceholders):
    def __init__(self, image_token_id: int, geometry: LlavaGeometry, hidden_size: int):
        self.image_token_id = image_token_id
        self.geometry = geometry
        self.hidden_size = hidden_size

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> LlavaPlaceholders:
        folder = Path(model_dir)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        token = config.get("image_token_index", config.get("image_token_id"))
        if not isinstance(token, int):
            raise ValueError(f"{folder}/config.json has no image_token_index")
        hidden = int((config.get("text_config") or {}).get("hidden_size", _LLAMA_HIDDEN))
        return cls(token, LlavaGeometry(config, image_processor_config(folder) or {}), hidden)
