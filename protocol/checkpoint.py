"""Reading a Hugging Face checkpoint folder's metadata, which every role needs the same way.

JSON only (no torch, no transformers), so the frontend can size placeholders and the encoder can
preprocess from the same settings without either importing the other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def image_processor_config(folder: str | Path) -> dict[str, Any] | None:
    """Image processor settings: transformers 5 nests them in processor_config.json under
    "image_processor"; older checkpoints keep them flat in preprocessor_config.json."""
    folder = Path(folder)
    new = folder / "processor_config.json"
    if new.is_file():
        nested = json.loads(new.read_text(encoding="utf-8")).get("image_processor")
        if isinstance(nested, dict):
            return nested
    old = folder / "preprocessor_config.json"
    if old.is_file():
        return json.loads(old.read_text(encoding="utf-8"))
    return None


def video_processor_config(folder: str | Path) -> dict[str, Any] | None:
    """Video processor settings, where transformers looks for them: nested in
    processor_config.json under "video_processor", else video_preprocessor_config.json; None
    when neither has them (transformers then reads the image processor's file)."""
    folder = Path(folder)
    new = folder / "processor_config.json"
    if new.is_file():
        nested = json.loads(new.read_text(encoding="utf-8")).get("video_processor")
        if isinstance(nested, dict):
            return nested
    flat = folder / "video_preprocessor_config.json"
    if flat.is_file():
        return json.loads(flat.read_text(encoding="utf-8"))
    return None


def audio_processor_config(folder: str | Path) -> dict[str, Any] | None:
    """Feature extractor settings (audio models): nested in processor_config.json under
    "feature_extractor" (transformers 5), else flat in preprocessor_config.json."""
    folder = Path(folder)
    new = folder / "processor_config.json"
    if new.is_file():
        nested = json.loads(new.read_text(encoding="utf-8")).get("feature_extractor")
        if isinstance(nested, dict):
            return nested
    old = folder / "preprocessor_config.json"
    if old.is_file():
        return json.loads(old.read_text(encoding="utf-8"))
    return None


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
