"""LLaVA-1.5: the CLIP processor resizes and center-crops every image to one square, the tower
cuts it into (side // patch)^2 patches plus a CLS token, and the "default" feature strategy drops
the CLS token ("full" keeps it). So every image has the same geometry, whatever its size."""

from __future__ import annotations

from typing import Any

from protocol.geometry import ItemGeometry, MediaGeometry

# Defaults of transformers' CLIPVisionConfig, for configs saved without the default values.
_CLIP_IMAGE_SIZE = 224
_CLIP_PATCH_SIZE = 32


class LlavaGeometry(MediaGeometry):
    def __init__(self, config: dict[str, Any], processor: dict[str, Any]):
        super().__init__(config, processor)
        vision = config.get("vision_config") or {}
        tower_side = int(vision.get("image_size", _CLIP_IMAGE_SIZE))
        patch = int(vision.get("patch_size", _CLIP_PATCH_SIZE))
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {strategy!r} is not 'default' or "
                             "'full'")
        height, width = processed_size(processor, tower_side)
        if patch < 1 or min(height, width) < patch:
            raise ValueError(f"image size {(height, width)} and patch size {patch} don't fit")
        patches = (height // patch) * (width // patch)
        self.fixed_image = ItemGeometry(patches + (strategy == "full"), None, (height, width))

    def image(self, width: int, height: int, images_in_prompt: int = 1) -> ItemGeometry:
        return self.fixed_image  # resize + center crop: independent of the input size


def processed_size(proc: dict[str, Any], tower_side: int) -> tuple[int, int]:
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
