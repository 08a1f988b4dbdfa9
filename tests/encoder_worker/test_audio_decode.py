"""Audio bytes -> mono float32 at the model's rate (encoder_worker/audio.py): real files in each
container (wav PCM 16 / float, flac, mp3, ogg-opus) written with PyAV, channels down-mixed,
resampling equal to librosa's, the header's sample count honoured, and every unusable file a
MediaError with a message for the client."""

from __future__ import annotations

import io
import struct

import av
import librosa
import numpy as np
import pytest

from encoder_worker.audio import decode_audio
from encoder_worker.decode import MediaError
from frontend.media.audio import float_wav
from protocol.audio import read_header, sniff_format


def tone(seconds: float, rate: int, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def wav16(x: np.ndarray, rate: int) -> bytes:
    """[channels, samples] or [samples] -> 16-bit PCM WAV."""
    x = np.atleast_2d(x)
    q = np.round(np.clip(x, -1, 1 - 1 / 32768) * 32768).astype("<i2").T  # interleaved
    ch = x.shape[0]
    fmt = struct.pack("<HHIIHH", 1, ch, rate, rate * ch * 2, ch * 2, 16)
    data = q.tobytes()
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<I", 16)
            + fmt + b"data" + struct.pack("<I", len(data)) + data)


def encoded(x: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as c:
        s = c.add_stream(codec, rate=rate)
        s.layout = "mono"
        if codec == "flac":
            frame = av.AudioFrame.from_ndarray((x[None] * 32767).astype(np.int16), format="s16",
                                               layout="mono")
        else:
            frame = av.AudioFrame.from_ndarray(x[None], format="fltp", layout="mono")
        frame.sample_rate = rate
        for pkt in [*s.encode(frame), *s.encode(None)]:
            c.mux(pkt)
    return buf.getvalue()


def flac_declaring(x: np.ndarray, rate: int, total: int) -> bytes:
    data = bytearray(encoded(x, rate, "flac", "flac"))
    info = int.from_bytes(data[18:26], "big")  # STREAMINFO: ... total samples (36 bits)
    data[18:26] = ((info & ~((1 << 36) - 1)) | total).to_bytes(8, "big")
    return bytes(data)


def test_wav_pcm16_is_exact_and_resampled_like_librosa():
    x = tone(0.5, 8_000)
    q = (np.round(x * 32768).astype(np.int16) / 32768).astype(np.float32)
    data = wav16(x, 8_000)
    assert read_header(data)[:3] == (8_000, 1, 4_000)
    np.testing.assert_array_equal(decode_audio(data, 8_000), q)
    want = librosa.resample(q, orig_sr=8_000, target_sr=16_000)
    got = decode_audio(data, 16_000, 8_000)
    assert got.dtype == np.float32 and got.shape == (8_000,)
    np.testing.assert_array_equal(got, want)


def test_float_wav_and_stereo_downmix():
    left, right = tone(0.3, 16_000, 300), tone(0.3, 16_000, 900)
    stereo = float_wav(np.stack([left, right], axis=1), 16_000)
    assert read_header(stereo)[:3] == (16_000, 2, 4_800)
    np.testing.assert_allclose(decode_audio(stereo, 16_000), (left + right) / 2, atol=1e-7)
    np.testing.assert_array_equal(decode_audio(float_wav(left[:, None], 16_000), 16_000), left)


@pytest.mark.parametrize("container,codec,rate", [("flac", "flac", 16_000),
                                                  ("mp3", "libmp3lame", 16_000),
                                                  ("ogg", "libopus", 48_000)])
def test_compressed_containers(container, codec, rate):
    x = tone(1.0, rate)
    data = encoded(x, rate, container, codec)
    info = read_header(data)
    assert sniff_format(data) == info.format == container and info.sample_rate == rate
    n = int(np.ceil(info.num_samples * 16_000 / rate))
    got = decode_audio(data, 16_000, n)
    assert got.shape == (n,)  # fitted to the header's count
    if codec == "flac":  # lossless
        ref = librosa.resample((np.round(x * 32767) / 32768).astype(np.float32), orig_sr=rate,
                               target_sr=16_000)
        np.testing.assert_allclose(got, ref[:n], atol=1e-4)
    else:  # lossy: the same tone, roughly
        assert 0.2 < np.abs(got).max() < 0.8


def test_unusable_audio_is_a_media_error():
    cases = {
        b"": "not a wav",
        b"\x00" * 100: "not a wav",
        b"RIFF\x00\x00\x00\x00WAVEjunk": "cannot decode audio",
        b"#EXTM3U\nhttp://example.com/a.wav\n": "not a wav",  # never handed to FFmpeg's hls
        wav16(np.zeros(0, np.float32), 16_000): "empty",
        flac_declaring(tone(1, 16_000), 16_000, 16_000 * 36_000): "too long",
        flac_declaring(tone(3, 16_000), 16_000, 16_000): "more samples than its header",
    }
    for data, match in cases.items():
        with pytest.raises(MediaError, match=match):
            decode_audio(data, 16_000)
    short = flac_declaring(tone(1, 16_000), 16_000, 32_000)  # says 2 s, holds 1 s
    with pytest.raises(MediaError, match="holds 1.00 s but its header declares 2.00 s"):
        decode_audio(short, 16_000, 32_000)
