"""Load a decoder from a local HF checkpoint folder (safetensors, single file or sharded).

Under tensor parallelism each rank reads only its shard: matrices come as `TensorSlice`s, which
read just the rows or columns a layer's weight loader indexes (safetensors' `get_slice` over the
mmap'd file), so no rank copies a whole weight it keeps 1/tp of.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from llm_worker.attention import AttentionBackend
from llm_worker.models import get_model_class, text_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's shards, else the single file."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {str(model_dir)!r}")


class TensorSlice:
    """A checkpoint tensor not read yet: indexing (``w[a:b]``, ``w[:, a:b]``) reads only that
    part of the file; ``w[:]`` reads it all. Has ``shape`` and ``dim()`` like a tensor."""

    def __init__(self, lazy) -> None:  # lazy: safetensors' PySafeSlice
        self._lazy = lazy
        self.shape = torch.Size(lazy.get_shape())

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> torch.Tensor:
        return self._lazy[index]


def materialize(weight: torch.Tensor | TensorSlice) -> torch.Tensor:
    return weight[:] if isinstance(weight, TensorSlice) else weight


def iter_safetensors(
    model_dir: str | Path, keep: Callable[[str], bool] | None = None, lazy: bool = False
) -> Iterator[tuple[str, torch.Tensor | TensorSlice]]:
    """Yield (HF name, CPU tensor) for every tensor, mmap-backed; `keep` skips others unread.

    ``lazy``: matrices come as `TensorSlice`s for the weight loaders to index; vectors (norm
    gains, biases: tiny) are read whole, since some loaders take them as they are.
    """
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if keep is not None and not keep(name):
                    continue
                if lazy:
                    sl = f.get_slice(name)
                    yield name, TensorSlice(sl) if len(sl.get_shape()) >= 2 else sl[:]
                else:
                    yield name, f.get_tensor(name)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(
    model_dir: str | Path,
    hf_config,
    dtype: torch.dtype,
    device: torch.device | str,
    tp_rank: int = 0,
    tp_size: int = 1,
    attn_backend: AttentionBackend | None = None,
    max_model_len: int | None = None,
) -> nn.Module:
    """Build the decoder for `hf_config` directly on `device` in `dtype` and load its shard.

    Parameters are created empty where they will live (no random init, no CPU copy of a GPU
    model), then each checkpoint tensor is sliced and copied in; the RoPE cache stays fp32.
    """
    cls = get_model_class(hf_config)
    with torch.device(device), _default_dtype(dtype):
        model = cls(
            text_config(hf_config),
            tp_rank=tp_rank,
            tp_size=tp_size,
            attn_backend=attn_backend,
            max_model_len=max_model_len,
        )
    keep = lambda name: model.hf_to_mmserve_name(name) is not None  # noqa: E731
    model.load_weights(iter_safetensors(model_dir, keep, lazy=tp_size > 1))
    return model.eval()
