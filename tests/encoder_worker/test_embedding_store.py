"""The embedding store evicts least-recently-used entries by bytes."""

from __future__ import annotations

import pytest
import torch

from encoder_worker.store import EmbeddingStore


def emb(rows: int, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(rows, 4, dtype=dtype)  # rows * 16 bytes in fp32


def test_put_get_and_counters():
    store = EmbeddingStore(1000)
    assert store.get("a") is None
    t = emb(2)
    assert store.put("a", t)
    assert store.get("a") is t
    assert "a" in store and "b" not in store
    assert (store.hits, store.misses, store.bytes, len(store)) == (1, 1, 32, 1)


def test_evicts_least_recently_used_until_it_fits():
    store = EmbeddingStore(64)  # four 1-row (16-byte) entries
    for k in "abcd":
        store.put(k, emb(1))
    store.get("a")  # a is now the most recent; b is the oldest
    store.put("e", emb(2))  # needs 32 bytes: evicts b, then c
    assert [k for k in "abcde" if k in store] == ["a", "d", "e"]
    assert store.bytes == 64 and store.evictions == 2


def test_contains_does_not_touch():
    store = EmbeddingStore(32)
    store.put("a", emb(1))
    store.put("b", emb(1))
    assert "a" in store  # no refresh: a stays the oldest
    store.put("c", emb(1))
    assert "a" not in store and "b" in store and store.hits == 0


def test_oversized_item_is_not_stored_and_evicts_nothing():
    store = EmbeddingStore(48)
    store.put("a", emb(1))
    assert not store.put("big", emb(4))
    assert "big" not in store and "a" in store and store.bytes == 16


def test_replacing_a_key_updates_bytes():
    store = EmbeddingStore(1000)
    store.put("a", emb(4))
    store.put("a", emb(1, torch.bfloat16))
    assert store.bytes == 8 and len(store) == 1
    assert store.pop("a") is not None and store.bytes == 0 and len(store) == 0


def test_zero_budget_and_validation():
    store = EmbeddingStore(0)
    assert not store.put("a", emb(1)) and len(store) == 0
    with pytest.raises(ValueError):
        EmbeddingStore(-1)
