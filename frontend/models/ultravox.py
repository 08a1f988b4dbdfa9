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

from typing import Any

from frontend.models import AudioPlaceholders
from protocol.geometry.ultravox import UltravoxGeometry


class UltravoxPlaceholders(AudioPlaceholders):
    geometry_class = UltravoxGeometry

    def placeholder_text(self, tokenizer: Any, modality: str = "audio") -> str:
        """What a string-content template gets for one clip: Ultravox's ``<|audio|>``."""
        return "<|audio|>"
