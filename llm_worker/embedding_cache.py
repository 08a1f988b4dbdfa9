"""The decoder's embedding inbox store: media embeddings by key, pinned while a request uses them.

Embeddings arrive from encoders (or the frontend, for user-supplied image_embeds) before or after
the request that needs them. An entry referenced by a live request is never evicted (a reference
may be taken before the entry arrives); unreferenced entries stay as an LRU cache bounded in
bytes, so a repeated image skips even the encoder round trip.

The engine core keeps these (host) tensors and the refcounts; workers hold device copies of just
the keys the running batch needs (SchedulerOutput.embeddings / freed_embeddings).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch


class EmbeddingCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()  # LRU order: oldest first
        self.refs: dict[str, int] = {}
        self.bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> torch.Tensor:
        self.entries.move_to_end(key)
        return self.entries[key]

    def put(self, key: str, tensor: torch.Tensor) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= _nbytes(old)
        self.entries[key] = tensor
        self.bytes += _nbytes(tensor)
        self._evict()

    def ref(self, keys: Iterable[str]) -> None:
        for k in keys:
            self.refs[k] = self.refs.get(k, 0) + 1
            if k in self.entries:
                self.entries.move_to_end(k)

    def unref(self, keys: Iterable[str]) -> list[str]:
        """Drop one reference per key; returns the keys no request uses any more."""
        released = []
        for k in keys:
            n = self.refs.get(k, 0) - 1
            if n > 0:
                self.refs[k] = n
            else:
                self.refs.pop(k, None)
                released.append(k)
        self._evict()
        return released

    def _evict(self) -> None:
        if self.bytes <= self.max_bytes:
            return
        for key in [k for k in self.entries if k not in self.refs]:
            self.bytes -= _nbytes(self.entries.pop(key))
            if self.bytes <= self.max_bytes:
                return


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
