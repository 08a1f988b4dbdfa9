"""Qwen2-VL and Qwen2.5-VL, frontend slice: each image's placeholder count depends on its size
(dynamic resolution, `protocol.geometry.qwen2_vl`), so the frontend sizes it from the probed
header, and an item sent by uuid alone cannot be placed (its size is unknown). A video's count
also depends on its sampled frames, from the probed frame count and rate.

The chat template writes ``<|vision_start|><|image_pad|><|vision_end|>`` per image and
``<|vision_start|><|video_pad|><|vision_end|>`` per video; the pad token is the one widened to
the item's run, the start/end tokens stay single text tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from frontend.models import MediaPlaceholders
from protocol.checkpoint import image_processor_config, video_processor_config
from protocol.geometry.qwen2_vl import Qwen2VLGeometry


class Qwen2VLPlaceholders(MediaPlaceholders):
    def __init__(self, config: dict[str, Any], geometry: Qwen2VLGeometry):
        text = config.get("text_config") or config
        try:
            self.image_token_id = int(config["image_token_id"])
            self.hidden_size = int(text["hidden_size"])
            video = config.get("video_token_id")
            self.video_token_id = None if video is None else int(video)
        except (KeyError, TypeError, ValueError):
            raise ValueError("config.json needs image_token_id and hidden_size") from None
        self.vision_start_token_id = config.get("vision_start_token_id")
        self.vision_end_token_id = config.get("vision_end_token_id")
        self.geometry = geometry

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Qwen2VLPlaceholders:
        folder = Path(model_dir)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return cls(config, Qwen2VLGeometry(config, image_processor_config(folder) or {},
                                           video_processor_config(folder)))

    def placeholder_text(self, tokenizer: Any, modality: str = "image") -> str:
        """What a string-content template gets for one media part: the pad wrapped in its
        vision start/end tokens, as Qwen's own templates write it."""
        ids = [self.vision_start_token_id, self.token_id(modality), self.vision_end_token_id]
        return "".join(tokenizer.convert_ids_to_tokens(i) for i in ids if i is not None)
