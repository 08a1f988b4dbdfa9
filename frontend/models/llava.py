"""LLaVA-1.5, frontend slice: every image becomes the same number of placeholder tokens.

The CLIP processor resizes and center-crops each image to a fixed square, the tower cuts it into
(side // patch)^2 patches plus a CLS token, and the "default" feature strategy drops the CLS
token ("full" keeps it). So the count never depends on the input size, which also lets an item
sent by uuid alone be placed without its bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from frontend.models import MediaPlaceholders
from protocol.checkpoint import image_processor_config

# Defaults of transformers' CLIPVisionConfig, for configs saved without the default values.
_CLIP_IMAGE_SIZE = 224
_CLIP_PATCH_SIZE = 32
_LLAMA_HIDDEN = 4096


class LlavaPlaceholders(MediaPlaceholders):
    def __init__(self, image_token_id: int, image_size: tuple[int, int], patch_size: int,
                 select_strategy: str, hidden_size: int):
        if select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {select_strategy!r} is not "
                             "'default' or 'full'")
        if patch_size < 1 or min(image_size) < patch_size:
            raise ValueError(f"image size {image_size} and patch size {patch_size} don't fit")
        self.image_token_id = image_token_id
        self.image_size = image_size  # (height, width) the tower sees after preprocessing
        self.patch_size = patch_size
        self.select_strategy = select_strategy
        self.hidden_size = hidden_size
        height, width = image_size
        patches = (height // patch_size) * (width // patch_size)
        self._count = patches + (1 if select_strategy == "full" else 0)  # + CLS for "full"

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> LlavaPlaceholders:
        folder = Path(model_dir)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        token = config.get("image_token_index", config.get("image_token_id"))
        if not isinstance(token, int):
            raise ValueError(f"{folder}/config.json has no image_token_index")
        vision = config.get("vision_config") or {}
        tower_side = int(vision.get("image_size", _CLIP_IMAGE_SIZE))
        patch = int(vision.get("patch_size", _CLIP_PATCH_SIZE))
        hidden = int((config.get("text_config") or {}).get("hidden_size", _LLAMA_HIDDEN))
        strategy = config.get("vision_feature_select_strategy", "default")
        size = _processed_size(image_processor_config(folder) or {}, tower_side)
        return cls(token, size, patch, strategy, hidden)

    def num_image_tokens(self, width: int, height: int) -> int:
        return self._count  # resize + center crop make it independent of the input size

    @property
    def fixed_num_image_tokens(self) -> int | None:
        return self._count



def _processed_size(proc: dict[str, Any], tower_side: int) -> tuple[int, int]:
    """(height, width) of the pixel values the processor hands the tower."""
    if proc.get("do_center_crop", True) and "crop_size" in proc:
        return _hw(proc["crop_size"], tower_side)
    size = proc.get("size")
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    return tower_side, tower_side  # shortest-edge resize without crop: the tower's own size


def _hw(value: Any, default: int) -> tuple[int, int]:
    if isinstance(value, int):  # old configs: "crop_size": 336
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    return default, default
