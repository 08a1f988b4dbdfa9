"""Qwen2-VL geometry: the resize equals transformers' smart_resize on odd, tiny, huge and thin
sizes, the pixel bounds are read as transformers reads them, and the token count is the grid
over the 2x2 merge."""

from __future__ import annotations

import itertools

import pytest
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    smart_resize as hf_smart_resize,
)

from protocol.geometry import GEOMETRY, ItemGeometry, load_geometry
from protocol.geometry.qwen2_vl import Qwen2VLGeometry, pixel_bounds, smart_resize

# Odd sizes, sizes at the rounding half-way points (42 = 1.5 * 28, 70 = 2.5 * 28: Python rounds
# half to even), below one patch, and sizes that hit the min and max clamps.
SIDES = [1, 3, 13, 14, 27, 28, 29, 41, 42, 43, 69, 70, 71, 97, 111, 333, 640, 1001, 2048, 4097]
BOUNDS = [(56 * 56, 28 * 28 * 1280), (28 * 28 * 2, 28 * 28 * 16), (100, 50_000), (3136, 3136)]


def test_smart_resize_equals_transformers():
    checked = 0
    for (h, w), (low, high) in itertools.product(itertools.product(SIDES, SIDES), BOUNDS):
        if max(h, w) / min(h, w) > 200:
            continue
        assert smart_resize(h, w, 28, low, high) == hf_smart_resize(h, w, 28, low, high), \
            (h, w, low, high)
        checked += 1
    assert checked > 1000


def test_extreme_aspect_ratio_is_refused():
    geo = Qwen2VLGeometry({}, {})
    assert geo.image(2000, 10).grid_thw is not None  # exactly 200:1 is still allowed
    for width, height in [(2001, 10), (10, 2001), (100_000, 2)]:
        with pytest.raises(ValueError, match="aspect ratio"):
            geo.image(width, height)
        with pytest.raises(ValueError):
            hf_smart_resize(height, width)
    with pytest.raises(ValueError, match="no area"):
        geo.image(0, 10)


def test_clamps_and_token_count():
    geo = Qwen2VLGeometry({}, {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16})
    small = geo.image(10, 10)  # grown to the minimum area: 56x56 px, 4x4 patches
    assert small.resized_hw == (56, 56) and small.grid_thw == (1, 4, 4)
    assert small.num_tokens == 4
    big = geo.image(4000, 3000)  # shrunk below the maximum area
    h, w = big.resized_hw
    assert h * w <= 28 * 28 * 16 and h % 28 == 0 and w % 28 == 0
    assert big.grid_thw == (1, h // 14, w // 14) and big.num_tokens == h * w // (28 * 28)
    odd = geo.image(97, 45)
    assert odd == geo.image(97, 45) and odd.num_tokens == odd.grid_thw[1] * odd.grid_thw[2] // 4


@pytest.mark.parametrize("processor", [
    {},
    {"min_pixels": 1000, "max_pixels": 9000},
    {"size": {"shortest_edge": 1568, "longest_edge": 12544}},
    {"size": {"shortest_edge": 1568, "longest_edge": 12544}, "max_pixels": 5000},
])
def test_pixel_bounds_as_transformers_reads_them(processor):
    size = Qwen2VLImageProcessorPil(**processor).size
    assert pixel_bounds(processor) == (size.shortest_edge, size.longest_edge)


def test_missing_bound_is_a_config_error():
    with pytest.raises(ValueError, match="min_pixels and max_pixels"):
        Qwen2VLGeometry({}, {"size": {"shortest_edge": 1568}})


def test_other_patch_settings():
    geo = Qwen2VLGeometry({}, {"patch_size": 16, "merge_size": 2, "min_pixels": 1,
                               "max_pixels": 10 ** 6})
    item = geo.image(100, 70)
    assert item.resized_hw == (64, 96) and item.grid_thw == (1, 4, 6) and item.num_tokens == 6


def test_registered_and_loaded(tmp_path):
    from frontend.random_model import build_random_qwen2_vl

    assert GEOMETRY["Qwen2VLForConditionalGeneration"] == \
        GEOMETRY["Qwen2_5_VLForConditionalGeneration"]  # one image processor for both
    geo = load_geometry(build_random_qwen2_vl(tmp_path))
    assert isinstance(geo, Qwen2VLGeometry) and geo.fixed_image is None
    assert (geo.min_pixels, geo.max_pixels) == (28 * 28 * 2, 28 * 28 * 16)
    item = geo.image(120, 45)
    assert ItemGeometry.from_meta(item.to_meta()) == item  # as it travels in the request
