"""Ultravox, encoder slice: log-mel features over the whole clip, cut into 30 s chunks, each
through a Whisper encoder, then the projector: ``stack_factor`` consecutive rows stacked into
one, RMSNorm, a linear to ``hidden_size``, SwiGLU (value half times SiLU of the gate half,
halving the width), RMSNorm (``projector_ln_mid``; older checkpoints norm after the second
linear instead), a linear to the LM's width. The chunks' tokens (`protocol.geometry.ultravox`
counts them) are concatenated into the clip's rows.

As the checkpoints' processor does: features are normalized over the whole clip (one peak), a
single chunk keeps its own length, and the last of several chunks is padded with zero features
to the window; the tower masks every chunk's padding as attention keys. A chunk's rows depend
on its length at the edge (the convolutions see padding), so only chunks of one length share a
forward.

Config keys and weight names are the published ones (`encoder_worker.models.ultravox_config`):
``audio_tower.*`` (or ``audio_tower.model.encoder.*``) and ``multi_modal_projector.{ln_pre,
linear_1, ln_mid | ln_post, linear_2}.weight``; the LM's ``language_model.*`` is the decoder's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoder_worker.models.base import AudioEncoderModel, AudioFeatures
from encoder_worker.models.ultravox_config import UltravoxConfig
from encoder_worker.models.weights import copy_into, load_weights
from encoder_worker.models.whisper import WhisperEncoder
from encoder_worker.models.whisper_features import LogMel
from protocol.checkpoint import audio_processor_config
from protocol.geometry import ItemGeometry
from protocol.geometry.ultravox import UltravoxGeometry, chunk_frames

RMS_EPS = 1e-6  # the checkpoints' RMSNorm (Llama's, whose default this is)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32, as Llama's RMSNorm computes them
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)
        return self.weight * xf.to(x.dtype)


class UltravoxProjector(nn.Module):
    def __init__(self, config: UltravoxConfig):
        super().__init__()
        if config.projector_act != "swiglu" or config.num_projector_layers:
            raise ValueError(f"Ultravox projector {config.projector_act!r} with "
                             f"{config.num_projector_layers} transformer layers is not "
                             "supported (only the SwiGLU feed-forward projector)")
        self.stack_factor = config.stack_factor
        dim_in = config.audio_config.d_model * config.stack_factor
        dim_mid = config.hidden_size // 2  # SwiGLU halves the width
        dim_out = config.text_config.hidden_size
        self.ln_pre = RMSNorm(dim_in)
        self.linear_1 = nn.Linear(dim_in, config.hidden_size, bias=False)
        self.ln_mid = RMSNorm(dim_mid) if config.projector_ln_mid else nn.Identity()
        self.linear_2 = nn.Linear(dim_mid, dim_out, bias=False)
        self.ln_post = nn.Identity() if config.projector_ln_mid else RMSNorm(dim_out)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, T, audio_dim] -> [B, ceil(T / stack), text_dim]."""
        b, t, c = rows.shape
        pad = -t % self.stack_factor
        stacked = F.pad(rows, (0, 0, 0, pad)).view(b, (t + pad) // self.stack_factor,
                                                   c * self.stack_factor)
        value, gate = self.linear_1(self.ln_pre(stacked)).chunk(2, dim=-1)
        return self.ln_post(self.linear_2(self.ln_mid(value * F.silu(gate))))


class UltravoxTower(nn.Module):
    def __init__(self, config: UltravoxConfig):
        super().__init__()
        self.audio_tower = WhisperEncoder(config.audio_config)
        self.multi_modal_projector = UltravoxProjector(config)

    def forward(self, features: torch.Tensor, frames: list[int]) -> torch.Tensor:
        return self.multi_modal_projector(self.audio_tower(features, frames))


class UltravoxEncoder(AudioEncoderModel):
    def __init__(self, model_dir: str, device: torch.device, dtype: torch.dtype):
        raw = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        config = UltravoxConfig(**raw)
        extractor = audio_processor_config(model_dir) or {}
        self.geometry = UltravoxGeometry(raw, extractor)
        audio = config.audio_config
        self.sampling_rate = self.geometry.sampling_rate
        self.features = LogMel.for_tower(extractor, audio.num_mel_bins, self.sampling_rate,
                                         self.geometry.hop_length, model_dir)
        self.device, self.dtype = torch.device(device), dtype
        with torch.device("meta"):
            self.tower = UltravoxTower(config)
        self.tower = self.tower.to(dtype).to_empty(device=self.device).eval()
        self.hidden_size = config.text_config.hidden_size
        weights = load_weights(model_dir, _local_name)
        if not any(k.startswith("audio_tower.") for k in weights):
            raise ValueError(f"{model_dir}: no audio_tower.* weights in the folder (the config's "
                             f"audio_model_id {config.audio_model_id!r} names where they came "
                             "from: save them into the checkpoint)")
        copy_into(self.tower, weights, f"{model_dir} audio")

    def preprocess_audio(self, samples: np.ndarray, geometry: ItemGeometry | None
                         ) -> AudioFeatures:
        window = self.geometry.window_frames
        mel = self.features(torch.from_numpy(np.ascontiguousarray(samples)))  # [mels, frames]
        frames = chunk_frames(mel.shape[-1], window)
        if len(frames) == 1:
            values = mel[None]  # one chunk keeps its own length
        else:
            mel = F.pad(mel, (0, len(frames) * window - mel.shape[-1]))
            values = mel.view(mel.shape[0], len(frames), window).transpose(0, 1)
        tokens = sum(self.geometry.chunk_tokens(f) for f in frames)
        return AudioFeatures(values.contiguous(), tuple(frames), tokens)

    @torch.inference_mode()
    def encode_packed(self, items: list[AudioFeatures]) -> list[torch.Tensor]:
        chunks = [(i, c, it.values[c], f) for i, it in enumerate(items)
                  for c, f in enumerate(it.frames)]
        rows: dict[tuple[int, int], torch.Tensor] = {}
        by_length: dict[int, list[tuple[int, int, torch.Tensor, int]]] = {}
        for chunk in chunks:
            by_length.setdefault(chunk[2].shape[-1], []).append(chunk)
        for group in by_length.values():
            features = torch.stack([v for _, _, v, _ in group]).to(self.device)
            out = self.tower(features, [f for *_, f in group])  # [B, tokens, hidden]
            for (i, c, _, f), o in zip(group, out):
                rows[(i, c)] = o[:self.geometry.chunk_tokens(f)]
        return [torch.cat([rows[(i, c)] for c in range(len(it.frames))])
                for i, it in enumerate(items)]


def _local_name(name: str) -> str | None:
    """Checkpoint name -> tower parameter, or None for the LM's weights. Some checkpoints keep
    the Whisper encoder under ``audio_tower.model.encoder.`` (vLLM maps it the same way)."""
    if name.startswith("audio_tower.model.encoder."):
        return "audio_tower." + name.removeprefix("audio_tower.model.encoder.")
    if name.startswith(("audio_tower.", "multi_modal_projector.")):
        return name
    return None
