"""Shared by the Qwen2-Audio tests: clips, WAV bytes, and transformers' greedy answer for a
prompt with clips.

The reference pipeline is transformers' own from the waveform on: each clip (already at 16 kHz:
a clip at another rate is resampled with librosa's default, as any transformers user of
Qwen2-Audio does) goes through `WhisperFeatureExtractor` (``padding="max_length"``, the
attention mask the processor asks for), each ``<|AUDIO|>`` is widened to the processor's count
for the clip (``(((frames - 1) // 2 + 1) - 2) // 2 + 1``), and
`Qwen2AudioForConditionalGeneration.generate` runs on those."""

from __future__ import annotations

import struct

import librosa
import numpy as np
import torch
import transformers

AUDIO = "<|audio_bos|><|AUDIO|><|audio_eos|>"


def clip(seed: int, seconds: float = 1.0, rate: int = 16_000) -> np.ndarray:
    """[samples] float32: a few random tones and some noise, so clips differ."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tones = sum(rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * rng.uniform(100, 3000) * t)
                for _ in range(3))
    return (tones + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def pcm16(x: np.ndarray) -> np.ndarray:
    """A float clip quantized as a 16-bit WAV holds it: int16 / 32768 (what decoding gives)."""
    return (np.round(np.clip(x, -1, 1 - 1 / 32768) * 32768).astype(np.int16) / 32768.0
            ).astype(np.float32)


def wav16(x: np.ndarray, rate: int, channels: int = 1) -> bytes:
    """A 16-bit PCM WAV of ``x`` ([samples], repeated over ``channels``)."""
    q = np.round(np.clip(x, -1, 1 - 1 / 32768) * 32768).astype("<i2")
    data = np.repeat(q[:, None], channels, axis=1).tobytes()
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt "
            + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data)


def at_16k(x: np.ndarray, rate: int) -> np.ndarray:
    return x if rate == 16_000 else librosa.resample(x, orig_sr=rate, target_sr=16_000)


class HFQwen2Audio:
    def __init__(self, path: str):
        self.tok = transformers.AutoTokenizer.from_pretrained(path)
        self.features = transformers.WhisperFeatureExtractor.from_pretrained(path)
        self.model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32).eval()
        self.pad = self.model.config.audio_token_id

    def chat_prompt(self, content: list[dict]) -> str:
        parts = [p if p["type"] == "text" else {"type": "audio"} for p in content]
        return self.tok.apply_chat_template([{"role": "user", "content": parts}],
                                            add_generation_prompt=True, tokenize=False)

    def audio_rows(self, x: np.ndarray) -> torch.Tensor:
        """[tokens, hidden] rows of one 16 kHz clip from transformers' tower and projector, its
        padding frames masked as the model's forward masks them."""
        from transformers.masking_utils import create_bidirectional_mask

        inputs = self.features([x], sampling_rate=16_000, padding="max_length",
                               return_attention_mask=True, return_tensors="pt")
        tower = self.model.model.audio_tower
        rows_in, rows_out = tower._get_feat_extract_output_lengths(
            inputs["attention_mask"].sum(-1))
        t = (inputs["input_features"].shape[-1] - 2) // 2 + 1
        mask = (torch.arange(t)[None] < rows_in[:, None]).long()
        mask = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(1, t, 1),
                                         attention_mask=mask)
        with torch.no_grad():
            hidden = tower(inputs["input_features"], attention_mask=mask).last_hidden_state
            return self.model.model.multi_modal_projector(hidden)[0, :int(rows_out[0])]

    def greedy(self, prompt: str, clips: list[np.ndarray], n: int) -> list[int]:
        """``clips``: [samples] float32 at 16 kHz, in prompt order."""
        ids = self.tok.encode(prompt, add_special_tokens=False)
        assert ids.count(self.pad) == len(clips)
        kw = {}
        if clips:
            inputs = self.features(list(clips), sampling_rate=16_000, padding="max_length",
                                   return_attention_mask=True, return_tensors="pt")
            frames = inputs["attention_mask"].sum(-1).tolist()
            counts = iter([(((f - 1) // 2 + 1) - 2) // 2 + 1 for f in frames])
            ids = [t for tok in ids for t in ([tok] * next(counts) if tok == self.pad
                                              else [tok])]
            kw = {"input_features": inputs["input_features"],
                  "feature_attention_mask": inputs["attention_mask"]}
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=n, eos_token_id=[], do_sample=False, **kw)
        return out[0, len(ids):].tolist()
