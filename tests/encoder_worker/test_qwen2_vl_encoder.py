"""Qwen2-VL and Qwen2.5-VL encoder slices: preprocessing equals transformers' image processor,
the packed tower equals the model's get_image_features for one image and for several sizes in
one forward, and the encoder loop runs every ready size as one batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from test_encoder_loop import embeddings, pump, request

from encoder_worker.config import EncoderConfig
from encoder_worker.models import ENCODER_REGISTRY, load_encoder
from encoder_worker.models.qwen2_vl import Qwen2VLEncoder
from encoder_worker.models.qwen2_vl_image import Qwen2VLImageProcessor
from encoder_worker.server import INTERNAL_ERROR, EncoderProc
from protocol.addresses import tcp
from protocol.geometry.qwen2_vl import Qwen2VLGeometry

# (height, width): odd sizes, one grown to min_pixels, one shrunk to max_pixels, a thin one.
SIZES = [(37, 91), (120, 45), (33, 33), (9, 14), (301, 257), (15, 120)]
PACK = [(37, 91), (120, 45), (64, 64)]  # grids (1,2,6), (1,8,4), (1,4,4): 3 + 8 + 4 tokens


HF_MODELS = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
             "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}


@pytest.fixture(scope="module", params=list(HF_MODELS))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tiny_qwen2_vl(tmp_path_factory, arch) -> str:
    from frontend.random_model import build_random_qwen2_vl

    return str(build_random_qwen2_vl(tmp_path_factory.mktemp(arch), arch=arch))


@pytest.fixture(scope="module")
def encoder(tiny_qwen2_vl) -> Qwen2VLEncoder:
    return load_encoder(tiny_qwen2_vl, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def hf_qwen2_vl(tiny_qwen2_vl, arch):
    """transformers' (PIL image processor, model), fp32: the reference."""
    processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(tiny_qwen2_vl)
    model = HF_MODELS[arch].from_pretrained(tiny_qwen2_vl, dtype=torch.float32)
    return processor, model.eval()


def hf_features(hf_qwen2_vl, images) -> list[torch.Tensor]:
    processor, model = hf_qwen2_vl
    out = processor(images, return_tensors="pt")
    with torch.no_grad():
        feats = model.get_image_features(out["pixel_values"], out["image_grid_thw"])
    return list(feats.pooler_output)  # one [num_tokens, hidden] per image


def test_registry():
    assert ENCODER_REGISTRY["Qwen2VLForConditionalGeneration"] == \
        ENCODER_REGISTRY["Qwen2_5_VLForConditionalGeneration"]


def test_preprocess_equals_hf(encoder, hf_qwen2_vl, make_image):
    processor, _ = hf_qwen2_vl
    for seed, (h, w) in enumerate(SIZES):
        img = make_image(seed, h, w)
        ours = encoder.preprocess(img)
        ref = processor(img, return_tensors="np")
        assert ours.grid_thw == tuple(ref["image_grid_thw"][0])
        assert ours.values.dtype == torch.uint8  # normalized on the tower's device
        pixels = encoder.processor.pixel_values(ours.values)
        np.testing.assert_allclose(pixels.numpy(), ref["pixel_values"], atol=1e-6, rtol=0)
        assert encoder.num_tokens(w, h) == ours.values.shape[0] // 4


@pytest.mark.parametrize("cfg", [
    {"min_pixels": 28 * 28 * 8, "max_pixels": 28 * 28 * 40, "resample": 2},
    {"size": {"shortest_edge": 3136, "longest_edge": 28 * 28 * 30}, "do_normalize": False},
    {"min_pixels": 3136, "max_pixels": 28 * 28 * 20, "image_mean": [0.5] * 3,
     "image_std": [0.25] * 3},
])
def test_preprocess_variants_equal_hf(cfg, make_image):
    ours = Qwen2VLImageProcessor(Qwen2VLGeometry({}, cfg), cfg)
    ref = transformers.Qwen2VLImageProcessorPil(**cfg)
    for seed, (h, w) in enumerate(SIZES):
        img = make_image(seed, h, w)
        out = ref(img, return_tensors="np")
        patches = ours(img)
        assert patches.grid_thw == tuple(out["image_grid_thw"][0])
        np.testing.assert_allclose(ours.pixel_values(patches.values).numpy(),
                                   out["pixel_values"], atol=1e-6, rtol=0)


