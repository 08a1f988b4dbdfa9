"""Qwen2-Audio, encoder slice: log-mel features over one 30 s window, the Whisper tower with
average pooling, and the linear projector to the LM's width.

A clip (mono, at 16 kHz) is cut to the window and padded with silence to fill it, as
transformers' processor does (``padding="max_length"``, ``truncation=True``); the tower masks the
padding frames as attention keys and the rows of the clip's own frames are kept
(`protocol.geometry.qwen2_audio` counts them). Every window has the same shape, so the clips
of a step run as one batch.

Only ``audio_tower.*`` and ``multi_modal_projector.*`` are read from the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig

from encoder_worker.models.base import AudioEncoderModel, AudioFeatures
from encoder_worker.models.weights import copy_into, load_weights
from encoder_worker.models.whisper import WhisperEncoder
from encoder_worker.models.whisper_features import LogMel
from protocol.checkpoint import audio_processor_config
from protocol.geometry import ItemGeometry
from protocol.geometry.qwen2_audio import Qwen2AudioGeometry, feature_frames


class Qwen2AudioTower(nn.Module):
    def __init__(self, audio_config, text_hidden: int):
        super().__init__()
        self.audio_tower = WhisperEncoder(audio_config, pool=True)
        self.multi_modal_projector = nn.Module()
        self.multi_modal_projector.linear = nn.Linear(audio_config.d_model, text_hidden)

    def forward(self, features: torch.Tensor, frames: list[int]) -> torch.Tensor:
        """[B, n_mels, window] -> [B, window / 4, text_hidden]."""
        return self.multi_modal_projector.linear(self.audio_tower(features, frames))


class Qwen2AudioEncoder(AudioEncoderModel):
    def __init__(self, model_dir: str, device: torch.device, dtype: torch.dtype):
        hf = AutoConfig.from_pretrained(model_dir)
        model_config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        extractor = audio_processor_config(model_dir) or {}
        self.geometry = Qwen2AudioGeometry(model_config, extractor)
        audio = hf.audio_config
        if self.geometry.window_frames != 2 * audio.max_source_positions:
            raise ValueError(f"{model_dir}: the feature extractor's window is "
                             f"{self.geometry.window_frames} frames, the tower takes "
                             f"{2 * audio.max_source_positions}")
        self.sampling_rate = self.geometry.sampling_rate
        self.features = LogMel.for_tower(extractor, audio.num_mel_bins, self.sampling_rate,
                                         self.geometry.hop_length, model_dir)
        self.device, self.dtype = torch.device(device), dtype
        with torch.device("meta"):
            self.tower = Qwen2AudioTower(audio, hf.text_config.hidden_size)
        self.tower = self.tower.to(dtype).to_empty(device=self.device).eval()
        self.hidden_size = hf.text_config.hidden_size
        copy_into(self.tower, load_weights(model_dir, _local_name), f"{model_dir} audio")

    def preprocess_audio(self, samples: np.ndarray, geometry: ItemGeometry | None
                         ) -> AudioFeatures:
        window = self.geometry.window_samples
        clip = samples[:window]
        padded = np.zeros(window, np.float32)
        padded[:clip.size] = clip
        frames = feature_frames(clip.size, self.geometry.hop_length)
        values = self.features(torch.from_numpy(padded))[None]  # [1, n_mels, window frames]
        return AudioFeatures(values, (frames,), self.geometry.tokens_of_frames(frames))

    @torch.inference_mode()
    def encode_packed(self, items: list[AudioFeatures]) -> list[torch.Tensor]:
        frames = [f for it in items for f in it.frames]
        # A clip's tokens pool conv rows below its valid count R, each of which reads frames up
        # to 2R and attends to keys below R only: the window past 2R + 1 frames of the longest
        # clip changes none of them, so the tower runs on that prefix (a 10 s clip: a third of
        # the 30 s window's rows, a sixth of its attention), not on the whole window.
        longest = max(WhisperEncoder.rows_of_frames(f) for f in frames)
        cut = min(items[0].values.shape[-1], 2 * longest + 1)
        features = torch.cat([it.values[..., :cut] for it in items]).to(self.device)
        rows = self.tower(features, frames)  # [B, ~cut / 4, hidden]
        return [rows[i, :it.num_tokens] for i, it in enumerate(items)]


def _local_name(name: str) -> str | None:
    """Checkpoint name -> tower parameter, or None for the LM's weights (transformers 5 saves
    ``audio_tower.*``; ``model.audio_tower.*`` is read too)."""
    name = name.removeprefix("model.")
    if name.startswith(("audio_tower.", "multi_modal_projector.")):
        return name
    return None
