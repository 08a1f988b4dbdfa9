"""Ultravox, frontend slice: each clip's placeholder count depends on its duration
(`protocol.geometry.ultravox`), sized from the probed header.

Prompts hold ``<|audio|>`` where a clip goes; it becomes the config's ``audio_token_index``,
widened to the clip's run. A tokenizer may have it as that id's token (the tiny checkpoint's
default), or not at all: the released checkpoints' Llama 3 tokenizers spell it as ordinary
tokens and their ``audio_token_index`` is one past the vocabulary, so the text is found in the
prompt and the id substituted for it (`MediaPlaceholders.substitute_text_placeholders`, as
vLLM does); the decoder never looks that id up (`llm_worker.runner`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from frontend.models import MediaPlaceholders
from protocol.checkpoint import audio_processor_config
from protocol.geometry.ultravox import UltravoxGeometry


class UltravoxPlaceholders(MediaPlaceholders):
    image_token_id = None

    def __init__(self, config: dict[str, Any], geometry: UltravoxGeometry):
        text = config.get("text_config") or {}
        try:
            self.audio_token_id = int(config["audio_token_index"])
            self.hidden_size = int(text["hidden_size"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("config.json needs audio_token_index and text_config.hidden_size"
                             ) from None
        self.geometry = geometry

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> UltravoxPlaceholders:
        folder = Path(model_dir)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return cls(config, UltravoxGeometry(config, audio_processor_config(folder) or {}))

    def placeholder_text(self, tokenizer: Any, modality: str = "audio") -> str:
        """What a string-content template gets for one clip: Ultravox's ``<|audio|>``."""
        return "<|audio|>"
