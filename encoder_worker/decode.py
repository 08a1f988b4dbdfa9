"""Image bytes -> RGB ``PIL.Image``, refusing anything that could hurt the encoder process.

The frontend already probed the header, but the encoder trusts no peer: the size limits (pixel
count, shortest side, aspect ratio) are checked again from the header before a single pixel is
decoded, truncated files fail instead of being padded with grey, and only a short list of
formats is even tried. Only the first frame of an animated or multi-page file is ever decoded,
so frame counts cost nothing; 16-bit and float modes are clipped to 8 bits by ``convert``, as
transformers' processors do. Every refusal is a
``MediaError`` (the user's fault: the server answers 400 with its message).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageFile

# Same list as frontend/media/probe.py: EPS would call Ghostscript, and rarely used parsers are
# where decoder bugs live.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "MPO")
DEFAULT_BACKGROUND = (255, 255, 255)
# Long side / short side, as frontend/media/probe.py (and vLLM, Qwen2-VL) bound it: a resize to
# the tower's short side scales the long one by the same factor.
MAX_ASPECT_RATIO = 200

# A process-wide PIL switch: if anything turned it on, a truncated file would decode into an
# image padded with grey and embed silently. We want it to fail.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_SUPPORTED = ", ".join(IMAGE_FORMATS).lower()


class MediaError(Exception):
    """Media the user sent that can't be used; ``message`` is safe to show to the client."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def background_color(kwargs: Mapping[str, Any]) -> tuple[int, int, int]:
    """The colour transparent pixels are composited onto (``rgba_background_color``)."""
    color = kwargs.get("rgba_background_color", DEFAULT_BACKGROUND)
    ok = (
        isinstance(color, (list, tuple))
        and len(color) == 3
        # bool is an int subclass; True is not a colour channel
        and all(type(c) is int and 0 <= c <= 255 for c in color)
    )
    if not ok:
        raise MediaError("rgba_background_color must be a list of 3 integers in [0, 255], "
                         f"got {color!r}")
    return (color[0], color[1], color[2])


def decode_image(data: bytes, kwargs: Mapping[str, Any] | None = None, *,
                 max_pixels: int = 50_000_000, min_side: int = 2,
                 max_aspect_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """Decode ``data`` fully into an RGB image; raises MediaError for anything unusable."""
    kwargs = kwargs or {}
    color = background_color(kwargs)  # validated first: a bad kwarg fails without decoding
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # someone in-process flipped it back on
    try:
        # open() parses the header only; nothing large is allocated before the check below.
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL's own bound (2x Image.MAX_IMAGE_PIXELS): only reached past ours for big limits.
        raise MediaError(f"image is too large: more than the limit of {max_pixels} pixels") from None
    except Exception:
        raise MediaError(f"cannot decode image: not a supported image file ({_SUPPORTED})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise MediaError(f"image is too large: {width}x{height} pixels is more than the limit of "
                         f"{max_pixels} pixels")
    if width < min_side or height < min_side:
        raise MediaError(f"image is too small: {width}x{height}; each side must be at least "
                         f"{min_side} pixels")
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise MediaError(f"image aspect ratio is too extreme: {width}x{height} is more than "
                         f"{max_aspect_ratio:g}:1")
    try:
        img.load()  # the whole file: truncated or corrupt data raises here
        return _to_rgb(img, color)
    except MemoryError:
        raise  # not the user's fault at these sizes: let the server answer 500
    except Exception:
        # Plugins raise almost anything on bad data (OSError, SyntaxError, struct.error, ...);
        # the text is PIL's, not for clients.
        raise MediaError("cannot decode image: the file is truncated or corrupt") from None


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB with transparency flattened onto ``background`` (plain convert() would drop alpha and
    expose whatever colour the transparent pixels happen to hold)."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        return img if img.mode == "RGB" else img.convert("RGB")
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")
