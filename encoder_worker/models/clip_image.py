"""The CLIP image processor (LLaVA-1.5 and friends) in PIL + numpy, equal to transformers'.

Steps, in transformers' order: resize the shortest edge (PIL, bicubic), center crop (zero pad if
the image is smaller than the crop), rescale by 1/255 (computed in float64, stored float32, as
transformers does), normalize by mean/std. torchvision is not needed (it can't be installed next
to our torch), and matching the PIL backend bit for bit keeps the tower parity test exact.

Every intermediate is bounded whatever the config says: the resize target is computed first;
past ``EXACT_RESIZE_PIXELS`` only the region that survives the center crop is resized (PIL's
``box``: cost scales with the output, pixels within 1-2 levels of the full resize on a few
pixels per thousand), and a target that would still exceed ``MAX_RESIZE_PIXELS`` is refused.
A 200:1 image at LLaVA's 336 would otherwise be a 336x67200 intermediate, and the probe's
100000x2 PNG (673 bytes) a 336 x 16.8M one.

Rescale + normalize map each uint8 value of each channel to one float, so they are a lookup in a
[3, 256] table built with transformers' exact arithmetic: same bits, several times faster than
broadcasting over the image, and it writes the channel-first layout directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from encoder_worker.decode import MediaError
from protocol.checkpoint import image_processor_config as read_image_processor_config

# transformers' CLIPImageProcessor defaults, for configs saved without them.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Full resizes up to this many pixels (12 MB of RGB) match transformers bit for bit; past it only
# the cropped region is resized.
EXACT_RESIZE_PIXELS = 1 << 22
# No resize output may exceed this (100 MB of RGB), whatever the config asks for.
MAX_RESIZE_PIXELS = 1 << 25


def image_processor_config(folder: str | Path) -> dict[str, Any]:
    config = read_image_processor_config(folder)
    if config is None:
        raise FileNotFoundError(f"{folder}: no image processor config (processor_config.json "
                                "or preprocessor_config.json)")
    return config


def _hw(size: Any, what: str) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    raise ValueError(f"unsupported {what} {size!r}: expected an int or height/width")


@dataclass(frozen=True)
class ClipImageProcessor:
    shortest_edge: int | None  # resize so the short side is this long, keeping the aspect ratio
    resize_hw: tuple[int, int] | None  # or resize to exactly (height, width)
    crop_hw: tuple[int, int] | None  # center crop (height, width); None: no crop
    resample: int  # PIL resampling filter (3 = bicubic)
    lut: np.ndarray  # [3, 256] float32: channel c, uint8 value v -> rescaled, normalized value

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ClipImageProcessor:
        return cls.from_dict(image_processor_config(folder))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ClipImageProcessor:
        shortest, resize_hw = None, None
        if cfg.get("do_resize", True):
            size = cfg.get("size", {"shortest_edge": 224})
            if isinstance(size, int):  # old configs: an int meant the shortest edge
                size = {"shortest_edge": size}
            if isinstance(size, dict) and set(size) == {"shortest_edge"}:
                shortest = int(size["shortest_edge"])
            else:
                resize_hw = _hw(size, "size")
        crop = _hw(cfg.get("crop_size", 224), "crop_size") if cfg.get("do_center_crop", True) else None
        # The table, computed the way transformers computes each pixel (float64 rescale, cast to
        # float32, then float32 (x - mean) / std).
        values = np.arange(256, dtype=np.uint8)[None, :].repeat(3, 0)  # [3, 256]
        lut = values.astype(np.float32)
        if cfg.get("do_rescale", True):
            scale = float(cfg.get("rescale_factor", 1 / 255))
            lut = (values.astype(np.float64) * scale).astype(np.float32)
        if cfg.get("do_normalize", True):
            mean = np.array(cfg.get("image_mean", OPENAI_CLIP_MEAN), dtype=np.float32)
            std = np.array(cfg.get("image_std", OPENAI_CLIP_STD), dtype=np.float32)
            lut = (lut - mean[:, None]) / std[:, None]
        return cls(shortest, resize_hw, crop, int(cfg.get("resample", Image.Resampling.BICUBIC)),
                   np.ascontiguousarray(lut, dtype=np.float32))

    def output_hw(self) -> tuple[int, int] | None:
        """(height, width) of every output, when fixed (a crop or an exact resize)."""
        return self.crop_hw or self.resize_hw

    def _resized_hw(self, height: int, width: int) -> tuple[int, int]:
        if self.resize_hw is not None:
            return self.resize_hw
        if self.shortest_edge is None:
            return height, width
        # transformers: the long side is int(short_target * long / short), truncated.
        short, long = min(height, width), max(height, width)
        new_long = int(self.shortest_edge * long / short)
        if width <= height:
            return new_long, self.shortest_edge
        return self.shortest_edge, new_long

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> pixel values [3, H, W] float32; MediaError if an intermediate would be
        too large."""
        return normalize(self.planes(image), torch.from_numpy(self.lut))

    def planes(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> resized, cropped [3, H, W] uint8: what `normalize` turns into pixel
        values, a quarter of their bytes to move (the encoder normalizes on its device)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        h, w = self._resized_hw(image.height, image.width)
        if h < 1 or w < 1:
            raise MediaError(f"image is too small to resize: {image.width}x{image.height}")
        if (h, w) != (image.height, image.width) or self.shortest_edge is not None:
            image = self._resize(image, h, w)
        pixels = np.asarray(image)  # [H, W, 3] uint8
        if self.crop_hw is not None:
            pixels = _center_crop(pixels, *self.crop_hw)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # [3, H, W]

    def _resize(self, image: Image.Image, h: int, w: int) -> Image.Image:
        """Resize to (h, w); past EXACT_RESIZE_PIXELS, only the part the center crop keeps."""
        if h * w <= EXACT_RESIZE_PIXELS or self.crop_hw is None:
            if h * w > MAX_RESIZE_PIXELS:
                raise MediaError(f"image of {image.width}x{image.height} would be resized to "
                                 f"{w}x{h}, more than {MAX_RESIZE_PIXELS} pixels")
            return image.resize((w, h), resample=self.resample)
        crop_h, crop_w = self.crop_hw
        # Per axis: the crop's window of the full resize (or all of it where the crop pads).
        top, out_h = ((h - crop_h) // 2, crop_h) if h > crop_h else (0, h)
        left, out_w = ((w - crop_w) // 2, crop_w) if w > crop_w else (0, w)
        if out_h * out_w > MAX_RESIZE_PIXELS:
            raise MediaError(f"image of {image.width}x{image.height} would be resized to "
                             f"{out_w}x{out_h}, more than {MAX_RESIZE_PIXELS} pixels")
        sy, sx = image.height / h, image.width / w  # source pixels per output pixel
        box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
        return image.resize((out_w, out_h), resample=self.resample, box=box)


def normalize(planes: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] uint8 -> float32 pixel values through ``lut`` ([3, 256] float32, on the
    planes' device)."""
    return lookup(planes.reshape(-1, 3, planes.shape[-2] * planes.shape[-1]), lut).view(
        planes.shape)


def lookup(values: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """[A, 3, B] uint8, channel on dim 1 -> float32 ``lut[c, v]``: a table lookup, so the result
    is bit-identical on every device and inside a CUDA graph. On the CPU one numpy take per
    channel (torch's int64 gather is ~10x slower there)."""
    if values.device.type != "cpu":
        offsets = torch.arange(0, 3 * 256, 256, device=values.device).view(1, 3, 1)
        return lut.reshape(-1)[values.long() + offsets]
    src, table = values.numpy(), lut.numpy()
    out = np.empty(src.shape, dtype=np.float32)
    for c in range(3):
        out[:, c] = np.take(table[c], src[:, c])
    return torch.from_numpy(out)


def _center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """[H, W, C] -> [crop_h, crop_w, C]; zero padding where the image is smaller, as HF does."""
    height, width = pixels.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((new_h, new_w, pixels.shape[2]), dtype=pixels.dtype)
    pad_top, pad_left = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    padded[pad_top:pad_top + height, pad_left:pad_left + width] = pixels
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    return padded[top:top + crop_h, left:left + crop_w]
