"""Ultravox's config.json as a transformers config, for code that reads checkpoints through
``AutoConfig`` (transformers ships no Ultravox class; the checkpoints' own class is remote code,
which mmserve never runs).

The fields are the published ones (fixie-ai/ultravox-v0_5-*): ``audio_config`` (a Whisper
config), ``text_config`` (the LM's, by its model_type), ``stack_factor``, ``hidden_size``
(the projector's width before SwiGLU halves it), ``projector_act``, ``projector_ln_mid``,
``norm_init``, ``audio_token_index``, ``audio_model_id`` / ``text_model_id`` (hub names the
weights were once taken from; here every weight must be in the folder).
"""

from __future__ import annotations

from typing import Any

import transformers


class UltravoxConfig(transformers.PretrainedConfig):
    model_type = "ultravox"

    def __init__(self, audio_config: dict[str, Any] | None = None,
                 text_config: dict[str, Any] | None = None, stack_factor: int = 8,
                 hidden_size: int = 4096, projector_act: str = "swiglu",
                 projector_ln_mid: bool = False, norm_init: float = 0.4,
                 audio_token_index: int | None = None, audio_model_id: str | None = None,
                 text_model_id: str | None = None, num_projector_layers: int = 0,
                 **kwargs: Any):
        audio = audio_config if audio_config is not None else {}
        self.audio_config = (transformers.WhisperConfig(**audio) if isinstance(audio, dict)
                             else audio)
        text = dict(text_config) if isinstance(text_config, dict) else text_config
        if isinstance(text, dict) or text is None:
            text = text or {}
            text = transformers.AutoConfig.for_model(text.pop("model_type", "llama"), **text)
        self.text_config = text
        self.stack_factor = stack_factor
        self.hidden_size = hidden_size
        self.projector_act = projector_act
        self.projector_ln_mid = projector_ln_mid
        self.norm_init = norm_init
        self.audio_token_index = audio_token_index
        self.audio_model_id = audio_model_id
        self.text_model_id = text_model_id
        self.num_projector_layers = num_projector_layers
        super().__init__(**kwargs)


def register_config() -> None:
    """Let ``AutoConfig`` read Ultravox checkpoints in this process (idempotent)."""
    try:
        transformers.AutoConfig.register("ultravox", UltravoxConfig)
    except ValueError:  # already registered
        pass
