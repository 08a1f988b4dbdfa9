"""LLaVA-NeXT (LLaVA-1.6): the anyres tiling of `protocol.geometry.llava_onevision`
(`AnyresGeometry`) with a CLIP tower. Differences from OneVision, all from transformers'
LlavaNext processor and model:

- the "default" feature strategy: CLIP's CLS token is dropped, so a tile gives (side / patch)^2
  features ("full" would keep it, and the packing has no place for it);
- no anyres_max shrink: the unpadded map is kept whole, each row ending in the image newline;
- every image of a prompt is tiled, one or many (no base-tile variant);
- the image processor cuts tiles of its ``crop_size`` and resizes the base tile to its ``size``
  (shortest edge), which must both be the tower's side;
- no video.

So an image of any size becomes ``side^2 + rows * cols + rows`` placeholder tokens.
"""

from __future__ import annotations

from typing import Any

from protocol.geometry.llava_onevision import AnyresGeometry, square_side

# transformers' LlavaNextConfig defaults (its CLIP ViT-L/14 at 336 px), for configs saved
# without them.
DEFAULT_IMAGE_SIZE = 336
DEFAULT_PATCH_SIZE = 14
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


class LlavaNextGeometry(AnyresGeometry):
    default_image_size = DEFAULT_IMAGE_SIZE
    default_patch_size = DEFAULT_PATCH_SIZE
    default_pinpoints = DEFAULT_PINPOINTS
    strategy = "default"
    strategy_why = "'full' keeps CLIP's CLS token, which the anyres packing has no row for"

    def processor_tile(self, processor: dict[str, Any]) -> tuple[Any, Any]:
        """The base tile's size (``size``); the other tiles are ``crop_size`` squares (its
        height, as transformers reads it), which must be the same."""
        base = square_side(processor.get("size"), self.tile)
        crop = processor.get("crop_size")
        cut = crop if isinstance(crop, int) else (crop or {}).get("height", base[0])
        if cut != base[0] or base[0] != base[1]:
            raise ValueError(f"the image processor resizes the base tile to {tuple(base)} but "
                             f"cuts {cut} px tiles: anyres needs one square tile size")
        return base
