"""LLaVA-OneVision geometry: the placeholder count of an image equals transformers' processor's
for the real checkpoints' settings (384 px SigLIP tiles, 36 canvases, anyres_max_9) and for the
tiny test model's, over odd, square, thin and extreme sizes; refused settings name the field."""

from __future__ import annotations

import json
import random

import pytest
import transformers

from protocol.checkpoint import image_processor_config
from protocol.geometry.llava_onevision import DEFAULT_PINPOINTS, LlavaOnevisionGeometry

TINY_PINS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
REAL = {"vision_config": {"image_size": 384, "patch_size": 14}, "vision_aspect_ratio":
        "anyres_max_9", "vision_feature_select_strategy": "full"}
TINY = {"vision_config": {"image_size": 32, "patch_size": 8}, "image_grid_pinpoints": TINY_PINS,
        "vision_aspect_ratio": "anyres_max_2"}
# (height, width)
SIZES = [(1, 1), (2, 3), (37, 91), (91, 37), (64, 64), (33, 33), (480, 640), (640, 480),
         (1080, 1920), (384, 384), (385, 383), (10, 2000), (2000, 10), (1, 500), (500, 1),
         (3000, 3000), (4032, 3024), (7, 4001), (767, 769), (100000, 2), (2, 100000)]


def hf_count(settings: dict, height: int, width: int) -> int:
    """transformers' own count (LlavaOnevisionProcessor._get_number_of_features), on a
    processor built without its tokenizer and video halves (the video processor needs
    torchvision)."""
    vision = settings["vision_config"]
    pins = settings.get("image_grid_pinpoints", DEFAULT_PINPOINTS)
    tile = vision["image_size"]
    proc = object.__new__(transformers.LlavaOnevisionProcessor)
    proc.image_processor = transformers.LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=pins)
    proc.num_image_tokens = (tile // vision["patch_size"]) ** 2
    proc.vision_aspect_ratio = settings["vision_aspect_ratio"]
    return proc._get_number_of_features(height, width, tile, tile)


def geometry(settings: dict) -> LlavaOnevisionGeometry:
    return LlavaOnevisionGeometry(settings, {})


@pytest.mark.parametrize("settings", [REAL, TINY], ids=["real", "tiny"])
def test_counts_equal_transformers(settings):
    geo = geometry(settings)
    rng = random.Random(0)
    sizes = SIZES + [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(400)]
    sizes += [(rng.randint(1, 60), rng.randint(1, 200)) for _ in range(200)]
    for h, w in sizes:
        got = geo.image(w, h)
        assert got.num_tokens == hf_count(settings, h, w), (h, w)
        assert got.grid_thw is None  # 1-D positions: the decoder needs no grid


def test_layout_steps():
    geo = geometry(TINY)
    plan = geo.layout(50, 40)  # 2x2 tiles, height cut from 8 to 6 rows, then shrunk
    assert (plan.canvas_hw, plan.resized_hw, plan.tiles_hw) == ((64, 64), (52, 64), (2, 2))
    assert (plan.kept_hw, plan.packed_hw, plan.num_tokens) == ((6, 8), (4, 6), 16 + 24 + 4)
    plan = geo.layout(60, 30)  # 1x2 tiles fill the canvas: nothing cut, under the budget
    assert (plan.kept_hw, plan.packed_hw, plan.num_tokens) == ((4, 8), (4, 8), 16 + 32 + 4)
    assert geo.image(60, 30).resized_hw == (32, 64)  # the canvas the tiles are cut from


def test_thin_images():
    geo = geometry(TINY)
    # 1 px tall at the widest canvas: no feature row survives the cut, only the base tile.
    plan = geo.layout(100000, 2)
    assert (plan.canvas_hw, plan.kept_hw, plan.num_tokens) == ((32, 32), (0, 4), 16)
    with pytest.raises(ValueError, match="no area"):
        geo.image(0, 5)


@pytest.mark.parametrize("change, match", [
    ({"vision_feature_select_strategy": "default"}, "vision_feature_select_strategy"),
    ({"vision_aspect_ratio": "anyres"}, "vision_aspect_ratio"),
    ({"image_grid_pinpoints": [[32, 48]]}, "multiples"),
    ({"vision_config": {"image_size": 32, "patch_size": 64}}, "patch size"),
])
def test_refused_settings(change, match):
    with pytest.raises(ValueError, match=match):
        geometry(TINY | change)


def test_processor_must_agree_with_the_model():
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        LlavaOnevisionGeometry(TINY, {"image_grid_pinpoints": [[32, 32]]})
    with pytest.raises(ValueError, match="tiles"):
        LlavaOnevisionGeometry(TINY, {"size": {"height": 64, "width": 64}})


def test_read_from_a_checkpoint(tmp_path):
    """config.json and the flat preprocessor_config.json the tiny builder saves."""
    from frontend.random_onevision import build_random_llava_onevision

    folder = build_random_llava_onevision(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    geo = LlavaOnevisionGeometry(config, image_processor_config(folder))
    assert geo.pinpoints == TINY_PINS and geo.max_tiles == 2
    assert geo.image(50, 40).num_tokens == hf_count(TINY, 40, 50)
