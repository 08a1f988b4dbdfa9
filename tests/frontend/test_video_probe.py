"""Video parts in the frontend: the header probe's refusals (corrupt bytes, no frames, a header
declaring 10^6 frames or 10^5 px sides, over the byte cap, more videos than the limit), each a
400 naming the part, before any frame is decoded; and a real server answering a bad video with
that 400 and a good one right after."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from frontend.config import FrontendConfig
from frontend.errors import RequestError
from frontend.media.fetch import MediaFetcher
from frontend.media.parse import parse_media, resolve
from frontend.models.qwen2_vl import Qwen2VLPlaceholders
from protocol.geometry.qwen2_vl import Qwen2VLGeometry

PART = "messages[0].content[1].video_url"
GEOMETRY = Qwen2VLGeometry({}, {"min_pixels": 28 * 28 * 2, "max_pixels": 28 * 28 * 16})


def encode(codec: str, fmt: str, num: int = 8, size=(32, 48), rate: int = 4) -> bytes:
    """A small clip of gradient frames, made in memory."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height = size[1], size[0]
        s.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for i in range(num):
            frame = np.full((*size, 3), 20 * i % 256, np.uint8)
            c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        c.mux(s.encode())
    return buf.getvalue()


def avi_declaring(frames: int) -> bytes:
    """An 8-frame MJPEG AVI whose stream header (strh dwLength) claims ``frames`` frames."""
    data = bytearray(encode("mjpeg", "avi"))
    at = data.find(b"strh") + 8 + 32  # fcc type + handler, flags, priority+language, ...
    struct.pack_into("<I", data, at, frames)
    return bytes(data)


def y4m(width: int, height: int, frames: int) -> bytes:
    """A raw YUV4MPEG2 stream: its plain-text header declares the size."""
    frame = b"FRAME\n" + bytes(width * height * 3 // 2)
    return f"YUV4MPEG2 W{width} H{height} F4:1 Ip A1:1 C420jpeg\n".encode() + frame * frames


def data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def messages(*urls: str) -> list[dict]:
    parts = [{"type": "video_url", "video_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [{"type": "text", "text": "Look"}, *parts]}]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from frontend.random_model import build_random_qwen2_vl

    return build_random_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl"))


def run(qwen: Path, msgs: list[dict], **config) -> list:
    cfg = FrontendConfig(model=str(qwen), **config)
    parsed = parse_media(msgs, cfg.limit_mm_per_prompt)

    async def go():
        fetcher = MediaFetcher(cfg)
        try:
            return await resolve(parsed.refs, fetcher, Qwen2VLPlaceholders.from_pretrained(qwen),
                                 cfg)
        finally:
            await fetcher.close()

    return asyncio.run(go())


def test_a_clip_is_sized_from_its_header(qwen):
    for codec, fmt in [("mpeg4", "mp4"), ("mjpeg", "avi"), ("libvpx", "webm")]:
        item, = run(qwen, messages(data_url(encode(codec, fmt))))
        # 8 frames of 48x32 -> 56x28, grid (4, 2, 4): 8 tokens; 2 frames per step at 4 fps
        assert item.meta["num_frames"] == 8 and item.meta["fps"] == 4.0, (codec, item.meta)
        assert item.meta["geometry"] == {"num_tokens": 8, "grid_thw": [4, 2, 4],
                                         "resized_hw": [28, 56], "seconds_per_grid_t": 0.5}


@pytest.mark.parametrize("data, match", [
    (b"\x00\x00\x00\x18ftypmp42 not really a video", "cannot decode video"),
    (b"", "cannot decode video"),
    (y4m(48, 32, 0), "no frames"),
    (avi_declaring(10**6), "1000000 frames is more than the limit"),
    (y4m(100_000, 16, 0)[:60] + b"FRAME\n", "each side must be at most 8192"),
    (encode("mpeg4", "mp4", num=200, rate=1), "200.0 s is more than the limit of 60 s"),
])
def test_bad_headers_are_a_400_naming_the_part(qwen, data, match):
    with pytest.raises(RequestError, match=match) as e:
        run(qwen, messages(data_url(data)), max_video_seconds=60)
    assert e.value.status == 400 and e.value.param == PART


def test_byte_cap_and_mime(qwen):
    clip = encode("mpeg4", "mp4")
    with pytest.raises(RequestError, match=f"video is larger than {len(clip) - 1} bytes") as e:
        run(qwen, messages(data_url(clip)), max_media_bytes=len(clip) - 1)
    assert e.value.param == PART
    with pytest.raises(RequestError, match="video/\\* media type") as e:
        run(qwen, messages(data_url(clip, "image/png")))
    assert e.value.param == PART


def test_more_videos_than_the_limit(qwen):
    url = data_url(encode("mpeg4", "mp4"))
    assert len(run(qwen, messages(url, url), limit_mm_per_prompt={"video": 2})) == 2
    with pytest.raises(RequestError, match="at most 1 video") as e:
        run(qwen, messages(url, url))  # the default limit is one video
    assert e.value.status == 400 and e.value.param == "messages"


def test_sampling_equals_transformers():
    """transformers' Qwen2VLVideoProcessor.sample_frames (its arithmetic; the class itself
    imports torchvision): num_frames rounded to the temporal patch, or fps within [4, 768]."""
    import math

    import torch

    def hf(total, fps, num_frames=None, sample_fps=None):
        if num_frames is not None:
            n = round(num_frames / 2) * 2
        else:
            cap = math.floor(min(768, total) / 2) * 2
            n = math.floor(min(max(total / fps * sample_fps, 4), cap, total) / 2) * 2
        return torch.arange(0, total, total / n).int().tolist()

    for total, fps in [(10, 4.0), (300, 30.0), (97, 24.0), (1000, 29.97), (64, 2.0)]:
        for n in (2, 4, 6, 8, 32):
            if n < total:
                assert GEOMETRY.sample_frames(total, fps, num_frames=n) == hf(total, fps, n)
        for rate in (0.5, 1.0, 2.0):
            assert GEOMETRY.sample_frames(total, fps, sample_fps=rate) == \
                hf(total, fps, sample_fps=rate), (total, fps, rate)
    assert GEOMETRY.sample_frames(7, 4.0) == list(range(7))  # short: every frame
    assert GEOMETRY.sample_frames(1, 4.0) == [0]  # the patch is filled by repeating it


@pytest.mark.slow
def test_server_refuses_bad_videos_and_keeps_serving(qwen):
    import openai

    sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))
    from server_utils import Server

    srv = Server(str(qwen))
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        for bad in (avi_declaring(10**6), b"garbage", y4m(48, 32, 0)):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=model, max_tokens=2,
                                               messages=messages(data_url(bad)))
            assert e.value.body["param"] == PART
        resp = client.chat.completions.create(
            model=model, max_tokens=2, messages=messages(data_url(encode("mpeg4", "mp4"))))
        assert resp.choices[0].finish_reason in ("length", "stop")
    finally:
        srv.stop()
