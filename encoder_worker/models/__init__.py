"""Encoder slice registry: HF ``architectures`` name -> the class that runs its tower.

Values are import paths, so checking whether a checkpoint needs an encoder (the launcher does)
imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.models import column

if TYPE_CHECKING:
    import torch

    from encoder_worker.models.base import EncoderModel

ENCODER_REGISTRY: dict[str, str] = column("encoder")  # the encoder column of protocol/models.py


def encoder_class(arch: str) -> type[EncoderModel]:
    module, name = ENCODER_REGISTRY[arch].split(":")
    return getattr(importlib.import_module(module), name)


def load_encoder(model_dir: str, device: torch.device, dtype: torch.dtype) -> EncoderModel:
    """The encoder slice for the first of the checkpoint's ``architectures`` we support."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in ENCODER_REGISTRY:
            return encoder_class(arch)(model_dir, device, dtype)
    raise ValueError(f"{model_dir}: no encoder for architectures {archs}; "
                     f"supported: {sorted(ENCODER_REGISTRY)}")
