"""LLaVA-OneVision: "anyres" tiling. An image is resized, keeping its aspect ratio, into the
candidate canvas (``image_grid_pinpoints``) that keeps the most of its pixels and wastes the
least, padded to fill it, and cut into tiles of the tower's side; a copy of the whole image
squashed to one tile goes first. Each tile gives a (side / patch)^2 feature map; the tiles' maps
are laid out as one big map, the rows or columns that only saw padding are cut away, the map is
shrunk (bilinear) when it holds more than ``anyres_max_N`` tiles' worth of features, and each of
its rows ends with one learned "image newline" row. So the placeholder count is
``base + rows * cols + rows``.

Every image is tiled, one or many per prompt (as vLLM does): the count must follow from the
image alone. transformers' processor instead squashes each image of a multi-image prompt to one
tile; the parity tests use its single-image (tiled) path for every image.

The arithmetic follows transformers' processor and model exactly (the int() truncations and the
7-digit rounding of the unpad included): a count the frontend computes must be the row count the
encoder's packing produces.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from protocol.geometry import ItemGeometry, MediaGeometry

# transformers' LlavaOnevisionConfig / SiglipVisionConfig defaults, for configs saved without
# them.
DEFAULT_IMAGE_SIZE = 384
DEFAULT_PATCH_SIZE = 14
DEFAULT_ASPECT_RATIO = "anyres_max_9"
DEFAULT_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]
# Shrinking starts only past this factor of the anyres_max budget (the reference's threshold).
_SHRINK_SLACK = 1.1


class AnyresLayout(NamedTuple):
    """How one image is tiled and packed; the encoder follows it step by step."""

    canvas_hw: tuple[int, int]  # the chosen pinpoint (height, width), px
    resized_hw: tuple[int, int]  # the image resized into the canvas, before padding, px
    tiles_hw: tuple[int, int]  # tiles down and across the canvas
    kept_hw: tuple[int, int]  # the tiles' feature map after cutting the padding away
    packed_hw: tuple[int, int]  # after the anyres_max shrink (= kept_hw when none)
    num_tokens: int  # base tile + packed rows * cols + one newline per packed row


def best_canvas(height: int, width: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """The (height, width) pinpoint that keeps the most of the image's pixels once it is scaled
    to fit, the least empty area breaking ties (the first one wins a full tie)."""
    best, most_kept, least_wasted = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = ph * pw - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (ph, pw), kept, wasted
    return best


def fit_inside(height: int, width: int, canvas_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image scaled to touch the canvas on one side, the other side
    rounded up (but never past the canvas)."""
    ch, cw = canvas_hw
    if cw / width < ch / height:
        return min(math.ceil(height * cw / width), ch), cw
    return ch, min(math.ceil(width * ch / height), cw)


def parse_max_tiles(aspect_ratio: str) -> int:
    """``anyres_max_N`` -> N, the feature budget in tiles."""
    prefix = "anyres_max_"
    digits = aspect_ratio.removeprefix(prefix)
    if not aspect_ratio.startswith(prefix) or not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"vision_aspect_ratio {aspect_ratio!r} is not 'anyres_max_<N>'")
    return int(digits)


class LlavaOnevisionGeometry(MediaGeometry):
    """Tower settings from config.json, the canvas candidates from the image processor (which
    tiles), checked against the model's (which packs): they must be the same list."""

    def __init__(self, config: dict[str, Any], processor: dict[str, Any]):
        super().__init__(config, processor)
        vision = config.get("vision_config") or {}
        self.tile = int(vision.get("image_size", DEFAULT_IMAGE_SIZE))
        patch = int(vision.get("patch_size", DEFAULT_PATCH_SIZE))
        if patch < 1 or self.tile < patch:
            raise ValueError(f"tower image size {self.tile} and patch size {patch} don't fit")
        self.side = self.tile // patch  # features along a tile's side
        strategy = config.get("vision_feature_select_strategy", "full")
        if strategy != "full":  # SigLIP has no CLS token: "default" would drop a real patch
            raise ValueError(f"vision_feature_select_strategy {strategy!r}: only 'full' is "
                             "supported (the SigLIP tower has no CLS token)")
        self.max_tiles = parse_max_tiles(config.get("vision_aspect_ratio", DEFAULT_ASPECT_RATIO))
        model_pins = config.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
        self.pinpoints = [[int(h), int(w)] for h, w in
                          processor.get("image_grid_pinpoints", model_pins)]
        if self.pinpoints != [[int(h), int(w)] for h, w in model_pins]:
            raise ValueError("image_grid_pinpoints of the image processor and of config.json "
                             "differ")
        if not self.pinpoints or any(h < self.tile or w < self.tile or h % self.tile or w % self.tile
               for h, w in self.pinpoints):
            raise ValueError(f"image_grid_pinpoints {self.pinpoints} are not multiples of the "
                             f"tower's {self.tile} px tile")
        size = processor.get("size") or {"height": self.tile, "width": self.tile}
        tile_hw = (size.get("height"), size.get("width")) if "height" in size else \
            (size.get("shortest_edge"),) * 2
        if tuple(tile_hw) != (self.tile, self.tile):
            raise ValueError(f"the image processor makes {tile_hw} tiles but the tower takes "
                             f"{self.tile}x{self.tile}")

    def layout(self, width: int, height: int) -> AnyresLayout:
        """Every step's size for an image of ``width`` x ``height`` pixels."""
        if min(width, height) < 1:
            raise ValueError(f"image of {width}x{height} pixels has no area")
        canvas = best_canvas(height, width, self.pinpoints)
        tiles = (canvas[0] // self.tile, canvas[1] // self.tile)
        rows, cols = tiles[0] * self.side, tiles[1] * self.side
        # Cut the padding: the side the image did not fill keeps its rounded scaled length,
        # split evenly (a floor on each end, as the reference's slice does).
        if width / height > cols / rows:
            rows -= (rows - int(round(height * (cols / width), 7))) // 2 * 2
        else:
            cols -= (cols - int(round(width * (rows / height), 7))) // 2 * 2
        kept = (rows, cols)
        ratio = math.sqrt(rows * cols / (self.max_tiles * self.side ** 2))
        if ratio > _SHRINK_SLACK:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return AnyresLayout(canvas, fit_inside(height, width, canvas), tiles, kept,
                            (rows, cols), self.side ** 2 + rows * cols + rows)

    def image(self, width: int, height: int, images_in_prompt: int = 1) -> ItemGeometry:
        if images_in_prompt > 1:
            # transformers' processor tiles only a prompt's single image; each image of a
            # multi-image prompt is its base tile (resized whole) and one newline row.
            self.layout(width, height)  # the same refusals
            return ItemGeometry(self.side ** 2 + 1, None, (self.tile, self.tile), variant="base")
        plan = self.layout(width, height)
        return ItemGeometry(plan.num_tokens, None, plan.canvas_hw)
