"""Log-mel features (encoder_worker/models/whisper_features.py) against transformers'
`WhisperFeatureExtractor`, the reference (issue 11, acceptance 2): within 1e-4 for the same
audio, at 80 and 128 mel bins, for clips shorter than, equal to and longer than the window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank

from encoder_worker.models.whisper_features import LogMel, mel_filter_bank


@pytest.mark.parametrize("n_mels", [80, 128])
def test_filter_bank_matches_transformers(n_mels):
    ours = mel_filter_bank(400, n_mels, 16_000)
    ref = hf_mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                             max_frequency=8000.0, sampling_rate=16_000, norm="slaney",
                             mel_scale="slaney")
    assert ours.shape == ref.shape == (201, n_mels)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("seconds", [0.013, 1.0, 7.77, 30.0, 41.0])
def test_log_mel_matches_whisper_feature_extractor(n_mels, seconds):
    rng = np.random.default_rng(int(seconds * 1000) + n_mels)
    n = int(seconds * 16_000)
    t = np.arange(n) / 16_000
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    ref = fe(audio, sampling_rate=16_000, return_tensors="np")["input_features"][0]
    window = np.zeros(fe.n_samples, np.float32)  # padded / cut to 30 s, as the extractor does
    window[:min(n, fe.n_samples)] = audio[:fe.n_samples]
    ours = LogMel(n_mels)(torch.from_numpy(window)).numpy()
    assert ours.shape == ref.shape == (n_mels, 3000)
    assert np.abs(ours - ref).max() <= 1e-4


def test_batched_clips_each_use_their_own_peak():
    """A loud and a quiet clip in one batch: each floor is relative to its own maximum."""
    fe = WhisperFeatureExtractor(feature_size=80)
    rng = np.random.default_rng(0)
    loud = rng.standard_normal(16_000).astype(np.float32)
    quiet = (1e-3 * rng.standard_normal(16_000)).astype(np.float32)
    ref = fe([loud, quiet], sampling_rate=16_000, return_tensors="np")["input_features"]
    pad = lambda x: np.pad(x, (0, fe.n_samples - x.size))  # noqa: E731
    ours = LogMel(80)(torch.from_numpy(np.stack([pad(loud), pad(quiet)]))).numpy()
    assert np.abs(ours - ref).max() <= 1e-4
    single = LogMel(80)(torch.from_numpy(pad(quiet))).numpy()
    assert np.abs(single - ours[1]).max() == 0


def test_hop_and_window_length_follow_the_config():
    fe = WhisperFeatureExtractor(feature_size=32, chunk_length=4)
    audio = np.random.default_rng(1).standard_normal(fe.n_samples).astype(np.float32) * 0.1
    ref = fe(audio, sampling_rate=16_000, return_tensors="np")["input_features"][0]
    ours = LogMel(32)(torch.from_numpy(audio)).numpy()
    assert ours.shape == ref.shape == (32, 400)
    assert np.abs(ours - ref).max() <= 1e-4
