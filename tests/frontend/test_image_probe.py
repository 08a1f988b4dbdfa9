"""probe_image reads headers only and refuses unusable images before an encoder sees them."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from frontend.errors import RequestError
from frontend.media.probe import ImageInfo, probe_image

PARAM = "messages[0].content[0].image_url"
LIMIT = 50_000_000


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 2x2 PNG whose IHDR is rewritten to declare another size (CRC fixed up)."""
    data = bytearray(_encode(Image.new("RGB", (2, 2)), "PNG"))
    ihdr = 8  # after the signature: length(4) type(4) payload(13) crc(4)
    payload = struct.pack(">II", width, height) + bytes(data[ihdr + 16:ihdr + 21])
    data[ihdr + 8:ihdr + 21] = payload
    data[ihdr + 21:ihdr + 25] = struct.pack(">I", zlib.crc32(b"IHDR" + payload))
    return bytes(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_reads_size_and_format(fmt):
    info = probe_image(_encode(Image.new("RGB", (37, 21)), fmt), PARAM, LIMIT)
    assert info == ImageInfo(37, 21, fmt)


def test_header_only():
    # A header claiming a big (but allowed) image with no pixel data behind it probes fine:
    # proof that nothing is decoded here.
    assert probe_image(_png_claiming(4000, 3000), PARAM, LIMIT) == ImageInfo(4000, 3000, "PNG")


@pytest.mark.parametrize("size", [(1, 1), (1, 50), (50, 1)])
def test_too_thin(size):
    with pytest.raises(RequestError, match="too small") as e:
        probe_image(_encode(Image.new("RGB", size), "PNG"), PARAM, LIMIT)
    assert e.value.param == PARAM and e.value.status == 400


def test_min_side_is_configurable():
    data = _encode(Image.new("RGB", (8, 8)), "PNG")
    assert probe_image(data, PARAM, LIMIT, min_side=8).width == 8
    with pytest.raises(RequestError, match="at least 9"):
        probe_image(data, PARAM, LIMIT, min_side=9)


@pytest.mark.parametrize("w,h", [(10_000, 6_000), (100_000, 100_000)])
def test_decompression_bomb(w, h):
    # 60 Mpx passes PIL's own bound but not ours; 10 Gpx trips PIL's DecompressionBombError.
    with pytest.raises(RequestError, match="too large") as e:
        probe_image(_png_claiming(w, h), PARAM, LIMIT)
    assert e.value.param == PARAM


@pytest.mark.parametrize("data", [
    b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 10,
    b"GIF89a\x01",
    # EPS is outside the allowed formats (PIL would run Ghostscript to decode it).
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n",
    b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
])
def test_undecodable(data):
    with pytest.raises(RequestError, match="cannot decode") as e:
        probe_image(data, PARAM, LIMIT)
    assert e.value.param == PARAM and e.value.status == 400


# -- issue 7: aspect ratio, and in-memory arrays checked from their shape -------------------------

@pytest.mark.parametrize("w,h", [(100_000, 2), (2, 100_000), (401, 2), (20_001, 100)])
def test_extreme_aspect_ratio(w, h):
    with pytest.raises(RequestError, match="aspect ratio") as e:
        probe_image(_png_claiming(w, h), PARAM, LIMIT)
    assert e.value.param == PARAM


def test_aspect_ratio_at_the_bound():
    assert probe_image(_png_claiming(400, 2), PARAM, LIMIT) == ImageInfo(400, 2, "PNG")


def test_to_pil_image_layouts():
    import numpy as np
    import torch

    from frontend.media.probe import to_pil_image

    rgb = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)  # [H, W, C]
    for value in (rgb, rgb / 255.0, rgb.astype(np.int32), torch.from_numpy(rgb).permute(2, 0, 1),
                  torch.from_numpy(rgb).permute(2, 0, 1).to(torch.bfloat16) / 255):
        img = to_pil_image(value, PARAM, LIMIT)
        assert img.mode == "RGB" and img.size == (9, 6)
        if value.dtype != torch.bfloat16:  # bfloat16 keeps 8 bits of mantissa: not exact
            assert np.array_equal(np.asarray(img), rgb)
    assert to_pil_image(rgb[..., 0], PARAM, LIMIT).mode == "L"
    assert to_pil_image(np.dstack([rgb, rgb[..., :1]]), PARAM, LIMIT).mode == "RGBA"


@pytest.mark.parametrize("make,match", [
    (lambda np, torch: np.broadcast_to(np.zeros(3, np.uint8), (10**6, 10**6, 3)), "too large"),
    (lambda np, torch: torch.zeros(1, 1, 1).expand(3, 10**6, 10**6), "too large"),
    (lambda np, torch: torch.zeros(1, 1, 1, dtype=torch.bfloat16).expand(3, 10**6, 10**6),
     "too large"),
    (lambda np, torch: np.zeros((3, 2000), np.uint8)[None].repeat(3, 0).T, "aspect"),
    (lambda np, torch: np.zeros((4, 4, 3), object), "uint8 or float"),
    (lambda np, torch: "cat.png", "got str"),
])
def test_to_pil_image_refuses_before_reading(make, match):
    import numpy as np
    import torch

    from frontend.media.probe import to_pil_image

    with pytest.raises(RequestError, match=match) as e:
        to_pil_image(make(np, torch), PARAM, LIMIT)
    assert e.value.param == PARAM
