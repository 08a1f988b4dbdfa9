"""Read a subset of a checkpoint's safetensors: the encoder role loads only its own weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open


def _shards(folder: Path, names: Callable[[str], str | None]) -> list[Path]:
    """The shard files worth opening: via the index when there is one (a 7B LLaVA's vision
    weights sit in one or two of its shards), else every *.safetensors file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted({folder / f for k, f in weight_map.items() if names(k) is not None})
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    return shards


def load_weights(model_dir: str | Path, names: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """CPU tensors for every checkpoint tensor that ``names`` maps to a local name (None: skip).

    Files are memory-mapped (``safe_open``); only the selected tensors are read.
    """
    out: dict[str, torch.Tensor] = {}
    for path in _shards(Path(model_dir), names):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                local = names(key)
                if local is None:
                    continue
                if local in out:
                    raise ValueError(f"{path}: two checkpoint tensors map to {local!r}")
                out[local] = f.get_tensor(key)
    return out


def copy_into(module: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``weights`` into ``module``'s parameters and buffers (casting dtype); every
    parameter must be covered and every weight must have a home."""
    targets = dict(module.named_parameters()) | dict(module.named_buffers())
    unknown = sorted(set(weights) - set(targets))
    missing = sorted(n for n, _ in module.named_parameters() if n not in weights)
    if unknown or missing:
        raise ValueError(f"{where}: checkpoint does not match the model; "
                         f"missing {missing[:5]}, unexpected {unknown[:5]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            target = targets[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"{where}: {name} has shape {list(tensor.shape)}, "
                                 f"expected {list(target.shape)}")
            target.copy_(tensor)
