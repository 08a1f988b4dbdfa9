"""LLaVA-OneVision's anyres preprocessing in PIL + numpy, equal to transformers'
LlavaOnevisionImageProcessorPil on its single-image (tiled) path, and to
LlavaNextImageProcessorPil (the same steps; its crop to a tile's own size is a no-op).

Steps, in transformers' order: resize the image (PIL, bicubic) to fit the chosen canvas, paste it
centered on a black canvas, cut the canvas into tower-sized tiles row by row, and put first a
copy of the whole image resized straight to one tile (aspect ratio not kept); then rescale and
normalize every tile. The sizes come from `protocol.geometry.llava_onevision`, so they are the
ones the frontend counted. Every intermediate is at most a canvas (the largest pinpoint), so a
huge input never makes a huge buffer.

Rescale + normalize are one [3, 256] lookup table built with transformers' arithmetic (float64
rescale stored as float32, then float32 (x - mean) / std), as in `clip_image.py`.

A video's frames are each resized whole to one tile (PIL, the video processor's filter) and
normalized with the video processor's mean and std, frame by frame as the image processor
would (transformers' video processor does the same steps on torchvision tensors, which needs
torchvision and rounds its bicubic differently).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from encoder_worker.models.base import Patches
from encoder_worker.models.clip_image import image_processor_config
from protocol.checkpoint import video_processor_config
from protocol.geometry.llava_onevision import AnyresGeometry, LlavaOnevisionGeometry

# transformers' LlavaOnevisionImageProcessor defaults (OpenAI CLIP's), for configs saved without
# them; the released checkpoints save 0.5 / 0.5.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_table(cfg: dict[str, Any]) -> np.ndarray:
    """[3, 256] float32: channel c, uint8 value v -> the value transformers computes for it."""
    values = np.arange(256, dtype=np.uint8)[None, :].repeat(3, 0)
    table = values.astype(np.float32)
    if cfg.get("do_rescale", True):
        table = (values.astype(np.float64) * float(cfg.get("rescale_factor", 1 / 255))
                 ).astype(np.float32)
    if cfg.get("do_normalize", True):
        mean = np.array(cfg.get("image_mean", CLIP_MEAN), dtype=np.float32)
        std = np.array(cfg.get("image_std", CLIP_STD), dtype=np.float32)
        table = (table - mean[:, None]) / std[:, None]
    return np.ascontiguousarray(table, dtype=np.float32)


@dataclass(frozen=True)
class AnyresImageProcessor:
    geometry: AnyresGeometry
    resample: int  # PIL resampling filter (3 = bicubic)
    lut: np.ndarray  # [3, 256] float32, see normalize_table
    pad_color: tuple[int, int, int]  # a multi-image prompt's images pad to square with the mean
    video_resample: int  # the video processor's filter
    video_lut: np.ndarray  # [3, 256] float32, from the video processor's mean and std

    @classmethod
    def from_pretrained(cls, folder: str | Path, model_config: dict[str, Any]
                        ) -> AnyresImageProcessor:
        cfg = image_processor_config(folder)
        video = video_processor_config(folder)
        for name, c in (("image", cfg), ("video", video or {})):
            if not c.get("do_resize", True) or c.get("do_center_crop"):
                raise ValueError(f"{folder}: the {name} processor must resize and not crop")
        return cls.from_config(model_config, cfg, video)

    @classmethod
    def from_config(cls, model_config: dict[str, Any], cfg: dict[str, Any],
                    video: dict[str, Any] | None = None,
                    geometry: AnyresGeometry | None = None) -> AnyresImageProcessor:
        """``video``: the video processor's settings; None: the image processor's.
        ``geometry``: another model's anyres settings (default: OneVision's)."""
        mean = cfg.get("image_mean", CLIP_MEAN)
        bicubic = Image.Resampling.BICUBIC
        return cls(geometry or LlavaOnevisionGeometry(model_config, cfg, video),
                   int(cfg.get("resample", bicubic)), normalize_table(cfg),
                   tuple(int(m * 255) for m in mean),
                   int((video or cfg).get("resample", bicubic)), normalize_table(video or cfg))

    def __call__(self, image: Image.Image) -> Patches:
        """RGB image -> its tiles, the whole-image tile first: values [1 + tiles, 3, side, side]
        float32, ``grid_thw`` (1, tile rows, tile columns), and the image's own size, by whose
        aspect ratio the packing cuts the tiles' padding."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        plan = self.geometry.layout(image.width, image.height)
        side = self.geometry.tile
        (canvas_h, canvas_w), (fit_h, fit_w) = plan.canvas_hw, plan.resized_hw
        canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
        top, left = (canvas_h - fit_h) // 2, (canvas_w - fit_w) // 2
        canvas[top:top + fit_h, left:left + fit_w] = np.asarray(
            image.resize((fit_w, fit_h), resample=self.resample))
        rows, cols = plan.tiles_hw
        # [rows, side, cols, side, 3] -> tiles row by row, each [3, side, side]
        tiles = canvas.reshape(rows, side, cols, side, 3).transpose(0, 2, 4, 1, 3)
        tiles = tiles.reshape(rows * cols, 3, side, side)
        planes = np.concatenate((self._base(image)[None], tiles))
        return Patches(self._normalized(planes), (1, rows, cols), (image.height, image.width))

    def base_tile(self, image: Image.Image) -> Patches:
        """An image of a multi-image prompt: padded to a square (centred, in the mean colour)
        and resized to one tile, as transformers does: values [1, 3, side, side], grid
        (1, 0, 0) (no tiles)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        square = max(image.width, image.height)
        canvas = Image.new("RGB", (square, square), self.pad_color)
        canvas.paste(image, ((square - image.width) // 2, (square - image.height) // 2))
        return Patches(self._normalized(self._base(canvas)[None]), (1, 0, 0),
                       (image.height, image.width))

    def video(self, frames: np.ndarray) -> Patches:
        """[T, H, W, 3] uint8 sampled frames -> values [T, 3, side, side] float32, each frame
        resized whole to one tile; grid (T, 1, 1) (one tile per frame), no image size (the
        packing pools every frame alike)."""
        planes = np.stack([self._base(Image.fromarray(f), self.video_resample) for f in frames])
        return Patches(self._normalized(planes, self.video_lut), (len(frames), 1, 1))

    def _base(self, image: Image.Image, resample: int | None = None
              ) -> np.ndarray:  # [3, side, side] uint8
        side, resample = self.geometry.tile, self.resample if resample is None else resample
        return np.asarray(image.resize((side, side), resample=resample)).transpose(2, 0, 1)

    def _normalized(self, planes: np.ndarray, lut: np.ndarray | None = None) -> torch.Tensor:
        """uint8 [n, 3, side, side] -> rescaled, normalized float32 (the image table unless
        ``lut``)."""
        lut = self.lut if lut is None else lut
        out = np.empty(planes.shape, dtype=np.float32)
        for c in range(3):
            np.take(lut[c], planes[:, c], out=out[:, c])
        return torch.from_numpy(out)
