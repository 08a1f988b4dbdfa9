"""LM decoder registry: HF `architectures` name -> our model class."""

from __future__ import annotations

from torch import nn

from llm_worker.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def get_model_class(hf_config) -> type[nn.Module]:
    """The decoder class for the first of the config's `architectures` that we support."""
    archs = getattr(hf_config, "architectures", None) or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported architectures {archs}; supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )
