"""A video's container header, read the same way by every role that needs it.

The frontend sizes the prompt from it and the encoder samples frames from it, so both must get
the same frame count and rate from the same bytes: this is the one place that reads them. PyAV
(FFmpeg) is imported on use.
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import NamedTuple


class VideoInfo(NamedTuple):
    width: int
    height: int
    num_frames: int  # declared by the header (or its duration x rate)
    fps: float  # average frame rate
    codec: str
    format: str  # container


def read_header(data: bytes) -> VideoInfo:
    """The header of the first video stream in ``data``; ValueError (a message for the client)
    if FFmpeg cannot parse it or it has no video stream. Frame count: the stream's own, else
    its duration times its rate, else the container's."""
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception:
        # FFmpeg answers garbage with InvalidDataError, odd probes with OSError or EOFError.
        raise ValueError("cannot decode video: not a container FFmpeg can read") from None
    with container:
        if not container.streams.video:
            raise ValueError("cannot decode video: the file has no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate or Fraction(0)
        frames = int(stream.frames or 0)
        if frames <= 0 and stream.duration and stream.time_base and rate:
            frames = round(stream.duration * stream.time_base * rate)
        if frames <= 0 and container.duration and rate:
            frames = round(Fraction(container.duration, 1_000_000) * rate)
        return VideoInfo(int(ctx.width or 0), int(ctx.height or 0), max(frames, 0),
                         float(rate), ctx.name or "", container.format.name or "")
