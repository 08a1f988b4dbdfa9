"""LLaVA-OneVision encoder slice: the anyres tiles equal transformers' image processor, and each
image's rows (tower, projector, unpad, anyres_max shrink, newlines) equal the model's
get_image_features, for one odd image and for several sizes in one packed forward; the encoder
core runs them as one batch, and a wrong cut or a swap is caught. A video's frames (one tile
each) and rows (pooled 2x2, one newline) equal get_video_features, packed with images too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from encoder_worker.core import EncoderCore
from encoder_worker.models.llava_onevision import LlavaOnevisionEncoder
from encoder_worker.models.llava_onevision_image import AnyresImageProcessor
from encoder_worker.video import Video
from frontend.media.video import VideoLimits, frames_to_video

# (height, width): odd, thin both ways, tiny, square, one past the anyres_max budget (2x2 tiles
# shrunk) and one under it (1x2 tiles), one that loses every tile row to the cut.
SIZES = [(37, 91), (91, 37), (5, 3), (33, 33), (40, 50), (30, 60), (300, 200), (2, 1000)]
PACK = [(40, 50), (37, 91), (30, 60)]  # 2x2 shrunk, 1x3 cut, 1x2 as is: 44, 43, 52 rows


@pytest.fixture(scope="module")
def tiny_onevision(tmp_path_factory) -> str:
    from frontend.random_onevision import build_random_llava_onevision

    return str(build_random_llava_onevision(tmp_path_factory.mktemp("tiny_onevision")))


@pytest.fixture(scope="module")
def encoder(tiny_onevision) -> LlavaOnevisionEncoder:
    return LlavaOnevisionEncoder(tiny_onevision, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def hf_onevision(tiny_onevision):
    """transformers' (PIL image processor, model), fp32: the reference."""
    processor = transformers.LlavaOnevisionImageProcessorPil.from_pretrained(tiny_onevision)
    model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_onevision, dtype=torch.float32)
    return processor, model.eval()


