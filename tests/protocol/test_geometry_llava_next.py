"""LLaVA-NeXT geometry: the placeholder count of an image equals transformers' LlavaNextProcessor
for the released checkpoints' settings (336 px CLIP tiles, five canvases) and the tiny test
model's, over odd, square, thin and extreme sizes; settings the packing can't lay out are
refused."""

from __future__ import annotations

import random

import pytest
import transformers

from protocol.geometry.llava_next import DEFAULT_PINPOINTS, LlavaNextGeometry

TINY_PINS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
REAL = {"vision_config": {"image_size": 336, "patch_size": 14}}  # every other setting default
TINY = {"vision_config": {"image_size": 32, "patch_size": 8}, "image_grid_pinpoints": TINY_PINS}
SIZES = [(1, 1), (2, 3), (37, 91), (91, 37), (64, 64), (33, 33), (480, 640), (640, 480),
         (1080, 1920), (336, 336), (337, 335), (10, 2000), (2000, 10), (1, 500), (500, 1),
         (4032, 3024), (100000, 2), (2, 100000)]


def processor_config(tile: int) -> dict:
    return {"size": {"shortest_edge": tile}, "crop_size": {"height": tile, "width": tile}}


def hf_count(settings: dict, height: int, width: int) -> int:
    """transformers' own count (LlavaNextProcessor's replace_image_token arithmetic), on a
    processor built without its tokenizer."""
    vision = settings["vision_config"]
    tile = vision["image_size"]
    proc = object.__new__(transformers.LlavaNextProcessor)
    proc.image_processor = transformers.LlavaNextImageProcessorPil(
        **processor_config(tile),
        image_grid_pinpoints=settings.get("image_grid_pinpoints", DEFAULT_PINPOINTS))
    proc.patch_size, proc.num_additional_image_tokens = vision["patch_size"], 1
    proc.vision_feature_select_strategy = "default"
    return proc._get_number_of_features(height, width, tile, tile) - 1  # "default": no CLS


@pytest.mark.parametrize("settings", [REAL, TINY], ids=["real", "tiny"])
def test_counts_equal_transformers(settings):
    geo = LlavaNextGeometry(settings, processor_config(settings["vision_config"]["image_size"]))
    rng = random.Random(0)
    sizes = SIZES + [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(400)]
    sizes += [(rng.randint(1, 60), rng.randint(1, 200)) for _ in range(200)]
    for h, w in sizes:
        for images_in_prompt in (1, 3):  # every image is tiled, however many
            got = geo.image(w, h, images_in_prompt)
            assert got.num_tokens == hf_count(settings, h, w), (h, w)
            assert got.grid_thw is None and got.variant is None


def test_defaults_are_transformers():
    geo = LlavaNextGeometry({}, {})
    assert (geo.tile, geo.side, geo.pinpoints, geo.max_tiles) == (336, 24, DEFAULT_PINPOINTS,
                                                                  None)


@pytest.mark.parametrize("config, processor, match", [
    ({**TINY, "vision_feature_select_strategy": "full"}, processor_config(32), "CLS"),
    (TINY, {"size": {"shortest_edge": 32}, "crop_size": {"height": 16, "width": 16}},
     "one square tile size"),
    (TINY, processor_config(64), "tower takes 32x32"),
    (TINY, {**processor_config(32), "image_grid_pinpoints": [[32, 64]]}, "differ"),
    ({**TINY, "image_grid_pinpoints": [[32, 48]]}, {}, "multiples"),
])
def test_refusals(config, processor, match):
    with pytest.raises(ValueError, match=match):
        LlavaNextGeometry(config, processor)
