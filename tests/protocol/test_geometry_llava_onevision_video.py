"""LLaVA-OneVision video geometry: the placeholder count equals transformers' processor's for the
real checkpoints' settings and the tiny model's, frame sampling equals transformers'
default_sample_indices_fn, and video settings the model cannot pool are refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import transformers
from transformers.video_utils import VideoMetadata, default_sample_indices_fn

from protocol.geometry import load_geometry
from protocol.geometry.llava_onevision import DEFAULT_NUM_FRAMES, LlavaOnevisionGeometry

REAL = {"vision_config": {"image_size": 384, "patch_size": 14}}  # 27x27 -> 14x14 per frame
TINY = {"vision_config": {"image_size": 32, "patch_size": 8},
        "image_grid_pinpoints": [[32, 32], [64, 64]]}  # 4x4 -> 2x2
ODD = {"vision_config": {"image_size": 40, "patch_size": 8},
       "image_grid_pinpoints": [[40, 40]]}  # 5x5 -> 3x3: the pool's ceil


def hf_count(settings: dict, frames: int, height: int, width: int) -> int:
    """transformers' own count (LlavaOnevisionProcessor._get_num_multimodal_tokens), on a
    processor built without its tokenizer and video halves."""
    vision = settings["vision_config"]
    proc = object.__new__(transformers.LlavaOnevisionProcessor)
    proc.num_image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    return proc._get_num_multimodal_tokens(video_sizes=[(frames, height, width)])[
        "num_video_tokens"][0]


def geometry(settings: dict, video: dict | None = None) -> LlavaOnevisionGeometry:
    tile = settings["vision_config"]["image_size"]
    return LlavaOnevisionGeometry(settings, {"size": {"height": tile, "width": tile}}, video)


@pytest.mark.parametrize("settings", [REAL, TINY, ODD], ids=["real", "tiny", "odd"])
def test_counts_equal_transformers(settings):
    geo = geometry(settings)
    tile = settings["vision_config"]["image_size"]
    for frames, h, w in [(1, 1, 1), (4, 50, 140), (32, 1080, 1920), (7, 3, 1000), (100, 384, 384)]:
        got = geo.video(w, h, frames, 2.0)
        assert got.num_tokens == hf_count(settings, frames, h, w), (frames, h, w)
        assert got.grid_thw == (frames, 1, 1) and got.resized_hw == (tile, tile)
    assert geo.video(10, 10, 3, 1.0).num_tokens == 3 * math.ceil(
        tile // settings["vision_config"]["patch_size"] / 2) ** 2 + 1


def test_sampling_equals_transformers():
    geo = geometry(TINY)
    for total, fps in [(10, 16.0), (300, 30.0), (7, 2.0), (1, 1.0), (1001, 29.97)]:
        meta = VideoMetadata(total_num_frames=total, fps=fps)
        for n in (1, 3, 4, 7, 32):
            if n <= total:
                want = default_sample_indices_fn(meta, num_frames=n).tolist()
                assert geo.sample_frames(total, fps, num_frames=n) == want, (total, n)
        for rate in (0.01, 0.5, 1.0, 2.0, 8.0):
            if rate <= fps:  # a higher rate asks for more frames than the video has
                want = default_sample_indices_fn(meta, fps=rate).tolist()
                assert geo.sample_frames(total, fps, sample_fps=rate) == want, (total, rate)
    # Neither asked: 32 frames spread evenly; a shorter video keeps all its frames (transformers
    # would raise for a count past the video's).
    assert geo.sample_frames(300, 30.0) == (np.arange(DEFAULT_NUM_FRAMES) * 300 // 32).tolist()
    assert geo.sample_frames(10, 16.0) == list(range(10))
    assert geo.sample_frames(10, 16.0, num_frames=50) == list(range(10))


def test_a_sampling_video_processor_sets_the_default():
    geo = geometry(TINY, {"size": {"height": 32, "width": 32}, "do_sample_frames": True,
                          "num_frames": 8})
    assert geo.sample_frames(100, 25.0) == [i * 100 // 8 for i in range(8)]
    assert len(geo.sample_frames(100, 25.0, num_frames=2)) == 2  # the request's count wins
    rate = geometry(TINY, {"size": {"height": 32, "width": 32}, "do_sample_frames": True,
                           "fps": 1})
    assert len(rate.sample_frames(100, 25.0)) == 4  # 4 s of video at 1 fps
    idle = geometry(TINY, {"size": {"height": 32, "width": 32}, "num_frames": 8})
    assert len(idle.sample_frames(100, 25.0)) == DEFAULT_NUM_FRAMES  # not sampling: ignored


@pytest.mark.parametrize("call, match", [
    (lambda g: g.sample_frames(10, 2.0, num_frames=2, sample_fps=1.0), "mutually exclusive"),
    (lambda g: g.sample_frames(0, 2.0), "needs frames"),
    (lambda g: g.sample_frames(10, 0.0), "needs frames"),
    (lambda g: g.sample_frames(10, 2.0, num_frames=0), "at least 1"),
    (lambda g: g.sample_frames(10, 2.0, sample_fps=-1.0), "positive"),
    (lambda g: g.video(0, 10, 3, 2.0), "area"),
    (lambda g: g.video(10, 10, 0, 2.0), "frames"),
])
def test_refusals(call, match):
    with pytest.raises(ValueError, match=match):
        call(geometry(TINY))


def test_video_frames_must_be_the_tile(tmp_path):
    """The model pools a tile's feature map: frames of another size would not fit it. The
    checkpoint's own video processor config is the one read."""
    with pytest.raises(ValueError, match="video processor makes"):
        geometry(TINY, {"size": {"height": 64, "width": 64}})
    (tmp_path / "config.json").write_text(json.dumps(
        {**TINY, "architectures": ["LlavaOnevisionForConditionalGeneration"]}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 32, "width": 32}, "image_grid_pinpoints": TINY[
            "image_grid_pinpoints"]}))
    assert load_geometry(tmp_path).video(5, 5, 2, 1.0).num_tokens == 9  # falls back to it
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 384, "width": 384}}))
    with pytest.raises(ValueError, match="video processor makes"):
        load_geometry(tmp_path)
