"""Cheap video checks in the frontend: read the container header only, never decode a frame.

PyAV (FFmpeg) opens the container and reports its first video stream's size, codec, frame count
and rate (`protocol/video.py`, which the encoder reads the same way). What the header declares is refused here, before any encoder decodes a frame: too many
frames or seconds (the encoder walks the stream up to its last sampled frame), sides past
``max_side`` or frames past ``max_pixels`` (one decoded frame is width x height x 3 bytes), no
frames at all, an unknown frame rate, and bytes FFmpeg cannot parse. The encoder checks the same
bounds again (`encoder_worker/video.py`), and stops if the stream holds more than it declared.
"""

from __future__ import annotations

import io
from typing import Any, NamedTuple

import numpy as np

from frontend.errors import RequestError
from frontend.media.probe import check_image_size
from protocol.video import VideoInfo, read_header

# In-memory frames carry no timing; they are taken as sampled at Qwen's default rate (2 fps:
# one second per temporal grid step), as transformers 4's Qwen2.5-VL processor assumed.
IN_MEMORY_FPS = 2


class VideoLimits(NamedTuple):
    max_frames: int  # declared frames in the container
    max_seconds: float  # declared duration
    max_side: int  # pixels along either side of a frame
    max_pixels: int  # width * height of a frame


def check_video(info: VideoInfo, limits: VideoLimits) -> None:
    """ValueError (a message for the client) for a header past ``limits`` or without frames."""
    if max(info.width, info.height) > limits.max_side:
        raise ValueError(f"video frames are too large: {info.width}x{info.height}; each side "
                         f"must be at most {limits.max_side} pixels")
    if info.num_frames < 1:
        raise ValueError("video has no frames (its header declares none)")
    if not info.fps > 0:
        raise ValueError("video has no frame rate in its header")
    if info.num_frames > limits.max_frames:
        raise ValueError(f"video is too long: {info.num_frames} frames is more than the limit "
                         f"of {limits.max_frames}")
    seconds = info.num_frames / info.fps
    if seconds > limits.max_seconds:
        raise ValueError(f"video is too long: {seconds:.1f} s is more than the limit of "
                         f"{limits.max_seconds:g} s")


def probe_video(data: bytes, param: str, limits: VideoLimits) -> VideoInfo:
    """Size, frame count, rate and codec from the header of ``data``; RequestError (400)
    naming ``param`` if the header is unusable or past ``limits``."""
    try:
        info = read_header(data)
        check_video(info, limits)
    except ValueError as e:
        raise RequestError(str(e), param) from None
    check_image_size(info.width, info.height, param, limits.max_pixels)  # per frame
    return info


def limits_of(config: Any) -> VideoLimits:
    """The `VideoLimits` of a `FrontendConfig`."""
    return VideoLimits(config.max_video_frames, config.max_video_seconds, config.max_video_side,
                       config.max_image_pixels)


def frames_to_video(value: Any, param: str, limits: VideoLimits) -> bytes:
    """Offline in-memory frames as lossless video bytes (PNG frames in a QuickTime container,
    at `IN_MEMORY_FPS`), so they hash, probe and decode like a fetched video. ``value``: a
    uint8 array or CPU tensor [T, H, W, 3] (a tensor may be [T, 3, H, W], torch's layout), or a
    list of PIL images / [H, W, 3] uint8 arrays of one size. Sizes are checked from the shape
    before a pixel is copied."""
    import av

    frames = _frames(value, param)
    num, height, width = len(frames), frames[0].shape[0], frames[0].shape[1]
    try:
        check_video(VideoInfo(width, height, num, IN_MEMORY_FPS, "png", "mov"), limits)
    except ValueError as e:
        raise RequestError(str(e), param) from None
    check_image_size(width, height, param, limits.max_pixels)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mov") as container:
        stream = container.add_stream("png", rate=IN_MEMORY_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        for frame in frames:
            rgb = np.ascontiguousarray(frame, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def _frames(value: Any, param: str) -> list[np.ndarray]:
    """``value`` as [H, W, 3] uint8 frames of one size (views, not copies, where possible)."""
    from PIL import Image

    if type(value).__module__.startswith("torch"):
        import torch

        t = value.detach()
        if t.device.type != "cpu" or t.layout != torch.strided or t.is_nested:
            raise RequestError("a video tensor must be a dense CPU tensor", param)
        if t.ndim == 4 and t.shape[1] == 3 and t.shape[-1] != 3:
            t = t.permute(0, 2, 3, 1)  # [T, 3, H, W] -> [T, H, W, 3]
        value = t.numpy()
    if isinstance(value, np.ndarray):
        if value.ndim != 4 or value.shape[-1] != 3 or value.shape[0] < 1:
            raise RequestError(f"a video array must be [T, H, W, 3], got shape "
                               f"{list(value.shape)}", param)
        frames = list(value)
    elif isinstance(value, (list, tuple)) and value:
        frames = []
        for i, f in enumerate(value):
            if isinstance(f, Image.Image):
                f = np.asarray(f.convert("RGB"))
            if not isinstance(f, np.ndarray) or f.ndim != 3 or f.shape[-1] != 3:
                raise RequestError("a video frame must be a PIL image or an [H, W, 3] array",
                                   f"{param}[{i}]")
            frames.append(f)
    else:
        raise RequestError("a video must be a [T, H, W, 3] array or tensor, or a non-empty list "
                           "of frames (PIL images or [H, W, 3] arrays)", param)
    if any(f.dtype != np.uint8 for f in frames):
        raise RequestError("video frames must be uint8", param)
    if len({f.shape for f in frames}) != 1:
        raise RequestError("video frames must all have the same size", param)
    return frames
