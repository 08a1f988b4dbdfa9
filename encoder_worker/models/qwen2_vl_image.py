"""The Qwen2-VL image processor in PIL + numpy, equal to transformers' (PIL backend).

Steps, in transformers' order: resize to the size the item's geometry says (computed once, by
the frontend, under the request's pixel bounds; PIL, bicubic by default), cut into patches,
then rescale + normalize (`pixel_values`: the CLIP processor's table lookup, same arithmetic,
same bits), which the encoder runs on its device after the upload.
Patches are laid out window by window, as the tower's patch merger reads them: each 2x2 window
of 14 px patches is 4 consecutive rows, and every row holds channel, frame (the image repeated
``temporal_patch_size`` times), patch row, patch column.

A video's frames take the same steps one by one (video pixel bounds), and each
``temporal_patch_size`` consecutive frames fill one temporal patch, as transformers' video
processor lays them out. transformers resizes videos with torchvision, which we don't have;
PIL's resize is the image processor's, so a video here is its frames as images.
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
    lookup,
)
from protocol.checkpoint import video_processor_config
from protocol.geometry import ItemGeometry
from protocol.geometry.qwen2_vl import Qwen2VLGeometry


class Qwen2VLImageProcessor:
    def __init__(self, geometry: Qwen2VLGeometry, config: dict):
        self.geometry = geometry
        self.resample = int(config.get("resample", Image.Resampling.BICUBIC))
        # Only the CLIP processor's rescale + normalize table: no resize, no crop.
        self.normalize = ClipImageProcessor.from_dict(
            {**config, "do_resize": False, "do_center_crop": False})
        self._luts: dict[torch.device, torch.Tensor] = {}  # device -> [3, 256] float32

    @classmethod
    def from_pretrained(cls, folder: str | Path, model_config: dict) -> Qwen2VLImageProcessor:
        config = image_processor_config(folder)
        return cls(Qwen2VLGeometry(model_config, config, video_processor_config(folder)), config)

    def __call__(self, image: Image.Image, geo: ItemGeometry | None = None) -> Patches:
        """RGB image -> its patches [h * w, 3 * temporal * patch^2] uint8 and grid (1, h, w),
        resized to ``geo`` (the frontend's geometry, which may carry the request's pixel
        bounds), else to what this checkpoint's settings give; MediaError for a size the model
        refuses."""
        try:
            geo = self.geometry.image(image.width, image.height) if geo is None else geo
        except ValueError as e:
            raise MediaError(str(e)) from None
        height, width = self._target(geo)
        if height * width > MAX_RESIZE_PIXELS:
            raise MediaError(f"image of {image.width}x{image.height} would be resized to "
                             f"{width}x{height}, more than {MAX_RESIZE_PIXELS} pixels")
        if image.mode != "RGB":
            image = image.convert("RGB")
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), resample=self.resample)
        planes = self.normalize.planes(image).numpy()  # [3, H, W] uint8
        # A still image is its one frame repeated over the temporal patch.
        frames = np.broadcast_to(planes, (self.geometry.temporal_patch_size, *planes.shape))
        return _checked(self.patchify(frames), geo.grid_thw)

    def video(self, frames: np.ndarray, fps: float, geo: ItemGeometry | None = None) -> Patches:
        """Sampled RGB frames [T, H, W, 3] uint8 at ``fps`` -> their patches
        [t * h * w, 3 * temporal * patch^2] uint8 and grid (t, h, w), t = ceil(T / temporal),
        each frame resized to ``geo`` (as ``__call__``); MediaError for a size the model
        refuses."""
        num, height, width = frames.shape[:3]
        try:
            geo = self.geometry.video(width, height, num, fps) if geo is None else geo
        except ValueError as e:
            raise MediaError(str(e)) from None
        new_h, new_w = self._target(geo)
        if num * new_h * new_w > MAX_RESIZE_PIXELS:
            raise MediaError(f"video of {num} frames would be resized to {new_w}x{new_h} each, "
                             f"more than {MAX_RESIZE_PIXELS} pixels in all")
        if (new_h, new_w) != (height, width):
            frames = np.stack([np.asarray(Image.fromarray(f).resize(
                (new_w, new_h), resample=self.resample)) for f in frames])
        # The last frame repeated to fill the final temporal patch, as transformers pads.
        pad = -num % self.geometry.temporal_patch_size
        frames = np.concatenate([frames, frames[-1:].repeat(pad, 0)]) if pad else frames
        return _checked(self.patchify(frames.transpose(0, 3, 1, 2)), geo.grid_thw)

    def _target(self, geo: ItemGeometry) -> tuple[int, int]:
        """The (height, width) to resize to: ``geo``'s, if this tower can cut it into merge
        windows (else the roles disagree: ValueError). `_checked` compares the grid after."""
        hw, factor = geo.resized_hw, self.geometry.patch_size * self.geometry.merge_size
        if hw is None or hw[0] % factor or hw[1] % factor:
            raise ValueError(f"the geometry's size {hw} is not made of {factor} px merge windows")
        return int(hw[0]), int(hw[1])

    def pixel_values(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 patch rows (`Patches.values` of this processor) -> float32 pixel values, on
        their device: the table lookup of `ClipImageProcessor`, per column's channel."""
        if patches.dtype != torch.uint8:
            return patches  # already pixel values
        lut = self._luts.get(patches.device)
        if lut is None:
            lut = self._luts[patches.device] = torch.from_numpy(self.normalize.lut).to(
                patches.device)
        rows = patches.shape[0]  # a row is channel, frame, patch row, patch column
        return lookup(patches.view(rows, 3, -1), lut).view(patches.shape)

    def patchify(self, frames: np.ndarray) -> Patches:
        """[T, C, H, W] uint8 (T a multiple of the temporal patch) -> `Patches` of uint8 rows
        in merge-window order within each temporal step (`pixel_values` normalizes them: on
        the tower's device, a quarter of the bytes to move and no float pass here)."""
        g = self.geometry
        p, m, t = g.patch_size, g.merge_size, g.temporal_patch_size
        num, channels, height, width = frames.shape
        grid_t, grid_h, grid_w = num // t, height // p, width // p
        # [T/t, t, C, windows_h, m, p, windows_w, m, p]
        #   -> [T/t, windows_h, windows_w, m, m, C, t, p, p]
        x = frames.reshape(grid_t, t, channels, grid_h // m, m, p, grid_w // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        values = np.ascontiguousarray(x).reshape(grid_t * grid_h * grid_w, channels * t * p * p)
        return Patches(torch.from_numpy(values), (grid_t, grid_h, grid_w))


def _checked(patches: Patches, grid: tuple[int, int, int] | None) -> Patches:
    """``patches``, if their grid is the geometry's (the one the frontend sized the prompt
    with); a mismatch is the roles disagreeing, a ValueError."""
    if patches.grid_thw != grid:
        raise ValueError(f"preprocessing made a {patches.grid_thw} patch grid, the geometry "
                         f"says {grid}")
    return patches
