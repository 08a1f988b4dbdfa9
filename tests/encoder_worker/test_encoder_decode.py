"""Decoding refuses what could hurt the encoder (bombs, truncated files, odd formats) with a
MediaError, and flattens transparency onto the requested background colour."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from encoder_worker.decode import MediaError, decode_image


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A tiny file whose header declares width x height RGB pixels (the data is a stub)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(b"\x00" * 1024)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def test_decodes_png_and_jpeg_to_rgb(make_image):
    img = make_image(0, 30, 20)
    out = decode_image(_save(img, "PNG"))
    assert out.mode == "RGB" and out.size == (20, 30)
    assert np.array_equal(np.asarray(out), np.asarray(img))
    assert decode_image(_save(img, "JPEG")).size == (20, 30)
    gray = decode_image(_save(img.convert("L"), "PNG"))
    assert gray.mode == "RGB"


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
                                  b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"])
def test_undecodable_bytes(data):
    with pytest.raises(MediaError, match="cannot decode image"):
        decode_image(data)


def test_truncated_jpeg_fails(make_image):
    data = _save(make_image(1, 64, 64), "JPEG", quality=95)
    with pytest.raises(MediaError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2])


def test_truncated_image_fails_even_if_pil_was_told_otherwise(make_image):
    data = _save(make_image(2, 64, 64), "PNG")
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # someone in-process flipped the global switch
    try:
        with pytest.raises(MediaError, match="truncated or corrupt"):
            decode_image(data[: len(data) // 2])
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


@pytest.mark.parametrize("size", [(1, 1), (1, 50), (50, 1)])
def test_too_small(size):
    with pytest.raises(MediaError, match="too small"):
        decode_image(_save(Image.new("RGB", size), "PNG"))


def test_decompression_bomb_is_refused_from_the_header():
    data = bomb_png(100_000, 100_000)
    assert len(data) < 200  # small on disk, 30 GB if decoded
    start = time.perf_counter()
    with pytest.raises(MediaError, match="too large"):
        decode_image(data)
    assert time.perf_counter() - start < 1.0
    # Our own limit (below PIL's built-in one) applies before any pixel is decoded.
    with pytest.raises(MediaError, match="3000x3000 pixels is more than the limit of 1000000"):
        decode_image(bomb_png(3000, 3000), max_pixels=1_000_000)


def test_rgba_is_composited_onto_the_background_colour():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 10, 0)  # fully transparent: its colour must not show
    rgba[0, 1] = (200, 10, 10, 255)  # opaque: unchanged
    rgba[0, 2] = (200, 10, 10, 128)  # half: blended
    data = _save(Image.fromarray(rgba, "RGBA"), "PNG")
    out = np.asarray(decode_image(data, {"rgba_background_color": [0, 128, 255]})).astype(int)
    assert out[0, 0].tolist() == [0, 128, 255]
    assert out[0, 1].tolist() == [200, 10, 10]
    a = 128 / 255
    blend = a * np.array([200, 10, 10]) + (1 - a) * np.array([0, 128, 255])
    assert np.abs(out[0, 2] - blend).max() <= 1
    assert np.asarray(decode_image(data))[0, 0].tolist() == [255, 255, 255]  # default: white


def test_la_and_palette_transparency_are_composited():
    la = Image.fromarray(np.stack([np.full((3, 3), 50, np.uint8), np.zeros((3, 3), np.uint8)], -1),
                         "LA")
    assert np.asarray(decode_image(_save(la, "PNG"), {"rgba_background_color": [1, 2, 3]}))[
        1, 1].tolist() == [1, 2, 3]
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    data = _save(pal, "PNG", transparency=0)  # palette index 0 (red) is transparent
    out = np.asarray(decode_image(data, {"rgba_background_color": [9, 9, 9]}))
    assert out[0, 0].tolist() == [9, 9, 9]
    assert out[1, 1].tolist() == [0, 255, 0]


@pytest.mark.parametrize("color", [[1, 2], [256, 0, 0], [-1, 0, 0], ["a", 0, 0], [True, 0, 0],
                                   [1.5, 0, 0], "white", None])
def test_bad_background_colour(color, make_image):
    with pytest.raises(MediaError, match="rgba_background_color"):
        decode_image(_save(make_image(3), "PNG"), {"rgba_background_color": color})


# -- issue 7: aspect ratio, frame counts, odd modes ------------------------------------------------

@pytest.mark.parametrize("w,h", [(100_000, 2), (2, 100_000), (401, 2)])
def test_extreme_aspect_ratio_is_refused_from_the_header(w, h):
    with pytest.raises(MediaError, match="aspect ratio"):
        decode_image(bomb_png(w, h))


def test_aspect_ratio_at_the_bound_decodes():
    img = decode_image(_save(Image.new("RGB", (400, 2), (1, 2, 3)), "PNG"))
    assert img.size == (400, 2)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "TIFF", "WEBP"])
def test_many_frames_decode_only_the_first(fmt):
    frames = [Image.new("RGB", (64, 64), (i % 256, 255 - i % 256, 7)) for i in range(300)]
    data = _save(frames[0], fmt, save_all=True, append_images=frames[1:])
    start = time.perf_counter()
    img = decode_image(data)
    assert time.perf_counter() - start < 1.0  # 300 frames cost what one does
    assert img.size == (64, 64) and img.mode == "RGB"
    r, g, _ = img.getpixel((3, 3))
    assert abs(r - 0) <= 8 and abs(g - 255) <= 8  # the first frame's colour (lossy formats)


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF"),
                                      ("CMYK", "TIFF"), ("LAB", "TIFF"), ("1", "PNG"),
                                      ("YCbCr", "TIFF"), ("I;16B", "TIFF")])
def test_wide_and_odd_modes_become_rgb(mode, fmt):
    img = decode_image(_save(Image.new(mode, (9, 7)), fmt))
    assert img.mode == "RGB" and img.size == (9, 7)
