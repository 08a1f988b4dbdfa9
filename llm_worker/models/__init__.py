"""LM decoder registry: HF `architectures` name -> our model class.

Values are import paths, so validating a checkpoint's architecture (the launcher does it before
any process starts) imports neither torch nor the model code.
"""

from __future__ import annotations

import importlib
from typing import Any

_LLAMA = "llm_worker.models.llama"
_QWEN2_VL = "llm_worker.models.qwen2_vl"
MODEL_REGISTRY: dict[str, str] = {
    "LlamaForCausalLM": f"{_LLAMA}:LlamaForCausalLM",
    "MistralForCausalLM": f"{_LLAMA}:MistralForCausalLM",
    "Qwen2ForCausalLM": f"{_LLAMA}:Qwen2ForCausalLM",
    # Their LM is always Qwen2's, with M-RoPE (older config.json files are flat, no text_config).
    "Qwen2VLForConditionalGeneration": f"{_QWEN2_VL}:Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": f"{_QWEN2_VL}:Qwen2_5_VLForConditionalGeneration",
}

# Multimodal checkpoints whose decoder is a plain LM named by `text_config.model_type`
# (the towers live in encoder_worker/; this role loads only the LM's weights).
MULTIMODAL_LM_TYPES: dict[str, dict[str, str]] = {
    "LlavaForConditionalGeneration": {
        "llama": f"{_LLAMA}:LlamaForCausalLM",
        "mistral": f"{_LLAMA}:MistralForCausalLM",
        "qwen2": f"{_LLAMA}:Qwen2ForCausalLM",
    },
}


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
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
        lm_types = MULTIMODAL_LM_TYPES.get(arch)
        if lm_types is not None:
            lm_type = _get(_get(hf_config, "text_config") or {}, "model_type")
            if lm_type not in lm_types:
                raise ValueError(f"{arch} with a {lm_type!r} language model is not supported "
                                 f"(supported: {', '.join(lm_types)})")
            return lm_types[lm_type]
    known = ", ".join(sorted([*MODEL_REGISTRY, *MULTIMODAL_LM_TYPES]))
    raise ValueError(f"unsupported architecture {archs or '(none in config.json)'}; "
                     f"supported: {known}")


def get_model_class(hf_config):
    module, name = model_class_path(hf_config).split(":")
    return getattr(importlib.import_module(module), name)
