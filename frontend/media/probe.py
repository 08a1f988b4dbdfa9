"""Cheap image checks in the frontend: read the header only (size, format), never the pixels.

Full decoding happens later in the encoder process. What is refused here never costs an encoder
a decode: undecodable bytes, formats outside a short allow-list, declared sizes that would be a
decompression bomb, images too thin to be resized into a vision tower's input, and aspect
ratios past 200:1 (vLLM's and Qwen's bound; a resize to the tower's short side would otherwise
blow a few hundred bytes of PNG up into gigabytes). ``to_pil_image`` gives offline arrays and
tensors the same checks from their shape before a pixel is read.
"""

from __future__ import annotations

import io
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from frontend.errors import RequestError

# Formats PIL may even try. Others stay out on purpose: EPS calls Ghostscript when loaded, and
# rarely used parsers are where decoder bugs live. The encoder decodes with the same list.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "MPO")
MAX_ASPECT_RATIO = 200  # long side / short side, as vLLM and Qwen2-VL bound it
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels of an array image -> PIL mode


class ImageInfo(NamedTuple):
    width: int
    height: int
    format: str


def check_image_size(width: int, height: int, param: str, max_pixels: int,
                     min_side: int = 2, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> None:
    """400 unless ``min_side <= width, height``, ``width * height <= max_pixels`` and the long
    side is at most ``max_aspect_ratio`` times the short one."""
    if width * height > max_pixels:
        raise RequestError(
            f"image is too large: {width}x{height} pixels is more than the limit of "
            f"{max_pixels} pixels", param)
    if width < min_side or height < min_side:
        raise RequestError(
            f"image is too small: {width}x{height}; each side must be at least {min_side} pixels",
            param)
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise RequestError(
            f"image aspect ratio is too extreme: {width}x{height} is more than "
            f"{max_aspect_ratio:g}:1", param)


def probe_image(data: bytes, param: str, max_pixels: int, min_side: int = 2) -> ImageInfo:
    """Width, height and format from the header of ``data``; RequestError (400) if unusable."""
    try:
        # open() parses the header only; pixel data is read by load(), which we never call.
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            width, height = img.size
            fmt = img.format or ""
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL's own bound (raised past 2x Image.MAX_IMAGE_PIXELS, or a warning turned error).
        raise RequestError(
            f"image is too large: more than the limit of {max_pixels} pixels", param) from None
    except Exception:
        # Truncated or corrupt headers surface as almost any exception depending on the plugin
        # (struct.error, IndexError, ...): all of them mean these bytes are not a usable image.
        raise RequestError(
            "cannot decode image: not a supported image file "
            f"({', '.join(IMAGE_FORMATS).lower()})", param) from None
    check_image_size(width, height, param, max_pixels, min_side)
    return ImageInfo(width, height, fmt)


def to_pil_image(value: Any, param: str, max_pixels: int) -> Any:
    """An offline image (PIL image, numpy array or CPU tensor) as a PIL image, size-checked from
    its shape first. Arrays are [H, W] gray or [H, W, C] with C in 1, 3, 4 (numpy's layout);
    tensors are [C, H, W] (torch's), else [H, W, C]. uint8 or integer values in 0..255, or
    floats in [0, 1] (scaled by 255)."""
    if isinstance(value, Image.Image):
        check_image_size(value.width, value.height, param, max_pixels)
        return value
    arr = _as_numpy(value, param, max_pixels)
    shape = arr.shape
    chw = type(value).__module__.startswith("torch")
    if arr.ndim == 2:
        h, w, c = *shape, 0
    elif arr.ndim == 3 and chw and shape[0] in _MODES:
        (c, h, w), arr = shape, arr.transpose(1, 2, 0)
    elif arr.ndim == 3 and shape[2] in _MODES:
        h, w, c = shape
    else:
        raise RequestError(f"an image array must be [H, W] or [H, W, C] (C = 1, 3 or 4), got "
                           f"shape {list(shape)}", param)
    check_image_size(w, h, param, max_pixels)  # before any pixel is read or copied
    if arr.dtype.kind == "f":
        # The bound makes these full passes affordable; NaN fails both comparisons.
        if not bool(((arr >= 0) & (arr <= 1)).all()):
            raise RequestError("a float image array must hold values in [0, 1]", param)
        arr = np.rint(arr * 255)
    elif arr.dtype.kind in "ui":
        if arr.dtype != np.uint8 and not bool(((arr >= 0) & (arr <= 255)).all()):
            raise RequestError("an integer image array must hold values in 0..255", param)
    else:
        raise RequestError(f"an image array must be uint8 or float, got {arr.dtype}", param)
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if c == 1 else arr, _MODES[c or 1])


def _as_numpy(value: Any, param: str, max_pixels: int) -> np.ndarray:
    if type(value) is np.ndarray:
        return value
    import torch

    # type() not isinstance(): subclasses (of either) can override what we call.
    if type(value) in (torch.Tensor, torch.nn.Parameter):
        t = value.detach()
        if t.layout != torch.strided or t.is_nested or t.device.type != "cpu":
            raise RequestError("an image tensor must be a dense CPU tensor", param)
        if t.is_complex() or t.dtype == torch.bool:
            raise RequestError(f"an image tensor must be uint8 or float, got {t.dtype}", param)
        if t.numel() > 4 * max_pixels:  # bounded before the copy below (zero-stride views)
            raise RequestError(f"image is too large: more than the limit of {max_pixels} "
                               "pixels", param)
        if t.is_floating_point() and t.dtype != torch.float64:
            t = t.float()  # numpy has no bfloat16
        return t.numpy()
    raise RequestError("an image must be a PIL image, a numpy array or a tensor, got "
                       f"{type(value).__name__}", param)
