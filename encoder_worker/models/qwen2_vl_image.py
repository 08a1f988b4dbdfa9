"""The Qwen2-VL image processor in PIL + numpy, equal to transformers' (PIL backend).

Steps, in transformers' order: resize to the size the geometry computes (PIL, bicubic by
default), rescale + normalize (the CLIP processor's table lookup: same arithmetic, same bits),
then cut into patches. Patches are laid out window by window, as the tower's patch merger reads
them: each 2x2 window of 14 px patches is 4 consecutive rows, and every row holds channel,
frame (the image repeated ``temporal_patch_size`` times), patch row, patch column.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encoder_worker.decode import MediaError
from encoder_worker.models.base import Patches
from encoder_worker.models.clip_image import (
    MAX_RESIZE_PIXELS,
    ClipImageProcessor,
    image_processor_config,
)
from protocol.geometry.qwen2_vl import Qwen2VLGeometry


class Qwen2VLImageProcessor:
    def __init__(self, geometry: Qwen2VLGeometry, config: dict):
        self.geometry = geometry
        self.resample = int(config.get("resample", Image.Resampling.BICUBIC))
        # Only the CLIP processor's rescale + normalize table: no resize, no crop.
        self.normalize = ClipImageProcessor.from_dict(
            {**config, "do_resize": False, "do_center_crop": False})

    @classmethod
    def from_pretrained(cls, folder: str | Path, model_config: dict) -> Qwen2VLImageProcessor:
        config = image_processor_config(folder)
        return cls(Qwen2VLGeometry(model_config, config), config)

    def __call__(self, image: Image.Image) -> Patches:
        """RGB image -> its patches [h * w, 3 * temporal * patch^2] float32 and grid (1, h, w);
        MediaError for a size the model refuses."""
        try:
            geo = self.geometry.image(image.width, image.height)
        except ValueError as e:
            raise MediaError(str(e)) from None
        height, width = geo.resized_hw
        if height * width > MAX_RESIZE_PIXELS:
            raise MediaError(f"image of {image.width}x{image.height} would be resized to "
                             f"{width}x{height}, more than {MAX_RESIZE_PIXELS} pixels")
        if image.mode != "RGB":
            image = image.convert("RGB")
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), resample=self.resample)
        pixels = self.normalize(image).numpy()  # [3, H, W] float32
        patches = self.patchify(pixels)
        if patches.grid_thw != geo.grid_thw:  # the geometry the frontend sized the prompt with
            raise ValueError(f"preprocessing made a {patches.grid_thw} patch grid, the geometry "
                             f"says {geo.grid_thw}")
        return patches

    def patchify(self, pixels: np.ndarray) -> Patches:
        """[C, H, W] -> `Patches`, rows in merge-window order."""
        g = self.geometry
        p, m, t = g.patch_size, g.merge_size, g.temporal_patch_size
        channels, height, width = pixels.shape
        grid_h, grid_w = height // p, width // p
        # [C, windows_h, m, p, windows_w, m, p] -> [windows_h, windows_w, m, m, C, p, p]
        x = pixels.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
        x = x.transpose(1, 4, 2, 5, 0, 3, 6)
        # A still image is its one frame repeated over the temporal patch.
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
        values = np.ascontiguousarray(x).reshape(grid_h * grid_w, channels * t * p * p)
        return Patches(torch.from_numpy(values), (1, grid_h, grid_w))
