"""Qwen2-Audio's geometry (protocol/geometry/qwen2_audio.py): the placeholder count the frontend
computes from a header equals transformers' (its processor's count from the feature extractor's
attention mask), and the resampled length equals librosa's output length."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from protocol.geometry import ItemGeometry
from protocol.geometry.qwen2_audio import Qwen2AudioGeometry, resampled_length


def hf_tokens(num_samples: int, fe: WhisperFeatureExtractor) -> int:
    """transformers' Qwen2AudioProcessor count for a 16 kHz clip of ``num_samples``."""
    out = fe(np.zeros(num_samples, np.float32), sampling_rate=16_000, padding="max_length",
             return_attention_mask=True)
    frames = int(np.asarray(out["attention_mask"]).sum())
    return (((frames - 1) // 2 + 1) - 2) // 2 + 1


@pytest.mark.parametrize("chunk", [30, 4])
def test_token_counts_match_the_processor(chunk):
    fe = WhisperFeatureExtractor(feature_size=128, chunk_length=chunk)
    geo = Qwen2AudioGeometry({}, fe.to_dict())
    assert geo.window_samples == chunk * 16_000 and geo.window_frames == chunk * 100
    for n in [321, 480, 481, 1000, 15_999, 16_000, 16_001, 16_160, 64_000, 64_001, 480_000,
              500_000]:
        got = geo.audio(n, 16_000)
        assert got.num_tokens == hf_tokens(n, fe), n
        assert got.num_samples == n
    assert geo.audio(16_000, 16_000).num_tokens == 25
    assert Qwen2AudioGeometry({}, {}).audio(30 * 16_000, 16_000).num_tokens == 750
    assert Qwen2AudioGeometry({}, {}).audio(40 * 16_000, 16_000).num_tokens == 750  # cut


@pytest.mark.parametrize("rate", [8_000, 11_025, 22_050, 44_100, 48_000, 96_000])
def test_resampled_length_is_librosas(rate):
    rng = np.random.default_rng(rate)
    for n in [1, 7, 100, 12_345, rate, 3 * rate + 17]:
        out = librosa.resample(rng.standard_normal(n).astype(np.float32), orig_sr=rate,
                               target_sr=16_000)
        assert resampled_length(n, rate, 16_000) == out.shape[-1], (rate, n)
    geo = Qwen2AudioGeometry({}, {})
    assert geo.audio(rate, rate).num_samples == 16_000


def test_too_short_and_empty_clips_are_refused():
    geo = Qwen2AudioGeometry({}, {})
    assert geo.audio(321, 16_000).num_tokens == 1
    with pytest.raises(ValueError, match="too short"):
        geo.audio(320, 16_000)
    with pytest.raises(ValueError, match="no samples"):
        geo.audio(0, 16_000)


def test_num_samples_travels_in_the_meta():
    g = ItemGeometry(25, num_samples=16_000)
    meta = g.to_meta()
    assert meta["num_samples"] == 16_000 and ItemGeometry.from_meta(meta) == g
    assert "num_samples" not in ItemGeometry(3).to_meta()
