"""Every architecture mmserve serves, in one table: HF ``architectures`` name -> where each role
finds its part of the model.

Adding an architecture is its model files plus one line here. Each role's registry
(`llm_worker.models`, `encoder_worker.models`, `frontend.models`, `protocol.geometry`) reads its
column of this table. Values are import paths ("module:Class"), so a role imports only its own
part of its own model, and checking a checkpoint (the launcher does it before any process starts)
imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelParts:
    # The LM (llm_worker). A dict maps the checkpoint's text_config.model_type to the class:
    # multimodal checkpoints whose LM is a plain one (LLaVA over Llama, Mistral or Qwen2,
    # Qwen2-Audio over Qwen2).
    decoder: str | dict[str, str]
    geometry: str | None = None  # protocol.geometry: what a media item becomes; None: text only
    placeholders: str | None = None  # frontend.models: the prompt's placeholder slice
    encoder: str | None = None  # encoder_worker.models: preprocessing + tower + projector


_LLAMA = "llm_worker.models.llama"
_PLAIN_LMS = {"llama": f"{_LLAMA}:LlamaForCausalLM", "mistral": f"{_LLAMA}:MistralForCausalLM",
              "qwen2": f"{_LLAMA}:Qwen2ForCausalLM"}
_LLAVA = ("protocol.geometry.llava:LlavaGeometry", "frontend.models.llava:LlavaPlaceholders",
          "encoder_worker.models.llava:LlavaEncoder")
# One image processor, placeholder rule and encoder class for both generations (the encoder picks
# its tower by the vision config); their LM is always Qwen2's with M-RoPE.
_QWEN2_VL = ("protocol.geometry.qwen2_vl:Qwen2VLGeometry",
             "frontend.models.qwen2_vl:Qwen2VLPlaceholders",
             "encoder_worker.models.qwen2_vl:Qwen2VLEncoder")

MODELS: dict[str, ModelParts] = {
    "LlamaForCausalLM": ModelParts(_PLAIN_LMS["llama"]),
    "MistralForCausalLM": ModelParts(_PLAIN_LMS["mistral"]),
    "Qwen2ForCausalLM": ModelParts(_PLAIN_LMS["qwen2"]),
    "LlavaForConditionalGeneration": ModelParts(_PLAIN_LMS, *_LLAVA),
    "Qwen2VLForConditionalGeneration": ModelParts(
        "llm_worker.models.qwen2_vl:Qwen2VLForConditionalGeneration", *_QWEN2_VL),
    "Qwen2_5_VLForConditionalGeneration": ModelParts(
        "llm_worker.models.qwen2_vl:Qwen2_5_VLForConditionalGeneration", *_QWEN2_VL),
    "LlavaOnevisionForConditionalGeneration": ModelParts(
        _PLAIN_LMS, "protocol.geometry.llava_onevision:LlavaOnevisionGeometry",
        "frontend.models.llava_onevision:LlavaOnevisionPlaceholders",
        "encoder_worker.models.llava_onevision:LlavaOnevisionEncoder"),
    "Qwen2AudioForConditionalGeneration": ModelParts(
        _PLAIN_LMS, "protocol.geometry.qwen2_audio:Qwen2AudioGeometry",
        "frontend.models.qwen2_audio:Qwen2AudioPlaceholders",
        "encoder_worker.models.qwen2_audio:Qwen2AudioEncoder"),
    # Ultravox's published config (no transformers class: see
    # encoder_worker/models/ultravox_config.py); its LM is a plain one, by text_config.
    "UltravoxModel": ModelParts(
        _PLAIN_LMS, "protocol.geometry.ultravox:UltravoxGeometry",
        "frontend.models.ultravox:UltravoxPlaceholders",
        "encoder_worker.models.ultravox:UltravoxEncoder"),
    "LlavaNextForConditionalGeneration": ModelParts(
        _PLAIN_LMS, "protocol.geometry.llava_next:LlavaNextGeometry",
        "frontend.models.llava_next:LlavaNextPlaceholders",
        "encoder_worker.models.llava_next:LlavaNextEncoder"),
}


# model_type -> "module:function" registering a config class transformers does not ship with
# AutoConfig (the checkpoints' own is remote code, never run). Every role that reads such a
# checkpoint through AutoConfig calls `register_config` first.
EXTRA_CONFIGS: dict[str, str] = {
    "ultravox": "encoder_worker.models.ultravox_config:register_config",
}


def register_config(model_dir: str) -> None:
    """Register the config class of the checkpoint in ``model_dir`` with transformers'
    AutoConfig when transformers has none (imports it only then)."""
    import importlib
    import json
    from pathlib import Path

    path = Path(model_dir) / "config.json"
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # no readable config: the role's own checks say so
    if model_type in EXTRA_CONFIGS:
        module, name = EXTRA_CONFIGS[model_type].split(":")
        getattr(importlib.import_module(module), name)()


def column(part: str) -> dict[str, str]:
    """architecture -> import path of ``part`` ("geometry", "placeholders", "encoder"), for the
    architectures that have one."""
    return {arch: getattr(p, part) for arch, p in MODELS.items() if getattr(p, part)}
