"""LLaVA-OneVision, frontend slice: each image's placeholder count depends on its size (anyres
tiling, `protocol.geometry.llava_onevision`), so the frontend sizes it from the probed header,
and an item sent by uuid alone cannot be placed. The template's single ``<image>`` token is the
one widened to the item's run, as in LLaVA-1.5; a video's single ``<video>`` token
(``video_token_index``) is widened to its frames' pooled rows plus one newline row."""

from __future__ import annotations

import json
from pathlib import Path

from frontend.models import MediaPlaceholders
from protocol.checkpoint import image_processor_config, video_processor_config
from protocol.geometry.llava_onevision import LlavaOnevisionGeometry


class LlavaOnevisionPlaceholders(MediaPlaceholders):
    def __init__(self, image_token_id: int, geometry: LlavaOnevisionGeometry, hidden_size: int,
                 video_token_id: int | None = None):
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id  # None: a checkpoint without one takes no video
        self.geometry = geometry
        self.hidden_size = hidden_size

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> LlavaOnevisionPlaceholders:
        folder = Path(model_dir)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        token = config.get("image_token_index", config.get("image_token_id"))
        video = config.get("video_token_index", config.get("video_token_id"))
        hidden = (config.get("text_config") or {}).get("hidden_size")
        if not isinstance(token, int) or not isinstance(hidden, int):
            raise ValueError(f"{folder}/config.json needs image_token_index and "
                             "text_config.hidden_size")
        if video is not None and (not isinstance(video, int) or video == token):
            raise ValueError(f"{folder}/config.json: video_token_index {video!r} must be an "
                             "int other than image_token_index")
        geometry = LlavaOnevisionGeometry(config, image_processor_config(folder) or {},
                                          video_processor_config(folder))
        return cls(token, geometry, hidden, video)
