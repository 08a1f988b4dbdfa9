"""An audio file's header, read the same way by every role that needs it.

The frontend sizes the prompt from the declared sample count and the encoder decodes against
it, so both must read the same numbers from the same bytes: this is the one place that reads
them. PyAV (FFmpeg) is imported on use; nothing here decodes a sample.
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import NamedTuple

# The containers audio may come in (FFmpeg's demuxer names, also what `input_audio.format`
# names). The container is told from the first bytes and FFmpeg opens it with that demuxer
# only: it never probes, so none of its other demuxers (playlists that open URLs, rare
# parsers) ever sees client bytes.
AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg")
_UNREADABLE = "cannot decode audio: not a wav, flac, mp3 or ogg file"


class AudioInfo(NamedTuple):
    sample_rate: int  # Hz, of the first audio stream
    channels: int
    num_samples: int  # per channel, declared by the header (or its duration x rate)
    codec: str
    format: str  # "wav" | "flac" | "mp3" | "ogg"

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate if self.sample_rate > 0 else 0.0


def sniff_format(data: bytes) -> str | None:
    """The container of ``data`` from its magic bytes (one of `AUDIO_FORMATS`), else None."""
    head = bytes(data[:12])
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    # ID3v2 tag, or an MPEG audio frame sync (11 set bits) of layer III
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE6 == 0xE2):
        return "mp3"
    return None


def open_audio(data: bytes):
    """``data`` opened by PyAV with the demuxer of its sniffed container (the caller closes
    it); ValueError for anything else."""
    import av

    fmt = sniff_format(data)
    if fmt is None:
        raise ValueError(_UNREADABLE)
    try:
        return av.open(io.BytesIO(data), mode="r", format=fmt)
    except Exception:
        # FFmpeg answers garbage with InvalidDataError, odd headers with OSError or EOFError.
        raise ValueError(_UNREADABLE) from None


def read_header(data: bytes) -> AudioInfo:
    """The header of the first audio stream in ``data``; ValueError (a message for the client)
    if it is not one of `AUDIO_FORMATS`, FFmpeg cannot parse it or it has no audio stream.
    Sample count: the stream's duration in samples, else the container's duration times the
    rate."""
    container = open_audio(data)
    fmt = sniff_format(data)
    with container:
        if not container.streams.audio:
            raise ValueError("cannot decode audio: the file has no audio stream")
        stream = container.streams.audio[0]
        ctx = stream.codec_context
        rate = int(ctx.sample_rate or stream.sample_rate or 0)
        channels = int(ctx.channels or 0)
        samples = 0
        if stream.duration and stream.time_base:
            samples = int(stream.duration * stream.time_base * rate)
        elif container.duration:
            samples = int(Fraction(container.duration, 1_000_000) * rate)
        return AudioInfo(rate, channels, max(samples, 0), ctx.name or "", fmt)
