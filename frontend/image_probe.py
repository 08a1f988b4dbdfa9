"""Cheap image checks in the frontend: read the header only (size, format), never the pixels.

Full decoding happens later in the encoder process. What is refused here never costs an encoder
a decode: undecodable bytes, formats outside a short allow-list, declared sizes that would be a
decompression bomb, and images too thin to be resized into a vision tower's input.
"""

from __future__ import annotations

import io
from typing import NamedTuple

from PIL import Image

from frontend.errors import RequestError

# Formats PIL may even try. Others stay out on purpose: EPS calls Ghostscript when loaded, and
# rarely used parsers are where decoder bugs live. The encoder decodes with the same list.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "MPO")


class ImageInfo(NamedTuple):
    width: int
    height: int
    format: str


def check_image_size(width: int, height: int, param: str, max_pixels: int,
                     min_side: int = 2) -> None:
    """400 unless ``min_side <= width, height`` and ``width * height <= max_pixels``."""
    if width * height > max_pixels:
        raise RequestError(
            f"image is too large: {width}x{height} pixels is more than the limit of "
            f"{max_pixels} pixels", param)
    if width < min_side or height < min_side:
        raise RequestError(
            f"image is too small: {width}x{height}; each side must be at least {min_side} pixels",
            param)


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