def hf_features(hf_onevision, images) -> list[torch.Tensor]:
    """Each image tiled (the processor's single-image path), rows as the model packs them."""
    processor, model = hf_onevision
    out = processor(images, return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(out["pixel_values"], out["image_sizes"])
    return list(feats.pooler_output)  # one [num_tokens, hidden] per image


def test_preprocess_equals_hf(encoder, hf_onevision, make_image):
    processor, _ = hf_onevision
    for seed, (h, w) in enumerate(SIZES):
        img = make_image(seed, h, w)
        ours = encoder.preprocess(img)
        ref = processor(img, return_tensors="np")
        rows, cols = encoder.geometry.layout(w, h).tiles_hw
        assert ours.image_hw == (h, w) and ours.grid_thw == (1, rows, cols)
        assert ours.values.shape[0] == 1 + rows * cols  # the whole-image tile first
        assert ours.values.dtype == torch.float32
        # the processor pads its batch to the most tiles; one image has no padding
        np.testing.assert_array_equal(ours.values.numpy(), ref["pixel_values"][0])


@pytest.mark.parametrize("cfg", [
    {"image_mean": [0.48145466, 0.4578275, 0.40821073], "resample": 2},
    {"do_normalize": False, "image_std": [0.25] * 3},
])
def test_preprocess_variants_equal_hf(tiny_onevision, cfg, make_image):
    config = json.loads(Path(tiny_onevision, "config.json").read_text())
    base = json.loads(Path(tiny_onevision, "preprocessor_config.json").read_text())
    base.pop("image_processor_type")
    ours = AnyresImageProcessor.from_config(config, base | cfg)
    ref = transformers.LlavaOnevisionImageProcessorPil(**(base | cfg))
    for seed, (h, w) in enumerate(SIZES):
        img = make_image(seed, h, w)
        np.testing.assert_array_equal(ours(img).values.numpy(),
                                      ref(img, return_tensors="np")["pixel_values"][0])


def test_one_odd_image_equals_hf(encoder, hf_onevision, make_image):
    img = make_image(7, 45, 97)
    (ours,) = encoder.encode_packed([encoder.preprocess(img)])
    (ref,) = hf_features(hf_onevision, [img])
    assert ours.shape == ref.shape == (encoder.num_tokens(97, 45), 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_packed_sizes_equal_hf(encoder, hf_onevision, make_image):
    images = [make_image(i, h, w) for i, (h, w) in enumerate(PACK)]
    items = [encoder.preprocess(img) for img in images]
    ours = encoder.encode_packed(items)
    refs = hf_features(hf_onevision, images)
    assert [o.shape[0] for o in ours] == [44, 43, 52]
    for o, r in zip(ours, refs):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    # Packed in another order, each output follows its own image.
    swapped = encoder.encode_packed([items[2], items[0], items[1]])
    for o, r in zip(swapped, [refs[2], refs[0], refs[1]]):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    # Two images of one size, swapped: the rows follow the pixels, not the slot.
    other = encoder.preprocess(make_image(9, *PACK[0]))
    a, b = encoder.encode_packed([items[0], other])
    b2, a2 = encoder.encode_packed([other, items[0]])
    torch.testing.assert_close(a, a2)
    torch.testing.assert_close(b, b2)
    assert (a - b).abs().max() > 1e-2


def test_multi_image_prompt_variant_equals_hf(encoder, hf_onevision, make_image):
    """The images of a multi-image prompt: each padded to a square and resized to its base tile
    alone (geometry variant "base"), as transformers' processor does for a sample of several
    images; pixels and rows equal its own, and a mixed pack keeps each image's rows."""
    processor, model = hf_onevision
    images = [make_image(i, h, w) for i, (h, w) in enumerate(PACK)]
    geo = encoder.geometry.image(images[0].width, images[0].height, images_in_prompt=3)
    assert geo.variant == "base" and geo.num_tokens == encoder.geometry.side ** 2 + 1
    items = [encoder.preprocess_variant(img, "base") for img in images]
    ref = processor([images], return_tensors="pt")  # one sample of three images
    for i, item in enumerate(items):
        assert item.grid_thw == (1, 0, 0)
        np.testing.assert_array_equal(item.values[0].numpy(), ref["pixel_values"][i][0].numpy())
    with torch.no_grad():
        rows = model.model.get_image_features(ref["pixel_values"], ref["image_sizes"],
                                              batch_num_images=ref["batch_num_images"])
    mixed = encoder.encode_packed([items[0], encoder.preprocess(images[1]), items[2]])
    for o, r in zip([mixed[0], mixed[2]], [rows.pooler_output[0], rows.pooler_output[2]]):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    assert mixed[1].shape[0] == encoder.geometry.image(images[1].width, images[1].height).num_tokens


def test_thin_image_keeps_only_its_base_tile(encoder, hf_onevision, make_image):
    img = make_image(3, 2, 1000)  # the cut leaves no tile row: the base tile's 16 rows alone
    (ours,) = encoder.encode_packed([encoder.preprocess(img)])
    (ref,) = hf_features(hf_onevision, [img])
    assert ours.shape[0] == 16
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_pack_exercises_every_step(encoder):
    """The packed sizes above take each path of the packing: a shrink, a cut, neither."""
    shrunk, cut, plain = (encoder.geometry.layout(w, h) for h, w in PACK)
    assert shrunk.packed_hw != shrunk.kept_hw
    side = encoder.geometry.side
    assert cut.kept_hw != (cut.tiles_hw[0] * side, cut.tiles_hw[1] * side)
    assert plain.kept_hw == plain.packed_hw == (plain.tiles_hw[0] * side, plain.tiles_hw[1] * side)


def test_core_runs_every_size_as_one_batch(encoder, hf_onevision, make_image, to_png):
    core = EncoderCore(encoder, max_image_pixels=1 << 22)
    images = [make_image(i, h, w) for i, (h, w) in enumerate(PACK)]
    inputs = [core.prepare(to_png(img), {}, encoder.geometry.image(img.width, img.height)
                           .to_meta()) for img in images]
    assert core.batches(inputs) == [[0, 1, 2]]
    for o, r in zip(core.encode(inputs), hf_features(hf_onevision, images)):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_loads_only_the_vision_weights(encoder):
    names = {n for n, _ in encoder.tower.named_parameters()}
    assert "embeddings.patch_embedding.weight" in names
    assert not any("post_layernorm" in n or "embed_tokens" in n for n in names)
    assert encoder.newline.shape == (64,)
    assert encoder.hidden_size == 64 and encoder.packs_variable_sizes


def clip(seed: int, num: int = 5, size=(45, 70)) -> np.ndarray:  # [num, H, W, 3] uint8
    return np.random.default_rng(seed).integers(0, 255, (num, *size, 3), np.uint8)


def hf_video(hf_onevision, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels [frames, 3, side, side], rows [num_tokens, hidden]) of transformers: each frame
    the PIL processor's base tile (the video processor needs torchvision), then the model."""
    processor, model = hf_onevision
    pixels = torch.stack([processor(f, return_tensors="pt")["pixel_values"][0][0]
                          for f in frames])
    with torch.no_grad():
        rows = model.model.get_video_features(pixels[None], vision_feature_layer=-1,
                                              vision_feature_select_strategy="full")
    return pixels, rows.pooler_output[0]


def test_video_equals_hf(encoder, hf_onevision):
    frames = clip(0)
    ours = encoder.preprocess_video(Video(frames, 2.0))
    pixels, rows = hf_video(hf_onevision, frames)
    assert ours.grid_thw == (5, 1, 1) and ours.image_hw is None
    np.testing.assert_array_equal(ours.values.numpy(), pixels.numpy())
    (got,) = encoder.encode_packed([ours])
    geo = encoder.geometry.video(70, 45, 5, 2.0)
    assert got.shape == rows.shape == (geo.num_tokens, 64) == (5 * 2 * 2 + 1, 64)
    torch.testing.assert_close(got, rows, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[-1], encoder.newline)  # one newline, after the last frame
    # The frames reversed: other rows, frame by frame in the new order.
    (back,) = encoder.encode_packed([encoder.preprocess_video(Video(frames[::-1].copy(), 2.0))])
    torch.testing.assert_close(back[:4], got[16:20])
    assert (back[:4] - got[:4]).abs().max() > 1e-2


def test_video_packs_with_images(encoder, hf_onevision, make_image):
    """Frames and tiles of a step run as one tower batch; each item keeps its own rows."""
    images = [make_image(i, h, w) for i, (h, w) in enumerate(PACK[:2])]
    frames = clip(1, num=3, size=(20, 90))
    items = [encoder.preprocess(images[0]), encoder.preprocess_video(Video(frames, 2.0)),
             encoder.preprocess(images[1])]
    got = encoder.encode_packed(items)
    refs = hf_features(hf_onevision, images)
    torch.testing.assert_close(got[0], refs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], hf_video(hf_onevision, frames)[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], refs[1], atol=1e-5, rtol=1e-5)


def test_core_samples_and_checks_the_frontend_geometry(tiny_onevision, encoder,
                                                        hf_onevision):
    """Bytes -> decoded -> sampled frames -> rows, under the frontend's frame sampling; a grid
    that disagrees with the sampled frames is the roles disagreeing (ValueError)."""
    from frontend.models.llava_onevision import LlavaOnevisionPlaceholders

    frames = clip(2, num=9)
    data = frames_to_video(frames, "p", VideoLimits(100, 60, 1000, 10**6))  # lossless, 2 fps
    slice_ = LlavaOnevisionPlaceholders.from_pretrained(tiny_onevision)
    core = EncoderCore(encoder, max_image_pixels=1 << 22)
    for kwargs, picked in (({}, range(9)), ({"num_frames": 4}, [0, 2, 4, 6]),
                           ({"fps": 1.0}, [0, 2, 4, 6])):
        geo = slice_.video_geometry(70, 45, 9, 2.0, kwargs, "p")
        inputs = core.prepare(data, kwargs, geo.to_meta(), "video")
        assert inputs.grid_thw == geo.grid_thw == (len(picked), 1, 1), kwargs
        (rows,) = core.encode([inputs])
        assert rows.shape[0] == geo.num_tokens
        torch.testing.assert_close(rows, hf_video(hf_onevision, frames[list(picked)])[1],
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="geometry says"):
        core.prepare(data, {"num_frames": 4}, {**geo.to_meta(), "grid_thw": [5, 1, 1]}, "video")
