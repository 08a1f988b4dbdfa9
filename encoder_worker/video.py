"""Video bytes -> the sampled frames as RGB arrays, decoded with PyAV (FFmpeg).

The frontend probed the header, but the encoder trusts no peer: the header is read again
(`protocol/video.py`, so both roles sample the same frames) and its bounds checked before a
frame is decoded. Frames are decoded in stream order up to the last sampled one and the rest
never touched, so the declared frame count bounds the work; a stream that ends early, or whose
frames change size midway, is refused rather than padded. Every refusal is a ``MediaError``
(answered 400).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from encoder_worker.decode import MediaError
from protocol.video import read_header

# Bounds on what the header declares; the frontend's defaults (`FrontendConfig`) are within them.
MAX_FRAMES = 100_000
MAX_SIDE = 16_384


class Video(NamedTuple):
    frames: np.ndarray  # [T, H, W, 3] uint8, the sampled frames in order
    fps: float  # rate of the sampled frames: T / total frames x the video's rate


def decode_video(data: bytes, sample: Callable[[int, float], list[int]], *,
                 max_pixels: int = 50_000_000, max_frames: int = MAX_FRAMES,
                 max_side: int = MAX_SIDE) -> Video:
    """Decode the frames ``sample(total_frames, fps)`` picks (sorted indices); MediaError for
    anything unusable (``sample`` raises ValueError for a video the model can't sample)."""
    import av

    try:
        info = read_header(data)
        if info.num_frames < 1 or not info.fps > 0:
            raise ValueError("video has no frames or no frame rate in its header")
        if info.num_frames > max_frames:
            raise ValueError(f"video is too long: {info.num_frames} frames is more than the "
                             f"limit of {max_frames}")
        if (max(info.width, info.height) > max_side or info.width * info.height > max_pixels
                or min(info.width, info.height) < 1):
            raise ValueError(f"video frames of {info.width}x{info.height} pixels are out of "
                             "bounds")
        indices = sample(info.num_frames, info.fps)
    except ValueError as e:
        raise MediaError(str(e)) from None
    wanted = set(indices)
    frames: list[np.ndarray] = []
    seen = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame threads: several cores per decode
            for frame in container.decode(stream):
                if (frame.width, frame.height) != (info.width, info.height):
                    raise MediaError(f"video frame {seen} is {frame.width}x{frame.height}, the "
                                     f"header says {info.width}x{info.height}")
                if seen in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))  # [H, W, 3] uint8
                seen += 1
                if seen > indices[-1]:
                    break
    except MediaError:
        raise
    except MemoryError:
        raise
    except Exception:
        # FFmpeg's errors (InvalidDataError, ...) carry its own text, not for clients.
        raise MediaError("cannot decode video: the stream is truncated or corrupt") from None
    if len(frames) < len(indices):
        raise MediaError(f"video ends after {seen} frames; its header declares "
                         f"{info.num_frames}")
    return Video(np.stack(frames), len(indices) / info.num_frames * info.fps)
