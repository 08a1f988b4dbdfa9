"""Qwen2-Audio: a clip becomes one placeholder token per 40 ms of audio, up to 30 s.

The clip is resampled to the feature extractor's rate (16 kHz), padded with silence to one
30 s window (longer clips are cut to it, as transformers' processor truncates them), and
turned into log-mel frames every ``hop_length`` (10 ms) samples. The tower's second conv halves
the frames, its average pooling halves them again, so of the window's 750 output rows the
first ``(((frames - 1) // 2 + 1) - 2) // 2 + 1`` belong to the clip (transformers'
``_get_feat_extract_output_lengths``): 1 s of audio is 25 tokens, 30 s are 750.

The sample count after resampling follows librosa's ``resample`` exactly
(``ceil(n * target / rate)``), so the count computed here from the header is the length the
encoder's resample produces.
"""

from __future__ import annotations

import math
from typing import Any

from protocol.geometry import ItemGeometry, MediaGeometry

# transformers' WhisperFeatureExtractor defaults (Qwen2-Audio's checkpoints save 128 mel bins).
DEFAULT_SAMPLING_RATE = 16_000
DEFAULT_HOP_LENGTH = 160
DEFAULT_CHUNK_LENGTH = 30  # seconds per window


def resampled_length(num_samples: int, sample_rate: int, target_rate: int) -> int:
    """Samples of a clip of ``num_samples`` at ``sample_rate`` once resampled to
    ``target_rate``, as librosa's ``resample`` makes them."""
    if sample_rate == target_rate:
        return num_samples
    return int(math.ceil(num_samples * (float(target_rate) / float(sample_rate))))


def feature_frames(num_samples: int, hop_length: int) -> int:
    """Log-mel frames that cover ``num_samples`` (the feature extractor's attention mask: one
    frame per started hop)."""
    return -(-num_samples // hop_length)


class Qwen2AudioGeometry(MediaGeometry):
    """Settings from the feature extractor config (preprocessor_config.json)."""

    takes_audio = True

    def __init__(self, config: dict[str, Any], processor: dict[str, Any]):
        super().__init__(config, processor)
        self.sampling_rate = int(processor.get("sampling_rate", DEFAULT_SAMPLING_RATE))
        self.hop_length = int(processor.get("hop_length", DEFAULT_HOP_LENGTH))
        chunk = int(processor.get("chunk_length", DEFAULT_CHUNK_LENGTH))
        self.window_samples = int(processor.get("n_samples", chunk * self.sampling_rate))
        if min(self.sampling_rate, self.hop_length, self.window_samples) < 1:
            raise ValueError("sampling_rate, hop_length and n_samples must be >= 1")
        self.window_frames = self.window_samples // self.hop_length

    @staticmethod
    def tokens_of_frames(frames: int) -> int:
        """Tower output rows of ``frames`` valid log-mel frames: conv stride 2, then pool 2."""
        return (((frames - 1) // 2 + 1) - 2) // 2 + 1

    def audio(self, num_samples: int, sample_rate: int) -> ItemGeometry:
        if num_samples < 1 or sample_rate < 1:
            raise ValueError("audio has no samples (its header declares none)")
        n = resampled_length(num_samples, sample_rate, self.sampling_rate)
        frames = feature_frames(min(n, self.window_samples), self.hop_length)
        tokens = self.tokens_of_frames(frames)
        if tokens < 1:
            shortest = math.ceil((2 * self.hop_length + 1) * 1000 / self.sampling_rate)
            raise ValueError(f"audio is too short: {num_samples} samples at {sample_rate} Hz; "
                             f"this model needs at least {shortest} ms")
        return ItemGeometry(tokens, num_samples=n)
