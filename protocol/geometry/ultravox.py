"""Ultravox: a clip becomes one placeholder token per ``stack_factor`` Whisper rows (8 rows of
20 ms: 6.25 tokens per second), with no cap on its length.

The clip, at the feature extractor's rate (16 kHz), becomes log-mel frames every
``hop_length`` samples over its own length (no padding to a window: ``samples // hop``
frames, the STFT's last frame dropped); the frames are cut into chunks of the Whisper
encoder's window (``2 * max_source_positions`` = 3000 frames, 30 s), each its own tower pass.
A chunk of ``f`` frames gives ``(f - 1) // 2 + 1`` rows after the stride-2 conv, and the
projector stacks ``stack_factor`` rows into one token: ``ceil(rows / stack_factor)`` tokens.
A full 30 s chunk is 188 tokens (vLLM's count for these checkpoints).
"""

from __future__ import annotations

import math
from typing import Any

from protocol.geometry import ItemGeometry, MediaGeometry
from protocol.geometry.qwen2_audio import (
    DEFAULT_HOP_LENGTH,
    DEFAULT_SAMPLING_RATE,
    resampled_length,
)

DEFAULT_STACK_FACTOR = 8
DEFAULT_MAX_SOURCE_POSITIONS = 1500  # whisper-large-v3(-turbo), every released Ultravox


def chunk_frames(frames: int, window: int) -> list[int]:
    """Valid frames of each chunk of a clip of ``frames`` log-mel frames."""
    return [min(window, frames - start) for start in range(0, frames, window)]


class UltravoxGeometry(MediaGeometry):
    """Settings from config.json (``stack_factor``, ``audio_config.max_source_positions``)
    and the feature extractor config (rate, hop)."""

    takes_audio = True

    def __init__(self, config: dict[str, Any], processor: dict[str, Any]):
        super().__init__(config, processor)
        self.sampling_rate = int(processor.get("sampling_rate", DEFAULT_SAMPLING_RATE))
        self.hop_length = int(processor.get("hop_length", DEFAULT_HOP_LENGTH))
        self.stack_factor = int(config.get("stack_factor", DEFAULT_STACK_FACTOR))
        audio = config.get("audio_config") or {}
        positions = int(audio.get("max_source_positions", DEFAULT_MAX_SOURCE_POSITIONS))
        self.window_frames = 2 * positions  # the conv's stride 2: two frames per position
        if min(self.sampling_rate, self.hop_length, self.stack_factor, positions) < 1:
            raise ValueError("sampling_rate, hop_length, stack_factor and "
                             "max_source_positions must be >= 1")

    def chunk_tokens(self, frames: int) -> int:
        """Tokens of one chunk of ``frames`` valid frames."""
        return math.ceil(((frames - 1) // 2 + 1) / self.stack_factor)

    def audio(self, num_samples: int, sample_rate: int) -> ItemGeometry:
        if num_samples < 1 or sample_rate < 1:
            raise ValueError("audio has no samples (its header declares none)")
        n = resampled_length(num_samples, sample_rate, self.sampling_rate)
        frames = n // self.hop_length
        if frames < 1:
            shortest = math.ceil(self.hop_length * 1000 / self.sampling_rate)
            raise ValueError(f"audio is too short: {num_samples} samples at {sample_rate} Hz; "
                             f"this model needs at least {shortest} ms")
        tokens = sum(self.chunk_tokens(f) for f in chunk_frames(frames, self.window_frames))
        return ItemGeometry(tokens, num_samples=n)
