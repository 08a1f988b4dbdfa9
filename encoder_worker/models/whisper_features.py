"""Whisper's log-mel features, in torch: what transformers' ``WhisperFeatureExtractor`` computes
(its torch path), so a model trained on those features sees the same numbers here.

Per clip: a centred STFT (Hann window of ``n_fft``, reflect padding) every ``hop_length``
samples, the last frame dropped; power spectrum through a Slaney-normalized mel filter bank
(Slaney mel scale, 0 Hz to 8 kHz); log10 floored at 1e-10; values below (the clip's max - 8)
raised to it; then (x + 4) / 4. The filter bank is built once, in float64 numpy, as
transformers builds it, and the arithmetic runs in float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_MIN_LOG_HZ = 1000.0  # the Slaney scale is linear below, logarithmic above
_MIN_LOG_MEL = 15.0  # = 3 * 1000 / 200
_LOGSTEP = 27.0 / math.log(6.4)  # mels per e-fold above 1 kHz


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mel = 3.0 * hz / 200.0
    high = hz >= _MIN_LOG_HZ
    return np.where(high, _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-10) / _MIN_LOG_HZ) * _LOGSTEP,
                    mel)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = 200.0 * mel / 3.0
    high = mel >= _MIN_LOG_MEL
    return np.where(high, _MIN_LOG_HZ * np.exp((mel - _MIN_LOG_MEL) / _LOGSTEP), hz)


def mel_filter_bank(n_fft: int, n_mels: int, sampling_rate: int, f_min: float = 0.0,
                    f_max: float = 8000.0) -> np.ndarray:
    """[n_fft // 2 + 1, n_mels] triangular filters, equally spaced on the Slaney mel scale,
    each scaled to unit area (Slaney norm: 2 / its width in Hz)."""
    fft_freqs = np.linspace(0, sampling_rate // 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    widths = np.diff(edges)  # [n_mels + 1]
    slopes = edges[None, :] - fft_freqs[:, None]  # [n_freq, n_mels + 2]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


class LogMel:
    """Log-mel features of clips at ``sampling_rate``; ``__call__`` runs on any device."""

    def __init__(self, n_mels: int, sampling_rate: int = 16_000, n_fft: int = 400,
                 hop_length: int = 160):
        self.n_mels, self.n_fft, self.hop_length = n_mels, n_fft, hop_length
        self.sampling_rate = sampling_rate
        self.filters = torch.from_numpy(
            mel_filter_bank(n_fft, n_mels, sampling_rate).astype(np.float32))  # [n_freq, mels]
        self.window = torch.hann_window(n_fft)

    @classmethod
    def for_tower(cls, extractor: dict, num_mel_bins: int, sampling_rate: int, hop_length: int,
                  where: str) -> LogMel:
        """The features a checkpoint's feature extractor settings (``extractor``) make, checked
        against the mel bins its tower takes; ``where`` names the checkpoint in the error."""
        n_mels = int(extractor.get("feature_size", num_mel_bins))
        if n_mels != num_mel_bins:
            raise ValueError(f"{where}: the feature extractor makes {n_mels} mel bins, the "
                             f"tower takes {num_mel_bins}")
        return cls(n_mels, sampling_rate, int(extractor.get("n_fft", 400)), hop_length)

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, samples] (or [samples]) float32 -> [B, n_mels, samples // hop] (or
        [n_mels, frames]); each clip's floor is relative to its own maximum."""
        batched = audio.dim() == 2
        x = audio if batched else audio[None]
        x = x.to(torch.float32)
        window = self.window.to(x.device)
        stft = torch.stft(x, self.n_fft, self.hop_length, window=window, return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()  # [B, n_freq, frames]
        mel = self.filters.to(x.device).T @ power  # [B, n_mels, frames]
        log_spec = torch.clamp(mel, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        log_spec = (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0
        return log_spec if batched else log_spec[0]
