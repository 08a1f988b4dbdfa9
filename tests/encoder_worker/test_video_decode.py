"""The encoder's video decode: the sampled frames, in order and exact for a lossless clip;
anything unusable (garbage, a stream shorter than its header, bad sampling) a MediaError, the
400 the server answers; the patches' grid is the frontend's geometry."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from encoder_worker.decode import MediaError
from encoder_worker.video import decode_video
from frontend.media.video import VideoLimits, frames_to_video

sys.path.insert(0, str(Path(__file__).parents[1] / "frontend"))
from test_video_probe import avi_declaring, encode  # noqa: E402

LIMITS = VideoLimits(1000, 600, 8192, 10**8)


def test_sampled_frames_are_exact_and_in_order():
    clip = np.random.default_rng(0).integers(0, 255, (9, 21, 37, 3), np.uint8)  # odd sizes
    video = decode_video(frames_to_video(clip, "p", LIMITS), lambda total, fps: [0, 3, 8])
    np.testing.assert_array_equal(video.frames, clip[[0, 3, 8]])
    assert video.fps == 3 / 9 * 2  # the sampled frames' rate: 2 fps in memory


@pytest.mark.parametrize("data, match", [
    (b"not a video", "cannot decode video"),
    (avi_declaring(12), "ends after 8 frames; its header declares 12"),
    (encode("mpeg4", "mp4")[:-300], "cannot decode|truncated|ends after"),
    (encode("mjpeg", "avi")[:-3000], "cannot decode|truncated|ends after"),
])
def test_unusable_videos_are_media_errors(data, match):
    with pytest.raises(MediaError, match=match):
        decode_video(data, lambda total, fps: list(range(total)))


def test_header_bounds_and_sampling_errors_are_media_errors():
    with pytest.raises(MediaError, match="too long"):
        decode_video(avi_declaring(10**6), lambda total, fps: [0])

    def refuse(total, fps):
        raise ValueError("num_frames and fps are mutually exclusive")

    with pytest.raises(MediaError, match="mutually exclusive"):
        decode_video(encode("mpeg4", "mp4"), refuse)


def test_core_grid_is_the_frontend_geometry(tmp_path):
    import torch

    from encoder_worker.core import EncoderCore
    from encoder_worker.models import load_encoder
    from frontend.models.qwen2_vl import Qwen2VLPlaceholders
    from frontend.random_model import build_random_qwen2_vl
    from protocol.video import read_header

    path = str(build_random_qwen2_vl(tmp_path))
    core = EncoderCore(load_encoder(path, torch.device("cpu"), torch.float32),
                       max_image_pixels=10**8)
    data = encode("mpeg4", "mp4", num=11, size=(60, 90), rate=8)
    info = read_header(data)
    for kwargs in ({}, {"num_frames": 4}, {"fps": 2.0}):
        geo = Qwen2VLPlaceholders.from_pretrained(path).video_geometry(
            info.width, info.height, info.num_frames, info.fps, kwargs, "p")
        patches = core.prepare(data, kwargs, geo.to_meta(), "video")
        assert patches.grid_thw == geo.grid_thw, kwargs
        assert core.encode([patches])[0].shape[0] == geo.num_tokens
    with pytest.raises(ValueError, match="geometry says"):
        core.prepare(data, {"num_frames": 4}, {**geo.to_meta(), "grid_thw": [9, 4, 6]}, "video")
