"""Cheap audio checks in the frontend: read the container header only, never decode a sample.

The container is told from its first bytes (wav, flac, mp3, ogg) and opened by that demuxer
alone (`protocol/audio.py`, which the encoder reads the same way). What the header declares is
refused here, before any encoder decodes: no samples, more seconds than ``max_seconds`` (a
FLAC header may declare 10 hours in a few bytes), a sample rate outside the allowed range,
more channels than allowed (the encoder down-mixes them to mono), and bytes FFmpeg cannot
parse. The encoder checks the same bounds again (`encoder_worker/audio.py`) and stops if the
stream holds much more than it declared.

Offline clips (``(array, sampling_rate)``) become a float32 WAV, lossless, so they hash, probe
and decode like fetched bytes.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import numpy as np

from frontend.errors import RequestError
from protocol.audio import AUDIO_FORMATS, AudioInfo, read_header, sniff_format


class AudioLimits(NamedTuple):
    max_seconds: float  # declared duration
    min_sample_rate: int
    max_sample_rate: int
    max_channels: int


def limits_of(config: Any) -> AudioLimits:
    """The `AudioLimits` of a `FrontendConfig`."""
    return AudioLimits(config.max_audio_seconds, config.min_audio_sample_rate,
                       config.max_audio_sample_rate, config.max_audio_channels)


def check_audio(info: AudioInfo, limits: AudioLimits) -> None:
    """ValueError (a message for the client) for a header past ``limits`` or without samples."""
    if not limits.min_sample_rate <= info.sample_rate <= limits.max_sample_rate:
        raise ValueError(f"audio sample rate {info.sample_rate} Hz is out of range "
                         f"({limits.min_sample_rate}..{limits.max_sample_rate} Hz)")
    if not 1 <= info.channels <= limits.max_channels:
        raise ValueError(f"audio has {info.channels} channels; at most {limits.max_channels} "
                         "are accepted")
    if info.num_samples < 1:
        raise ValueError("audio is empty: its header declares no samples")
    if info.seconds > limits.max_seconds:
        raise ValueError(f"audio is too long: {info.seconds:.1f} s is more than the limit of "
                         f"{limits.max_seconds:g} s")


def probe_audio(data: bytes, param: str, limits: AudioLimits) -> AudioInfo:
    """Rate, channels, sample count and container from the header of ``data``; RequestError
    (400) naming ``param`` if the header is unusable or past ``limits``."""
    try:
        info = read_header(data)
        check_audio(info, limits)
    except ValueError as e:
        raise RequestError(str(e), param) from None
    return info


def check_format(data: bytes, declared: str, param: str) -> None:
    """``input_audio.format`` must name the container the bytes are in (400 naming it)."""
    found = sniff_format(data)
    if found is not None and found != declared:
        raise RequestError(f"input_audio.format is {declared!r} but the data is a {found} file",
                           param)


def parse_format(value: Any, param: str) -> str:
    """``input_audio.format``: one of `AUDIO_FORMATS` (case-insensitive)."""
    if not isinstance(value, str) or value.lower() not in AUDIO_FORMATS:
        raise RequestError(f"{param} must be one of {', '.join(AUDIO_FORMATS)}, got {value!r}",
                           param)
    return value.lower()


def clip_to_wav(value: Any, param: str, limits: AudioLimits, max_bytes: int) -> bytes:
    """An offline clip ``(array, sampling_rate)`` as float32 WAV bytes. The array is [samples]
    (mono) or [channels, samples] (librosa's layout), floating point (numpy or a CPU tensor).
    Its length, rate and channels are checked from the shape before a sample is copied."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise RequestError("an audio clip must be a tuple (array, sampling_rate)", param)
    array, rate = value
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer, float)) or rate != int(rate):
        raise RequestError(f"an audio clip's sampling_rate must be an int, got {rate!r}", param)
    rate = int(rate)
    if type(array).__module__.startswith("torch"):
        import torch

        if not isinstance(array, torch.Tensor) or array.device.type != "cpu" or array.is_sparse:
            raise RequestError("an audio tensor must be a dense CPU tensor", param)
        array = array.detach().float().numpy() if array.is_floating_point() else array.numpy()
    if not isinstance(array, np.ndarray):
        raise RequestError("an audio clip's array must be a numpy array or a tensor, got "
                           f"{type(array).__name__}", param)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise RequestError(f"an audio array must be [samples] or [channels, samples], got "
                           f"shape {list(array.shape)}", param)
    if array.dtype.kind != "f":
        raise RequestError(f"an audio array must be floating point (samples in [-1, 1]), got "
                           f"{array.dtype}", param)
    channels, samples = array.shape
    try:
        check_audio(AudioInfo(rate, channels, samples, "pcm_f32le", "wav"), limits)
    except ValueError as e:
        raise RequestError(str(e), param) from None
    if 44 + channels * samples * 4 > max_bytes:
        raise RequestError(f"audio is larger than {max_bytes} bytes as float32 WAV", param)
    if not np.isfinite(array).all():
        raise RequestError("an audio array must hold finite values", param)
    return float_wav(np.ascontiguousarray(array.T, dtype="<f4"), rate)


def float_wav(interleaved: np.ndarray, rate: int) -> bytes:
    """A WAVE_FORMAT_IEEE_FLOAT file of ``interleaved`` [samples, channels] float32 samples."""
    channels = interleaved.shape[1]
    data = interleaved.tobytes()
    fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * channels * 4, channels * 4, 32)
    return b"".join([b"RIFF", struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)), b"WAVE",
                     b"fmt ", struct.pack("<I", len(fmt)), fmt,
                     b"data", struct.pack("<I", len(data)), data])
