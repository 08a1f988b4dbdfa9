"""LLaVA-OneVision: "anyres" tiling. An image is resized, keeping its aspect ratio, into the
candidate canvas (``image_grid_pinpoints``) that keeps the most of its pixels and wastes the
least, padded to fill it, and cut into tiles of the tower's side; a copy of the whole image
squashed to one tile goes first. Each tile gives a (side / patch)^2 feature map; the tiles' maps
are laid out as one big map, the rows or columns that only saw padding are cut away, the map is
shrunk (bilinear) when it holds more than ``anyres_max_N`` tiles' worth of features, and each of
its rows ends with one learned "image newline" row. So the placeholder count is
``base + rows * cols + rows``.

A prompt's single image is tiled; each image of a multi-image prompt is its base tile alone
(padded to a square) and one newline row, as transformers' processor does (`ItemGeometry.variant`
"base", so the count also depends on the prompt's image count).

`AnyresGeometry` is the arithmetic LLaVA-NeXT shares (`protocol/geometry/llava_next.py`: a CLIP
tower whose CLS token is dropped, no shrink, every image tiled).

The arithmetic follows transformers' processor and model exactly (the int() truncations and the
7-digit rounding of the unpad included): a count the frontend computes must be the row count the
encoder's packing produces.

A video is sampled to some of its frames (`sample_frames`); each frame is resized whole to one
tile (no anyres), its feature map pooled 2x2 (bilinear, to ceil(side / 2) a side), and the
frames' rows are followed by ONE image newline row for the whole video. So ``<video>`` becomes
``frames * ceil(side / 2)^2 + 1`` tokens.
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
# Frames taken when neither num_frames nor fps is asked for or configured (vLLM's default).
DEFAULT_NUM_FRAMES = 32


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


def square_side(size: Any, default: int) -> tuple[Any, Any]:
    """(height, width) a processor's ``size`` resizes to: {height, width} or {shortest_edge}."""
    size = size or {"height": default, "width": default}
    if "height" in size:
        return size.get("height"), size.get("width")
    return (size.get("shortest_edge"),) * 2


