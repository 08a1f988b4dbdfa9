"""Qwen2-Audio, frontend slice: each clip's placeholder count depends on its duration
(`protocol.geometry.qwen2_audio`), so the frontend sizes it from the probed header, and a clip
sent by uuid alone is placed only when its geometry is known (seen here or in the encoders).

Qwen2-Audio's chat template writes ``Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>`` per clip;
``<|AUDIO|>`` is the token widened to the clip's run, bos/eos stay single text tokens.
"""

from __future__ import annotations

from typing import Any

from frontend.models import AudioPlaceholders
from protocol.geometry.qwen2_audio import Qwen2AudioGeometry


class Qwen2AudioPlaceholders(AudioPlaceholders):
    geometry_class = Qwen2AudioGeometry

    def placeholder_text(self, tokenizer: Any, modality: str = "audio") -> str:
        """What a string-content template gets for one clip: the audio token wrapped in its
        bos/eos tokens, as Qwen2-Audio's template writes it (when the tokenizer has them)."""
        pad = tokenizer.convert_ids_to_tokens(self.token_id(modality))
        vocab = tokenizer.get_vocab()
        if "<|audio_bos|>" in vocab and "<|audio_eos|>" in vocab:
            return f"<|audio_bos|>{pad}<|audio_eos|>"
        return pad
