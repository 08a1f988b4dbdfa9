"""LLaVA encoder slice: preprocessing equals transformers' CLIP image processor, and tower +
projector equal LlavaForConditionalGeneration.get_image_features, loading only their weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from encoder_worker.models import ENCODER_REGISTRY, load_encoder
from encoder_worker.models.clip_image import ClipImageProcessor, normalize
from encoder_worker.models.llava import LlavaEncoder

SIZES = [(40, 50), (97, 31), (32, 32), (5, 200), (20, 20), (333, 1)]


@pytest.fixture(scope="module")
def encoder(tiny_llava) -> LlavaEncoder:
    return load_encoder(tiny_llava, torch.device("cpu"), torch.float32)


def test_registry():
    assert "LlavaForConditionalGeneration" in ENCODER_REGISTRY


def test_preprocess_equals_hf(encoder, hf_llava, make_image):
    processor, _ = hf_llava
    for seed, (h, w) in enumerate(SIZES):
        img = make_image(seed, h, w)
        planes = encoder.preprocess(img)  # uint8: the tower normalizes on its device
        assert planes.dtype == torch.uint8 and planes.shape == (3, 32, 32)
        ours = encoder.processor(img)
        ref = processor(img, return_tensors="np")["pixel_values"][0]
        assert ours.dtype == torch.float32 and ours.shape == (3, 32, 32)
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6, rtol=0)
        assert torch.equal(normalize(planes, torch.from_numpy(encoder.processor.lut)), ours)


@pytest.mark.parametrize("cfg", [
    # shortest edge below the crop: transformers pads with zeros before normalizing
    {"size": {"shortest_edge": 16}, "crop_size": {"height": 24, "width": 20}, "resample": 2},
    {"size": {"height": 30, "width": 18}, "do_center_crop": False, "do_normalize": False},
    {"size": 24, "crop_size": 24, "image_mean": [0.5] * 3, "image_std": [0.25] * 3},
])
def test_preprocess_variants_equal_hf(cfg, make_image):
    ours = ClipImageProcessor.from_dict(cfg)
    ref = transformers.CLIPImageProcessorPil(**cfg)
    for seed, (h, w) in enumerate(SIZES):
        img = make_image(seed, h, w)
        np.testing.assert_allclose(ours(img).numpy(),
                                   ref(img, return_tensors="np")["pixel_values"][0],
                                   atol=1e-6, rtol=0)


def test_old_preprocessor_config_json(tiny_llava, tmp_path, make_image):
    nested = json.loads((Path(tiny_llava) / "processor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(nested["image_processor"]))
    img = make_image(7)
    new = ClipImageProcessor.from_pretrained(tiny_llava)(img)
    assert torch.equal(ClipImageProcessor.from_pretrained(tmp_path)(img), new)


def test_encode_equals_hf(encoder, hf_features, make_image):
    images = [make_image(seed, h, w) for seed, (h, w) in enumerate(SIZES[:4])]
    ours = encoder.encode(torch.stack([encoder.preprocess(i) for i in images]))
    ref = hf_features(images)
    floats = encoder.encode(torch.stack([encoder.processor(i) for i in images]))
    assert all(torch.equal(a, b) for a, b in zip(ours, floats))  # planes or pixel values
    assert len(ours) == len(images)
    for o, r in zip(ours, ref):
        assert o.shape == (encoder.num_tokens(50, 40), encoder.hidden_size) == (16, 64)
        torch.testing.assert_close(o, r, atol=1e-5, rtol=0)
    assert (ours[0] - ours[1]).abs().max() > 0.1  # different images, different embeddings
    # Batch composition does not change an item's embedding.
    alone = encoder.encode(encoder.preprocess(images[2])[None])[0]
    torch.testing.assert_close(alone, ours[2], atol=1e-5, rtol=0)


def test_loads_only_tower_and_projector(encoder):
    names = [n for n, _ in encoder.tower.named_parameters()]
    # feature layer -2 of a 3-layer tower: layer 2 and post_layernorm are never built
    assert len(encoder.tower.layers) == 2
    assert not any("post_layernorm" in n for n in names)


def _variant(tiny_llava: str, out: Path, **overrides) -> Path:
    """A random LLaVA with other feature settings, saved sharded like a big checkpoint."""
    config = transformers.AutoConfig.from_pretrained(tiny_llava)
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(1)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out, max_shard_size="100KB")
    shutil.copy(Path(tiny_llava) / "processor_config.json", out)
    return out


def test_feature_layer_list_and_full_strategy(tiny_llava, tmp_path, make_image):
    path = _variant(tiny_llava, tmp_path / "v", vision_feature_layer=[0, -1],
                    vision_feature_select_strategy="full")
    assert (path / "model.safetensors.index.json").is_file()
    ours = LlavaEncoder(str(path), torch.device("cpu"), torch.float32)
    processor = transformers.CLIPImageProcessorPil.from_pretrained(path)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
    images = [make_image(s) for s in range(2)]
    pixels = torch.from_numpy(processor(images, return_tensors="np")["pixel_values"])
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=pixels).pooler_output
    out = ours.encode(pixels)
    assert ours.num_tokens(1, 1) == 17 and out[0].shape == (17, 64)  # CLS kept
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=0)


def test_transformers4_weight_names(tiny_llava, tmp_path, encoder, make_image):
    """Older checkpoints: ``vision_tower.vision_model.*`` and no ``model.`` prefix."""
    shutil.copytree(tiny_llava, tmp_path / "old")
    weights = load_file(str(tmp_path / "old" / "model.safetensors"))
    renamed = {}
    for k, v in weights.items():
        k = k.removeprefix("model.")
        if k.startswith("vision_tower."):
            k = "vision_tower.vision_model." + k.removeprefix("vision_tower.")
        renamed[k] = v
    save_file(renamed, str(tmp_path / "old" / "model.safetensors"))
    old = LlavaEncoder(str(tmp_path / "old"), torch.device("cpu"), torch.float32)
    pixels = encoder.preprocess(make_image(3))[None]
    torch.testing.assert_close(old.encode(pixels)[0], encoder.encode(pixels)[0], atol=0, rtol=0)


def test_bf16(tiny_llava, encoder, make_image):
    bf16 = LlavaEncoder(tiny_llava, torch.device("cpu"), torch.bfloat16)
    pixels = encoder.preprocess(make_image(4))[None]
    out = bf16.encode(pixels)[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), encoder.encode(pixels)[0], atol=0.1, rtol=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 0.1)])
def test_cuda_matches_cpu(tiny_llava, encoder, make_image, dtype, tol):
    gpu = LlavaEncoder(tiny_llava, torch.device("cuda"), dtype)
    pixels = torch.stack([encoder.preprocess(make_image(s)) for s in range(4)])
    out = gpu.encode(pixels)
    assert out[0].device.type == "cuda" and out[0].dtype == dtype
    for o, r in zip(out, encoder.encode(pixels)):
        torch.testing.assert_close(o.float().cpu(), r, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_cuda_tower_graphs_match_eager(tiny_llava, encoder, make_image):
    """Graph replays (batch 1, 3 padded to 4, 8) equal the eager tower; 9 runs eagerly."""
    from encoder_worker.graphs import TowerGraphs

    gpu = LlavaEncoder(tiny_llava, torch.device("cuda"), torch.float32)
    graphs = TowerGraphs(gpu, gpu.graph_input_shape())
    graphs.capture()
    pixels = torch.stack([encoder.preprocess(make_image(s)) for s in range(9)]).cuda()
    for n in (1, 3, 8, 9):
        eager = [t.clone() for t in gpu.encode(pixels[:n])]
        got = [t.clone() for t in graphs.encode(pixels[:n])]
        assert len(got) == n
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert graphs.num_replays == 3
    # Another image in the same slot changes the output: the replay really reads the input.
    swapped = graphs.encode(pixels[1:2])[0].clone()
    assert not torch.allclose(swapped, graphs.encode(pixels[:1])[0])


# -- issue 7: every resize intermediate is bounded, whatever the config says ---------------------

LLAVA15 = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}


@pytest.fixture
def resize_sizes(monkeypatch):
    """The (width, height) of every PIL resize output (PIL itself still does the work)."""
    from PIL import Image

    sizes, original = [], Image.Image.resize

    def recording(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    return sizes


@pytest.mark.parametrize("w,h", [(100_000, 2), (2, 100_000), (67_200, 336)])
def test_extreme_aspect_resizes_only_the_crop(w, h, resize_sizes):
    from PIL import Image

    from encoder_worker.models.clip_image import EXACT_RESIZE_PIXELS

    out = ClipImageProcessor.from_dict(LLAVA15)(Image.new("RGB", (w, h), (200, 10, 10)))
    assert out.shape == (3, 336, 336)
    assert all(rw * rh <= EXACT_RESIZE_PIXELS for rw, rh in resize_sizes)
    assert resize_sizes == [(336, 336)]  # the crop window, not 336 x 16.8M


def test_crop_window_resize_is_close_to_the_full_one(make_image):
    # 200:1, past EXACT_RESIZE_PIXELS at 336: within 2 levels of transformers on few pixels.
    cfg = {**LLAVA15, "do_normalize": False}
    img = make_image(3, 80, 16_000)
    ours = ClipImageProcessor.from_dict(cfg)(img).numpy()
    ref = transformers.CLIPImageProcessorPil(**cfg)(img, return_tensors="np")["pixel_values"][0]
    diff = np.abs(ours - ref) * 255
    assert diff.max() <= 2.01 and (diff > 0.5).mean() < 0.01


def test_uncropped_giant_targets_are_refused():
    from PIL import Image

    from encoder_worker.decode import MediaError

    proc = ClipImageProcessor.from_dict({"size": {"shortest_edge": 2048},
                                         "do_center_crop": False})
    with pytest.raises(MediaError, match="would be resized to"):
        proc(Image.new("RGB", (400, 2)))  # 409600 x 2048
    assert proc(Image.new("RGB", (40, 20))).shape == (3, 2048, 4096)
