"""Reading a Hugging Face checkpoint folder's metadata, which every role needs the same way.

JSON only (no torch, no transformers), so the frontend can size placeholders and the encoder can
preprocess from the same settings without either importing the other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _processor_section(folder: str | Path, section: str, flat_file: str) -> dict[str, Any] | None:
    """One processor's settings where transformers looks for them: nested in
    processor_config.json under ``section`` (transformers 5), else the flat ``flat_file``; None
    when neither has them."""
    folder = Path(folder)
    new = folder / "processor_config.json"
    if new.is_file():
        nested = json.loads(new.read_text(encoding="utf-8")).get(section)
        if isinstance(nested, dict):
            return nested
    flat = folder / flat_file
    if flat.is_file():
        return json.loads(flat.read_text(encoding="utf-8"))
    return None


def image_processor_config(folder: str | Path) -> dict[str, Any] | None:
    """Image processor settings: transformers 5 nests them in processor_config.json under
    "image_processor"; older checkpoints keep them flat in preprocessor_config.json."""
    return _processor_section(folder, "image_processor", "preprocessor_config.json")


def video_processor_config(folder: str | Path) -> dict[str, Any] | None:
    """Video processor settings: nested under "video_processor", else
    video_preprocessor_config.json; None when neither has them (transformers then reads the
    image processor's file)."""
    return _processor_section(folder, "video_processor", "video_preprocessor_config.json")


def audio_processor_config(folder: str | Path) -> dict[str, Any] | None:
    """Feature extractor settings (audio models): nested under "feature_extractor", else flat
    in preprocessor_config.json."""
    return _processor_section(folder, "feature_extractor", "preprocessor_config.json")


def max_positions(folder: str | Path) -> int:
    """The language model's max_position_embeddings (multimodal configs nest it in text_config):
    the longest context the checkpoint was trained for."""
    cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    cfg = cfg.get("text_config") or cfg
    return int(cfg.get("max_position_embeddings", 2048))


def resolve_device(device: str) -> str:
    """"auto" -> cuda when a GPU is visible, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """"auto" -> bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if resolve_device(device).startswith("cuda") else "float32"
