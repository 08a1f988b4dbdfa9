"""Qwen2-VL and Qwen2.5-VL: dynamic resolution. Each image is resized, keeping its aspect ratio,
to sides that are multiples of patch * merge (28 px) and an area within [min_pixels,
max_pixels]; the tower cuts it into 14 px patches (a single image counts as one temporal patch,
its frame repeated ``temporal_patch_size`` times) and merges each 2x2 window of patches into one
LM token. So a 448x448 image becomes a (1, 32, 32) grid and 256 placeholder tokens.

The arithmetic follows transformers' ``smart_resize`` exactly, Python's round-half-to-even
included: a size the frontend computes must be the size the encoder's resize produces.

A video is sampled to some of its frames (``sample_frames``, transformers' Qwen2-VL video
processor's rule), each resized within the video pixel bounds; every ``temporal_patch_size``
consecutive frames make one temporal grid step (the last frame repeated to fill the final one).

A request (or the server) may change the pixel bounds and the video sampling rate through
``mm_processor_kwargs`` (`protocol.geometry.processor_kwargs`): ``with_processor_kwargs`` returns
the geometry under them, whose items the encoder then preprocesses to the sizes it computed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from protocol.geometry import ItemGeometry, MediaGeometry
from protocol.geometry.processor_kwargs import MAX_PIXELS, apply_bounds, parse_processor_kwargs

# transformers' Qwen2VLImageProcessor defaults, for configs saved without them.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
DEFAULT_PATCH_SIZE = 14
DEFAULT_MERGE_SIZE = 2
DEFAULT_TEMPORAL_PATCH_SIZE = 2
MAX_ASPECT_RATIO = 200
# transformers' Qwen2VLVideoProcessor defaults (a video config saved without them).
DEFAULT_VIDEO_MIN_PIXELS = 128 * 28 * 28
DEFAULT_VIDEO_MAX_PIXELS = 28 * 28 * 768
DEFAULT_MIN_FRAMES, DEFAULT_MAX_FRAMES = 4, 768  # bounds of fps sampling
# Frames taken when neither num_frames nor fps is configured: vLLM's video loader default.
DEFAULT_NUM_FRAMES = 32


def pixel_bounds(processor: dict[str, Any],
                 defaults: tuple[int, int] = (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
                 ) -> tuple[int, int]:
    """(min_pixels, max_pixels) as transformers reads them: ``size`` {shortest_edge,
    longest_edge} (both areas, despite the names), overridden by flat ``min_pixels`` /
    ``max_pixels`` (how the Qwen checkpoints on the Hub spell them). ``size`` {min_pixels,
    max_pixels}, as some transformers 4 versions saved it, is read too."""
    size = processor.get("size")
    if size is None:
        size = {"shortest_edge": DEFAULT_MIN_PIXELS, "longest_edge": DEFAULT_MAX_PIXELS}
    if not isinstance(size, dict):
        raise ValueError(f"image processor size {size!r} is not a dict of pixel counts")
    low = processor.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
    high = processor.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
    if not low or not high:  # transformers refuses a missing or zero bound too
        raise ValueError(f"image processor needs min_pixels and max_pixels, got {low!r} and "
                         f"{high!r}")
    return int(low), int(high)


def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """(height, width) of the resized image: multiples of ``factor``, the area brought into
    [min_pixels, max_pixels] by one common scale. Past 200:1 a ValueError for the client.

    For very thin images the ``factor`` floor on the short side can leave the area above
    ``max_pixels``; transformers allows that, so we do too.
    """
    if min(height, width) < 1:
        raise ValueError(f"image of {width}x{height} pixels has no area")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio is too extreme: {width}x{height} is more than "
                         f"{MAX_ASPECT_RATIO}:1")
    new_h, new_w = round(height / factor) * factor, round(width / factor) * factor
    if new_h * new_w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / shrink / factor) * factor)
        new_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_h * new_w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * grow / factor) * factor
        new_w = math.ceil(width * grow / factor) * factor
    return new_h, new_w


class Qwen2VLGeometry(MediaGeometry):
    """Patch settings come from the image processor config (what the preprocessing uses); the
    encoder checks that its tower agrees with them. Video settings come from the video
    processor config, else from the image one, as transformers falls back to
    preprocessor_config.json (`protocol.checkpoint.video_processor_config`)."""

    takes_video = True
    positions_need_grid = True

    def __init__(self, config: dict[str, Any], processor: dict[str, Any],
                 video_processor: dict[str, Any] | None = None):
        super().__init__(config, processor)
        self.patch_size = int(processor.get("patch_size", DEFAULT_PATCH_SIZE))
        self.merge_size = int(processor.get("merge_size", DEFAULT_MERGE_SIZE))
        self.temporal_patch_size = int(processor.get("temporal_patch_size",
                                                     DEFAULT_TEMPORAL_PATCH_SIZE))
        if min(self.patch_size, self.merge_size, self.temporal_patch_size) < 1:
            raise ValueError("patch_size, merge_size and temporal_patch_size must be >= 1")
        self.do_resize = bool(processor.get("do_resize", True))
        self.min_pixels, self.max_pixels = pixel_bounds(processor)
        video = processor if video_processor is None else video_processor
        settings = tuple(int(video.get(k, d)) for k, d in (
            ("patch_size", DEFAULT_PATCH_SIZE), ("merge_size", DEFAULT_MERGE_SIZE),
            ("temporal_patch_size", DEFAULT_TEMPORAL_PATCH_SIZE)))
        if settings != (self.patch_size, self.merge_size, self.temporal_patch_size):
            raise ValueError(f"the video processor cuts (patch, merge, temporal) = {settings}, "
                             "the image processor "
                             f"{(self.patch_size, self.merge_size, self.temporal_patch_size)}")
        self.video_do_resize = bool(video.get("do_resize", True))
        self.video_min_pixels, self.video_max_pixels = pixel_bounds(
            video, (DEFAULT_VIDEO_MIN_PIXELS, DEFAULT_VIDEO_MAX_PIXELS))
        self.min_frames = int(video.get("min_frames", DEFAULT_MIN_FRAMES))
        self.max_frames = int(video.get("max_frames", DEFAULT_MAX_FRAMES))
        # The checkpoint's bounds: what processor_settings reports changes against.
        self._checkpoint_bounds = self._bounds()

    def _bounds(self) -> dict[str, dict[str, int]]:
        return {"image": {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels},
                "video": {"min_pixels": self.video_min_pixels,
                          "max_pixels": self.video_max_pixels}}

    def with_processor_kwargs(self, kwargs: Mapping[str, Any]) -> Qwen2VLGeometry:
        """A copy under ``kwargs``: pixel bounds of images and of videos, and videos'
        sampling rate (`protocol.geometry.processor_kwargs` for the spellings)."""
        if not kwargs:
            return self
        given = parse_processor_kwargs(kwargs)
        geo = copy.copy(self)
        geo.min_pixels, geo.max_pixels = apply_bounds(self.min_pixels, self.max_pixels,
                                                      given["image"])
        geo.video_min_pixels, geo.video_max_pixels = apply_bounds(
            self.video_min_pixels, self.video_max_pixels, given["video"])
        if "fps" in given["video"]:
            geo.sample_fps = given["video"]["fps"].value
        return geo

    def processor_settings(self, modality: str) -> dict[str, Any]:
        now, base = self._bounds()[modality], self._checkpoint_bounds[modality]
        changed: dict[str, Any] = {k: v for k, v in now.items() if v != base[k]}
        if modality == "video" and self.sample_fps is not None:
            changed["fps"] = self.sample_fps
        return changed

    def resized_hw(self, width: int, height: int, video: bool = False) -> tuple[int, int]:
        """(height, width) the preprocessing resizes a ``width`` x ``height`` image (or video
        frame) to."""
        factor = self.patch_size * self.merge_size
        if self.video_do_resize if video else self.do_resize:
            low, high = ((self.video_min_pixels, self.video_max_pixels) if video
                         else (self.min_pixels, self.max_pixels))
            return smart_resize(height, width, factor, low, high)
        if height % factor or width % factor:
            raise ValueError(f"image of {width}x{height} pixels: without a resize, each side "
                             f"must be a multiple of {factor}")
        return height, width

    def embeds(self, num_rows: int, grid_thw: tuple[int, int, int] | None) -> ItemGeometry:
        if grid_thw is None:
            raise ValueError("this model places embeddings by their patch grid: send "
                             "image_grid_thw with image_embeds")
        merge = self.merge_size
        if (len(grid_thw) != 3 or any(not isinstance(v, int) or v < 1 for v in grid_thw)
                or grid_thw[1] % merge or grid_thw[2] % merge):
            raise ValueError(f"image_grid_thw must be 3 positive ints (t, h, w) with h and w "
                             f"multiples of {merge}, got {list(grid_thw)}")
        count = math.prod(grid_thw) // merge ** 2
        if count != num_rows:
            raise ValueError(f"image_grid_thw {list(grid_thw)} makes {count} tokens but "
                             f"image_embeds has {num_rows} rows")
        return ItemGeometry(count, tuple(grid_thw))

    def image(self, width: int, height: int, images_in_prompt: int = 1) -> ItemGeometry:
        new_h, new_w = self.resized_hw(width, height)
        _check_pixels(new_h * new_w, f"image of {width}x{height} would be resized to "
                      f"{new_w}x{new_h}", "lower max_pixels")
        grid = (1, new_h // self.patch_size, new_w // self.patch_size)  # one temporal patch
        return ItemGeometry(math.prod(grid) // self.merge_size ** 2, grid, (new_h, new_w))

    def sample_frames(self, total: int, fps: float, num_frames: int | None = None,
                      sample_fps: float | None = None) -> list[int]:
        """Indices of the frames a video of ``total`` frames at ``fps`` is sampled to, as
        transformers' Qwen2-VL video processor picks them: ``num_frames`` (rounded to a multiple
        of the temporal patch) spread evenly, or ``sample_fps`` frames per second of video
        (within [min_frames, max_frames]); neither: `DEFAULT_NUM_FRAMES`. A count of at least
        the video's frames takes them all (transformers rounds and may raise instead: in-memory
        frames, sent with their own count, are kept as given); a video shorter than one temporal
        patch keeps all its frames (the last one is repeated to fill the patch)."""
        tps = self.temporal_patch_size
        if num_frames is not None and sample_fps is not None:
            raise ValueError("num_frames and fps are mutually exclusive")
        if total < 1 or not fps > 0:
            raise ValueError(f"a video needs frames and a frame rate, got {total} frames at "
                             f"{fps:g} fps")
        if sample_fps is not None:
            cap = math.floor(min(self.max_frames, total) / tps) * tps
            n = min(max(total / fps * sample_fps, self.min_frames), cap, total)
            n = math.floor(n / tps) * tps
        elif (num_frames or DEFAULT_NUM_FRAMES) >= total:
            n = total
        else:
            n = max(round((num_frames or DEFAULT_NUM_FRAMES) / tps) * tps, tps)
        n = int(n) if n >= 1 else total
        # Exact integer arithmetic for transformers' arange(0, total, total / n).int().
        return [i * total // n for i in range(n)]

    def video(self, width: int, height: int, num_frames: int, fps: float) -> ItemGeometry:
        if num_frames < 1 or not fps > 0:
            raise ValueError(f"a video needs frames and a frame rate, got {num_frames} frames "
                             f"at {fps:g} fps")
        new_h, new_w = self.resized_hw(width, height, video=True)
        _check_pixels(num_frames * new_h * new_w, f"video of {num_frames} frames would be "
                      f"resized to {new_w}x{new_h} each",
                      "sample fewer frames or lower max_pixels")
        grid = (-(-num_frames // self.temporal_patch_size), new_h // self.patch_size,
                new_w // self.patch_size)
        # Qwen2.5-VL's processor: temporal_patch_size / the sampled frames' rate.
        return ItemGeometry(math.prod(grid) // self.merge_size ** 2, grid, (new_h, new_w),
                            self.temporal_patch_size / fps)


def _check_pixels(pixels: int, what: str, hint: str) -> None:
    """The encoder refuses to preprocess more than `MAX_PIXELS` pixels for one item: say so
    here, before the prompt is built (larger pixel bounds can get there)."""
    if pixels > MAX_PIXELS:
        raise ValueError(f"{what}, more than {MAX_PIXELS} pixels in all ({hint})")
