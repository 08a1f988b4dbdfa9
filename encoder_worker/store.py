"""The encoder's embedding store: finished embeddings by key, least-recently-used out by bytes.

Keys are routed to encoders by rendezvous hashing, so the same image keeps landing here and a
hit skips decode, preprocessing and the tower. Only the encoder's busy loop touches the store,
so it takes no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


def tensor_bytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size()


class EmbeddingStore:
    """LRU by bytes: ``get`` refreshes an entry; ``put`` evicts the oldest until the new one fits.

    An entry larger than the whole budget is not stored (it would evict everything and then not
    fit); the caller still publishes it.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, Any] = OrderedDict()  # key -> CPU tensor [n, hidden]
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        """Membership without touching the LRU order or the counters."""
        return key in self._items

    def get(self, key: str) -> Any | None:
        tensor = self._items.get(key)
        if tensor is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return tensor

    def put(self, key: str, tensor: Any) -> bool:
        """Store ``tensor`` under ``key`` (replacing any old entry); False if it can't fit."""
        self.pop(key)
        size = tensor_bytes(tensor)
        if size > self.max_bytes:
            return False
        while self.bytes + size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= tensor_bytes(old)
            self.evictions += 1
        self._items[key] = tensor
        self.bytes += size
        return True

    def pop(self, key: str) -> Any | None:
        tensor = self._items.pop(key, None)
        if tensor is not None:
            self.bytes -= tensor_bytes(tensor)
        return tensor
