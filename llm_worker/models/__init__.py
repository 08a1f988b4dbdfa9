"""LM decoder registry: HF `architectures` name -> our model class (protocol/models.py's decoder
column).

Values are import paths, so validating a checkpoint's architecture (the launcher does it before
any process starts) imports neither torch nor the model code.
"""

from __future__ import annotations

import importlib
from typing import Any

from protocol.models import MODELS

# HF architecture -> "module:Class" of its LM, or {text_config.model_type: "module:Class"} for
# multimodal checkpoints whose LM is a plain one (the towers live in encoder_worker/; this role
# loads only the LM's weights). One table for every role: protocol/models.py.
DECODERS: dict[str, str | dict[str, str]] = {arch: p.decoder for arch, p in MODELS.items()}


def text_config(hf_config):
    """The language model's config (multimodal checkpoints nest it under text_config)."""
    return getattr(hf_config, "text_config", None) or hf_config


def _get(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def model_class_path(hf_config: Any) -> str:
    """"module:Class" of the decoder for the first of the config's `architectures` we support.
    ``hf_config`` is a transformers config or the parsed config.json; one-line ValueError if
    nothing matches."""
    archs = _get(hf_config, "architectures") or []
    for arch in archs:
        decoder = DECODERS.get(arch)
        if isinstance(decoder, str):
            return decoder
        if decoder is not None:
            lm_type = _get(_get(hf_config, "text_config") or {}, "model_type")
            if lm_type not in decoder:
                raise ValueError(f"{arch} with a {lm_type!r} language model is not supported "
                                 f"(supported: {', '.join(decoder)})")
            return decoder[lm_type]
    raise ValueError(f"unsupported architecture {archs or '(none in config.json)'}; "
                     f"supported: {', '.join(sorted(DECODERS))}")


def get_model_class(hf_config):
    module, name = model_class_path(hf_config).split(":")
    return getattr(importlib.import_module(module), name)
