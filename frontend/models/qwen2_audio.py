"""Qwen2-Audio, frontend slice: each clip's placeholder count depends on its duration
(`protocol.geometry.qwen2_audio`), so the frontend sizes it from the probed header, and a clip
sent by uuid alone is placed only when its geometry is known (seen here or in the encoders).

Qwen2-Audio's chat template writes ``Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>`` per clip;
``<|AUDIO|>`` is the token widened to the clip's run, bos/eos stay single text tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from frontend.models import MediaPlaceholders
from protocol.checkpoint import audio_processor_config
from protocol.geometry.qwen2_audio import Qwen2AudioGeometry


class Qwen2AudioPlaceholders(MediaPlaceholders):
    image_token_id = None

    def __init__(self, config: dict[str, Any], geometry: Qwen2AudioGeometry):
        text = config.get("text_config") or config
        try:
            self.audio_token_id = int(config.get("audio_token_index",
                                                 config.get("audio_token_id")))
            self.hidden_size = int(text["hidden_size"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("config.json needs audio_token_index and hidden_size") from None
        self.geometry = geometry

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Qwen2AudioPlaceholders:
        folder = Path(model_dir)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return cls(config, Qwen2AudioGeometry(config, audio_processor_config(folder) or {}))

    def placeholder_text(self, tokenizer: Any, modality: str = "audio") -> str:
        """What a string-content template gets for one clip: the audio token wrapped in its
        bos/eos tokens, as Qwen2-Audio's template writes it (when the tokenizer has them)."""
        pad = tokenizer.convert_ids_to_tokens(self.token_id(modality))
        vocab = tokenizer.get_vocab()
        if "<|audio_bos|>" in vocab and "<|audio_eos|>" in vocab:
            return f"<|audio_bos|>{pad}<|audio_eos|>"
        return pad