def test_one_odd_image_equals_hf(encoder, hf_qwen2_vl, make_image):
    img = make_image(7, 45, 97)
    (ours,) = encoder.encode_packed([encoder.preprocess(img)])
    (ref,) = hf_features(hf_qwen2_vl, [img])
    assert ours.shape == ref.shape == (encoder.num_tokens(97, 45), 64)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_packed_sizes_equal_hf(encoder, hf_qwen2_vl, make_image):
    images = [make_image(i, h, w) for i, (h, w) in enumerate(PACK)]
    items = [encoder.preprocess(img) for img in images]
    assert [it.grid_thw for it in items] == [(1, 2, 6), (1, 8, 4), (1, 4, 4)]
    ours = encoder.encode_packed(items)
    refs = hf_features(hf_qwen2_vl, images)
    assert [o.shape[0] for o in ours] == [3, 8, 4]
    for o, r in zip(ours, refs):
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
    # Each image attends only to itself: packed alone, it gives the same rows.
    for item, o in zip(items, ours):
        torch.testing.assert_close(encoder.encode_packed([item])[0], o, atol=1e-5, rtol=1e-5)
    # Packed in another order, each output follows its own image (a swap would fail above).
    swapped = encoder.encode_packed([items[2], items[0], items[1]])
    torch.testing.assert_close(swapped[1], refs[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(swapped[0][:3], refs[0], atol=1e-2)


def test_flattened_positions_would_not_pass(encoder, hf_qwen2_vl, make_image, monkeypatch):
    """The parity above checks the merge-window order of the rotary positions: row-major
    positions (the natural mistake) move the output well past the tolerance."""
    img = make_image(3, 56, 84)  # grid (1, 4, 6): windows and rows differ in order
    (ref,) = hf_features(hf_qwen2_vl, [img])
    tower = encoder.tower
    head_dim = tower.head_dim
    quarter = torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2)
    inv_freq = 1.0 / tower.theta ** quarter

    def row_major(grids):
        (_, h, w), = grids
        rows = torch.arange(h).repeat_interleave(w)[:, None] * inv_freq
        cols = torch.arange(w).repeat(h)[:, None] * inv_freq
        angles = torch.cat((rows, cols, rows, cols), dim=-1)
        return angles.cos(), angles.sin()

    monkeypatch.setattr(tower, "rotary", row_major)
    (wrong,) = encoder.encode_packed([encoder.preprocess(img)])
    assert (wrong - ref).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["qwen2_5_vl"], indirect=True)
def test_windows_matter_in_qwen2_5(encoder, hf_qwen2_vl, make_image, monkeypatch):
    """Qwen2.5-VL's window attention is checked too: attending over whole images in every
    block moves the output well past the tolerance."""
    img = make_image(4, 112, 112)  # 4x4 merged tokens: four 2x2 windows
    (ref,) = hf_features(hf_qwen2_vl, [img])
    monkeypatch.setattr(encoder.tower, "full_blocks", set(range(len(encoder.tower.blocks))))
    (wrong,) = encoder.encode_packed([encoder.preprocess(img)])
    assert (wrong - ref).abs().max() > 1e-2


def test_loads_only_the_vision_weights(encoder):
    names = {n for n, _ in encoder.tower.named_parameters()}
    assert "patch_embed.proj.weight" in names and "merger.mlp.2.weight" in names
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    assert encoder.hidden_size == 64 and encoder.packs_variable_sizes


@pytest.fixture
def proc(tiny_qwen2_vl):
    p = EncoderProc(EncoderConfig(tiny_qwen2_vl, device="cpu", max_wait_ms=1000), tcp())
    p.sent = []
    p.io.send = lambda addr, msg, buffers=(): p.sent.append((addr, msg, list(buffers)))
    yield p
    p.close()


def test_loop_encodes_sizes_in_one_forward(proc, hf_qwen2_vl, make_image, to_png):
    images = [make_image(i, h, w) for i, (h, w) in enumerate(PACK)]
    for i, img in enumerate(images):
        proc._handle(request(f"k{i}", to_png(img), f"r{i}"))
    proc._handle(request("k0", to_png(images[0]), "again"))  # the same image: joins k0
    done = pump(proc, 4)
    assert all(d.status == 200 for d in done)
    assert proc.stats.num_batches == 1 and proc.stats.num_encoded == 3
    out = {m.key: t for _, m, t in embeddings(proc)}
    for i, ref in enumerate(hf_features(hf_qwen2_vl, images)):
        torch.testing.assert_close(out[f"k{i}"], ref, atol=1e-4, rtol=1e-4)
    assert proc._heartbeat().stats.num_batches == 1


def test_loop_checks_the_request_geometry(proc, encoder, make_image, to_png):
    img = make_image(0, 37, 91)
    right = encoder.processor.geometry.image(91, 37)
    wrong = {**right.to_meta(), "grid_thw": [1, 4, 4]}
    proc._handle(request("ok", to_png(img), "r1", geometry=right.to_meta()))
    proc._handle(request("bad", to_png(img), "r2", geometry=wrong))
    done = {d.request_id: d for d in pump(proc, 2)}
    assert done["r1"].status == 200
    assert (done["r2"].status, done["r2"].message) == (500, INTERNAL_ERROR)
