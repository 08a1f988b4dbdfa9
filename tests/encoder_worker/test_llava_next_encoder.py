"""LLaVA-NeXT encoder slice: the anyres tiles equal transformers' LlavaNextImageProcessorPil,
and each image's rows (CLIP tower to layer -2, CLS dropped, projector, unpad cut, newlines, no
shrink) equal the model's get_image_features, alone and packed in one forward; only the vision
weights that run are loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from encoder_worker.core import EncoderCore
from encoder_worker.models import load_encoder
from encoder_worker.models.llava_next import LlavaNextEncoder

# (height, width): odd, thin both ways, tiny, square, large, one that loses every tile row
SIZES = [(37, 91), (91, 37), (5, 3), (33, 33), (40, 50), (300, 200), (2, 1000)]


@pytest.fixture(scope="module")
def tiny_next(tmp_path_factory) -> str:
    from frontend.random_llava_next import build_random_llava_next

    return str(build_random_llava_next(tmp_path_factory.mktemp("tiny_next")))


@pytest.fixture(scope="module")
def encoder(tiny_next) -> LlavaNextEncoder:
    enc = load_encoder(tiny_next, torch.device("cpu"), torch.float32)  # through the registry
    assert isinstance(enc, LlavaNextEncoder)
    return enc


@pytest.fixture(scope="module")
def hf_next(tiny_next):
    processor = transformers.LlavaNextImageProcessorPil.from_pretrained(tiny_next)
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(
        tiny_next, dtype=torch.float32)
    return processor, model.eval()


def hf_rows(hf_next, images) -> list[torch.Tensor]:
    processor, model = hf_next
    out = processor(images, return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(out["pixel_values"], out["image_sizes"])
    return list(feats.pooler_output)  # one [num_tokens, hidden] per image


def test_preprocess_equals_hf(encoder, hf_next, make_image):
    processor, _ = hf_next
    for seed, (h, w) in enumerate(SIZES):
        img = make_image(seed, h, w)
        ours = encoder.preprocess(img)
        rows, cols = encoder.geometry.layout(w, h).tiles_hw
        assert ours.grid_thw == (1, rows, cols) and ours.values.shape[0] == 1 + rows * cols
        np.testing.assert_array_equal(ours.values.numpy(),
                                      processor(img, return_tensors="np")["pixel_values"][0])


def test_rows_equal_hf_alone_and_packed(encoder, hf_next, make_image):
    images = [make_image(i, h, w) for i, (h, w) in enumerate(SIZES)]
    refs = hf_rows(hf_next, images)
    for img, ref in zip(images, refs):
        (ours,) = encoder.encode_packed([encoder.preprocess(img)])
        assert ours.shape == ref.shape == (encoder.num_tokens(img.width, img.height), 64)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    packed = encoder.encode_packed([encoder.preprocess(img) for img in images[::-1]])
    for ours, ref in zip(packed, refs[::-1]):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (packed[-1][:16] - packed[-2][:16]).abs().max() > 1e-2  # rows follow the pixels


def test_no_shrink_and_cls_dropped(encoder):
    """A 2x2-tile image keeps its whole unpadded map (OneVision would shrink it), and a tile
    gives (32 / 8)^2 = 16 rows: CLIP's CLS token is not one of them."""
    plan = encoder.geometry.layout(50, 40)  # wider than its 2x2 canvas: rows cut 8 -> 6
    assert plan.tiles_hw == (2, 2) and plan.packed_hw == plan.kept_hw == (6, 8)
    assert plan.num_tokens == 16 + 6 * 8 + 6 and encoder.drop_cls


def test_core_runs_every_size_as_one_batch(encoder, hf_next, make_image, to_png):
    core = EncoderCore(encoder, max_image_pixels=1 << 22)
    images = [make_image(i, h, w) for i, (h, w) in enumerate(SIZES[:3])]
    # several images per prompt: each is still tiled (no base-tile variant)
    geos = [encoder.geometry.image(img.width, img.height, images_in_prompt=3) for img in images]
    assert all(g.variant is None for g in geos)
    inputs = [core.prepare(to_png(img), {}, g.to_meta()) for img, g in zip(images, geos)]
    assert core.batches(inputs) == [[0, 1, 2]]
    for o, r in zip(core.encode(inputs), hf_rows(hf_next, images)):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_loads_only_the_vision_weights_that_run(encoder):
    names = {n for n, _ in encoder.tower.named_parameters()}
    assert "pre_layrnorm.weight" in names and "embeddings.patch_embedding.weight" in names
    assert len(encoder.tower.layers) == 2  # feature layer -2 of 3: the last never runs
    assert not any("post_layernorm" in n or "embed_tokens" in n for n in names)
    assert encoder.newline.shape == (64,) and encoder.hidden_size == 64
