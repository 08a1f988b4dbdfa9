"""LM decoder registry: HF `architectures` name -> our model class."""

from __future__ import annotations

from torch import nn

from llm_worker.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


# Multimodal checkpoints whose decoder is a plain LM named by `text_config.model_type`
# (the towers live in encoder_worker/; this role loads only the LM's weights).
MULTIMODAL_LM_TYPES: dict[str, dict[str, type[nn.Module]]] = {
    "LlavaForConditionalGeneration": {
        "llama": LlamaForCausalLM,
        "mistral": MistralForCausalLM,
        "qwen2": Qwen2ForCausalLM,
    },
}


def text_config(hf_config):
    """The language model's config (multimodal checkpoints nest it under text_config)."""
    return getattr(hf_config, "text_config", None) or hf_config


def get_model_class(hf_config) -> type[nn.Module]:
    """The decoder class for the first of the config's `architectures` that we support."""
    archs = getattr(hf_config, "architectures", None) or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
        lm_types = MULTIMODAL_LM_TYPES.get(arch)
        if lm_types is not None:
            lm_type = text_config(hf_config).model_type
            if lm_type not in lm_types:
                raise ValueError(f"{arch} with a {lm_type!r} language model is not supported")
            return lm_types[lm_type]
    raise ValueError(
        f"unsupported architectures {archs}; supported: {', '.join(sorted([*MODEL_REGISTRY, *MULTIMODAL_LM_TYPES]))}"
    )
