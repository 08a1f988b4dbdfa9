"""Audio bytes -> one mono float32 clip at the model's rate, decoded with PyAV (FFmpeg), down-mixed
and resampled with librosa.

The frontend probed the header, but the encoder trusts no peer: the header is read again
(`protocol/audio.py`: the container is sniffed and opened by its own demuxer only) and its
bounds checked before a sample is decoded; decoding stops as soon as the stream holds clearly
more than it declared. Samples become floats in [-1, 1] (integer PCM divided by its full
scale), channels are averaged (librosa's ``to_mono``), and the clip is resampled with
librosa's default (soxr, high quality). The frontend sized the prompt from the header's count
(`ItemGeometry.num_samples`): the clip is fitted to it, with silence or a cut, when a decode
differs from its header by a frame or so (lossy codecs' priming samples), and refused when it
differs by more. Every refusal is a ``MediaError`` (answered 400).
"""

from __future__ import annotations

import numpy as np

from encoder_worker.decode import MediaError
from protocol.audio import open_audio, read_header

# The encoder's own bounds on what a header declares; the frontend's defaults (600 s at up to
# 192 kHz, 8 channels) are within them. MAX_SAMPLES bounds the decoded clip's memory (512 MB
# of mono float32) whatever its rate.
MAX_SECONDS = 3600.0
MAX_SAMPLES = 128_000_000
MAX_CHANNELS = 64
RATE_RANGE = (1, 768_000)
# A decode may differ from its header by this much (seconds + fraction of the clip) and still
# be fitted to it; more is a file whose header lies.
_SLACK_SECONDS, _SLACK_FRACTION = 0.25, 0.05
_FULL_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 2.0 ** 63}


def decode_audio(data: bytes, target_rate: int, num_samples: int | None = None, *,
                 max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """[samples] float32 mono at ``target_rate``, ``num_samples`` long when given (the count
    the frontend sized the prompt by); MediaError for anything unusable."""
    try:
        info = read_header(data)
        if not RATE_RANGE[0] <= info.sample_rate <= RATE_RANGE[1]:
            raise ValueError(f"audio sample rate {info.sample_rate} Hz is out of range")
        if not 1 <= info.channels <= MAX_CHANNELS:
            raise ValueError(f"audio has {info.channels} channels, more than {MAX_CHANNELS}")
        if info.num_samples < 1:
            raise ValueError("audio is empty: its header declares no samples")
        if info.seconds > max_seconds or info.num_samples > MAX_SAMPLES:
            raise ValueError(f"audio is too long: {info.seconds:.1f} s at {info.sample_rate} Hz "
                             f"is more than the limit of {max_seconds:g} s or {MAX_SAMPLES} "
                             "samples")
    except ValueError as e:
        raise MediaError(str(e)) from None
    rate = info.sample_rate
    # Past this the stream holds much more than its header says: stop decoding.
    cap = int(info.num_samples * (1 + _SLACK_FRACTION) + _SLACK_SECONDS * rate) + 1
    mono = _decode_mono(data, info.channels, cap)
    if mono.size == 0:
        raise MediaError("audio is empty: the stream holds no samples")
    if rate != target_rate:
        import librosa

        mono = librosa.resample(mono, orig_sr=rate, target_sr=target_rate).astype(np.float32)
    if num_samples is not None:
        mono = _fit(mono, num_samples, target_rate)
    return mono


def _decode_mono(data: bytes, channels: int, cap: int) -> np.ndarray:
    """Every sample of the first audio stream, averaged over channels; MediaError past ``cap``
    samples or for a broken stream."""
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with open_audio(data) as container:
            stream = container.streams.audio[0]
            for frame in container.decode(stream):
                planes = _as_float(frame, channels)  # [channels, n]
                total += planes.shape[1]
                if total > cap:
                    raise MediaError("audio stream holds more samples than its header declares")
                chunks.append(planes.mean(axis=0, dtype=np.float32) if channels > 1
                              else planes[0])
    except MediaError:
        raise
    except MemoryError:
        raise
    except Exception:
        # FFmpeg's errors (InvalidDataError, ...) carry its own text, not for clients.
        raise MediaError("cannot decode audio: the stream is truncated or corrupt") from None
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def _as_float(frame, channels: int) -> np.ndarray:
    """One decoded frame as [channels, samples] float32 in [-1, 1]."""
    fmt = frame.format
    if len(frame.layout.channels) != channels:
        raise MediaError("audio changes its channel count midway")
    arr = frame.to_ndarray()
    if not fmt.is_planar:  # interleaved: [1, samples * channels]
        arr = arr.reshape(-1, channels).T
    name = fmt.name.rstrip("p")
    if name in ("flt", "dbl"):
        return arr.astype(np.float32, copy=False)
    if name == "u8":
        return (arr.astype(np.float32) - 128.0) / 128.0
    if name in _FULL_SCALE:
        return (arr.astype(np.float64) / _FULL_SCALE[name]).astype(np.float32)
    raise MediaError(f"cannot decode audio: unsupported sample format {fmt.name}")


def _fit(mono: np.ndarray, n: int, rate: int) -> np.ndarray:
    """``mono`` cut or padded with silence to ``n`` samples, if it is close to that long."""
    if abs(mono.size - n) > _SLACK_SECONDS * rate + _SLACK_FRACTION * n:
        raise MediaError(f"audio stream holds {mono.size / rate:.2f} s but its header declares "
                         f"{n / rate:.2f} s")
    if mono.size >= n:
        return np.ascontiguousarray(mono[:n])
    return np.concatenate([mono, np.zeros(n - mono.size, np.float32)])
