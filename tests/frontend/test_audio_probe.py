"""The frontend's audio checks (frontend/media/audio.py, the audio parts of
frontend/media/parse.py): the header decides, before any decode, and each refusal is a 400
naming the part."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from frontend.errors import RequestError
from frontend.media.audio import AudioLimits, check_format, clip_to_wav, parse_format, probe_audio
from frontend.media.parse import parse_media
from protocol.audio import read_header

LIMITS = AudioLimits(max_seconds=60.0, min_sample_rate=1000, max_sample_rate=96_000,
                     max_channels=2)


def wav(samples: int, rate: int = 16_000, channels: int = 1, declared: int | None = None) -> bytes:
    data = b"\0" * (samples * channels * 2)
    size = len(data) if declared is None else declared
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + size) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", size) + data)


def refused(fn, param: str, match: str) -> None:
    with pytest.raises(RequestError, match=match) as e:
        fn()
    assert e.value.param == param and e.value.status == 400


def test_probe_reads_the_header():
    info = probe_audio(wav(8_000, 8_000, 2), "p", LIMITS)
    assert (info.sample_rate, info.channels, info.num_samples, info.format) == (8_000, 2, 8_000,
                                                                               "wav")
    assert info.seconds == 1.0


def test_probe_refusals():
    refused(lambda: probe_audio(b"not audio at all", "p", LIMITS), "p", "not a wav")
    refused(lambda: probe_audio(wav(0), "p", LIMITS), "p", "empty")
    refused(lambda: probe_audio(wav(100, 500), "p", LIMITS), "p", "sample rate 500 Hz")
    refused(lambda: probe_audio(wav(100, 192_000), "p", LIMITS), "p", "out of range")
    refused(lambda: probe_audio(wav(100, 16_000, 3), "p", LIMITS), "p", "3 channels")
    refused(lambda: probe_audio(wav(16_000 * 61), "p", LIMITS), "p", "61.0 s is more than")


def test_input_audio_format():
    assert parse_format("WAV", "f") == "wav"
    refused(lambda: parse_format("aiff", "f"), "f", "one of wav, flac, mp3, ogg")
    refused(lambda: parse_format(None, "f"), "f", "one of")
    check_format(wav(10), "wav", "f")
    refused(lambda: check_format(wav(10), "mp3", "f"), "f", "'mp3' but the data is a wav")


def test_offline_clip_to_wav():
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    data = clip_to_wav((x, 8_000), "p", LIMITS, 1 << 20)
    assert read_header(data)[:3] == (8_000, 1, 1000)
    assert read_header(clip_to_wav((np.stack([x, x]), 8_000), "p", LIMITS, 1 << 20))[1] == 2
    refused(lambda: clip_to_wav(x, "p", LIMITS, 1 << 20), "p", "tuple")
    refused(lambda: clip_to_wav((x, 8000.5), "p", LIMITS, 1 << 20), "p", "must be an int")
    refused(lambda: clip_to_wav((x.astype(np.int16), 8_000), "p", LIMITS, 1 << 20), "p",
            "floating")
    refused(lambda: clip_to_wav((x[None, None], 8_000), "p", LIMITS, 1 << 20), "p", "shape")
    refused(lambda: clip_to_wav((np.full(10, np.nan, np.float32), 8_000), "p", LIMITS,
                                1 << 20), "p", "finite")
    refused(lambda: clip_to_wav((np.zeros(70 * 8_000, np.float32), 8_000), "p", LIMITS,
                                1 << 30), "p", "too long")
    refused(lambda: clip_to_wav((x, 8_000), "p", LIMITS, 1000), "p", "larger than 1000 bytes")


def test_parse_audio_parts_and_limit():
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    url = {"type": "audio_url", "audio_url": {"url": "https://a.example/x.wav"}, "uuid": "u1"}
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}, part, url]}]
    parsed = parse_media(msgs, {"audio": 2})
    assert [(r.modality, r.kind, r.uuid) for r in parsed.refs] == [("audio", "b64", None),
                                                                   ("audio", "url", "u1")]
    assert parsed.refs[0].value == ("AAAA", "wav")
    assert parsed.messages[0]["content"][1:] == [{"type": "audio"}, {"type": "audio"}]
    refused(lambda: parse_media(msgs, {"audio": 1}), "messages", "at most 1 audio")
    reuse = {"type": "input_audio", "input_audio": None, "uuid": "u1"}
    assert parse_media([{"role": "user", "content": [reuse]}], {}).refs[0].kind == "uuid"
    bad = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav", "x": 1}}
    refused(lambda: parse_media([{"role": "user", "content": [bad]}], {}),
            "messages[0].content[0].input_audio.x", "not a known field")


def test_audio_fetch_timeout_from_the_environment(monkeypatch, tmp_path):
    from frontend.config import FrontendConfig
    from frontend.media.fetch import MediaFetcher

    monkeypatch.delenv("MMSERVE_AUDIO_FETCH_TIMEOUT", raising=False)
    monkeypatch.delenv("VLLM_AUDIO_FETCH_TIMEOUT", raising=False)
    assert MediaFetcher(FrontendConfig(model=str(tmp_path))).timeouts_s["audio"] == 10.0
    monkeypatch.setenv("MMSERVE_AUDIO_FETCH_TIMEOUT", "2.5")
    assert MediaFetcher(FrontendConfig(model=str(tmp_path))).timeouts_s["audio"] == 2.5