class AnyresGeometry(MediaGeometry):
    """The anyres arithmetic LLaVA-NeXT and LLaVA-OneVision share. Tower settings come from
    config.json, the canvas candidates from the image processor (which tiles), checked against
    the model's (which packs): they must be the same list. A subclass names its tower's
    defaults, the feature strategy its tower needs and the tile its image processor cuts."""

    default_image_size = DEFAULT_IMAGE_SIZE
    default_patch_size = DEFAULT_PATCH_SIZE
    default_pinpoints = DEFAULT_PINPOINTS
    strategy = "full"  # the only vision_feature_select_strategy the packing can lay out
    strategy_why = "the SigLIP tower has no CLS token: 'default' would drop a real patch"
    max_tiles: int | None = None  # the anyres_max_N budget; None: the map is never shrunk

    def __init__(self, config: dict[str, Any], processor: dict[str, Any]):
        super().__init__(config, processor)
        vision = config.get("vision_config") or {}
        self.tile = int(vision.get("image_size", self.default_image_size))
        patch = int(vision.get("patch_size", self.default_patch_size))
        if patch < 1 or self.tile < patch:
            raise ValueError(f"tower image size {self.tile} and patch size {patch} don't fit")
        self.side = self.tile // patch  # features along a tile's side
        strategy = config.get("vision_feature_select_strategy", self.strategy)
        if strategy != self.strategy:
            raise ValueError(f"vision_feature_select_strategy {strategy!r}: only "
                             f"{self.strategy!r} is supported ({self.strategy_why})")
        model_pins = config.get("image_grid_pinpoints") or self.default_pinpoints
        self.pinpoints = [[int(h), int(w)] for h, w in
                          processor.get("image_grid_pinpoints", model_pins)]
        if self.pinpoints != [[int(h), int(w)] for h, w in model_pins]:
            raise ValueError("image_grid_pinpoints of the image processor and of config.json "
                             "differ")
        if not self.pinpoints or any(h < self.tile or w < self.tile or h % self.tile or w % self.tile
               for h, w in self.pinpoints):
            raise ValueError(f"image_grid_pinpoints {self.pinpoints} are not multiples of the "
                             f"tower's {self.tile} px tile")
        tile_hw = self.processor_tile(processor)
        if tuple(tile_hw) != (self.tile, self.tile):
            raise ValueError(f"the image processor makes {tile_hw} tiles but the tower takes "
                             f"{self.tile}x{self.tile}")

    def processor_tile(self, processor: dict[str, Any]) -> tuple[Any, Any]:
        """(height, width) of the tiles (and the base tile) the image processor makes."""
        return square_side(processor.get("size"), self.tile)

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
        if self.max_tiles is not None:
            ratio = math.sqrt(rows * cols / (self.max_tiles * self.side ** 2))
            if ratio > _SHRINK_SLACK:
                rows, cols = int(rows // ratio), int(cols // ratio)
        return AnyresLayout(canvas, fit_inside(height, width, canvas), tiles, kept,
                            (rows, cols), self.side ** 2 + rows * cols + rows)

    def image(self, width: int, height: int, images_in_prompt: int = 1) -> ItemGeometry:
        plan = self.layout(width, height)
        return ItemGeometry(plan.num_tokens, None, plan.canvas_hw)


class LlavaOnevisionGeometry(AnyresGeometry):
    """Anyres with the anyres_max shrink and multi-image base tiles, plus video. Video settings
    come from the video processor config, else from the image one (as transformers falls back
    to preprocessor_config.json)."""

    takes_video = True

    def __init__(self, config: dict[str, Any], processor: dict[str, Any],
                 video_processor: dict[str, Any] | None = None):
        super().__init__(config, processor)
        self.max_tiles = parse_max_tiles(config.get("vision_aspect_ratio", DEFAULT_ASPECT_RATIO))
        video = processor if video_processor is None else video_processor
        # Saved without a size, like the image processor: the tower's (transformers' 384 px
        # default is the real towers' tile).
        frame_hw = square_side(video.get("size"), self.tile)
        if tuple(frame_hw) != (self.tile, self.tile):  # the model pools a tile's feature map
            raise ValueError(f"the video processor makes {frame_hw} frames but the tower takes "
                             f"{self.tile}x{self.tile}")
        # Only a video processor that samples has its own frame count or rate (transformers
        # keeps every frame it is handed otherwise).
        sampling = video.get("do_sample_frames")
        self.default_num_frames = video.get("num_frames") if sampling else None
        self.default_fps = video.get("fps") if sampling else None
        self.pooled = math.ceil(self.side / 2)  # the 2x2 bilinear pool of each frame's map

    def image(self, width: int, height: int, images_in_prompt: int = 1) -> ItemGeometry:
        if images_in_prompt > 1:
            # transformers' processor tiles only a prompt's single image; each image of a
            # multi-image prompt is its base tile (resized whole) and one newline row.
            self.layout(width, height)  # the same refusals
            return ItemGeometry(self.side ** 2 + 1, None, (self.tile, self.tile), variant="base")
        return super().image(width, height)

    def sample_frames(self, total: int, fps: float, num_frames: int | None = None,
                      sample_fps: float | None = None) -> list[int]:
        """transformers' default_sample_indices_fn: ``num_frames`` spread evenly, or
        ``sample_fps`` per second of video (at least one frame); neither: the video config's,
        else `DEFAULT_NUM_FRAMES`. A count of at least the video's frames takes them all
        (transformers raises instead; in-memory frames come with their own count)."""
        if num_frames is not None and sample_fps is not None:
            raise ValueError("num_frames and fps are mutually exclusive")
        if total < 1 or not fps > 0:
            raise ValueError(f"a video needs frames and a frame rate, got {total} frames at "
                             f"{fps:g} fps")
        if num_frames is None and sample_fps is None:
            num_frames, sample_fps = self.default_num_frames, self.default_fps
        if num_frames is None and sample_fps is not None:
            if not sample_fps > 0:
                raise ValueError(f"fps must be positive, got {sample_fps:g}")
            num_frames = max(1, int(total / fps * sample_fps))
        n = DEFAULT_NUM_FRAMES if num_frames is None else int(num_frames)
        if n < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        n = min(n, total)
        return [i * total // n for i in range(n)]  # np.arange(n) * total // n

    def video(self, width: int, height: int, num_frames: int, fps: float) -> ItemGeometry:
        """Each frame squashed to one tile, pooled, then one newline row: grid (frames, 1, 1)
        counts the frames' tiles, which the encoder's preprocessing must match."""
        if min(width, height) < 1 or num_frames < 1:
            raise ValueError(f"a video needs frames with an area, got {num_frames} frames of "
                             f"{width}x{height}")
        return ItemGeometry(num_frames * self.pooled ** 2 + 1, (num_frames, 1, 1),
                            (self.tile, self.tile))
