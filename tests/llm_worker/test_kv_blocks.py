"""KV block manager: allocation accounting, prefix caching (incl. mm keys), LRU eviction."""

from __future__ import annotations

import itertools

from llm_worker.kv_blocks import KVBlockManager
from llm_worker.request import Request
from protocol.messages import MMItem, Sampling

BS = 16
_ids = itertools.count()


def make_req(tokens: list[int], mm: list[MMItem] | None = None) -> Request:
    return Request(f"r{next(_ids)}", tokens, Sampling(), mm_items=mm)


def admit(kv: KVBlockManager, req: Request) -> list[int]:
    """What the scheduler does for a new request: look up, allocate the rest, run the step."""
    hit = kv.get_computed_blocks(req)
    new = kv.allocate_slots(req, req.num_tokens - hit.num_tokens, hit)
    assert new is not None
    req.num_computed_tokens = req.num_tokens
    kv.cache_full_blocks(req, req.num_computed_tokens)
    return hit.block_ids


def test_allocate_and_free_return_to_baseline():
    kv = KVBlockManager(num_blocks=11, block_size=BS)
    assert kv.num_total_blocks == 10 and kv.num_free_blocks == 10  # block 0 is the null block
    a, b = make_req(list(range(40))), make_req(list(range(100, 117)))
    assert len(kv.allocate_slots(a, 40)) == 3
    assert len(kv.allocate_slots(b, 17)) == 2
    assert kv.num_free_blocks == 5 and 0 not in a.block_ids + b.block_ids
    # Growing by one token inside the last block needs no new block; crossing a boundary does.
    a.num_computed_tokens = 40
    assert kv.allocate_slots(a, 8) == []
    assert len(kv.allocate_slots(a, 9)) == 1
    # Too big: None, and nothing was taken.
    c = make_req(list(range(200, 300)))
    assert kv.allocate_slots(c, 100) is None
    assert kv.num_free_blocks == 4 and c.block_ids == []
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 10 and a.block_ids == [] and kv.usage == 0.0


def test_prefix_hit_on_three_shared_blocks():
    kv = KVBlockManager(num_blocks=20, block_size=BS)
    shared = list(range(48))
    a = make_req(shared + [900, 901])
    admit(kv, a)
    b = make_req(shared + [7, 8, 9, 10])
    hit = kv.get_computed_blocks(b)
    assert hit.block_ids == a.block_ids[:3] and hit.num_tokens == 48
    assert kv.allocate_slots(b, b.num_tokens - 48, hit) is not None
    assert kv.prefix_cache_hits == 48
    assert kv.prefix_cache_queries == a.num_tokens + b.num_tokens
    # A different token inside block 1 breaks the chain from block 1 on.
    c = make_req(shared[:20] + [5] + shared[21:] + [1])
    assert kv.get_computed_blocks(c).num_tokens == 16


def test_blocks_are_registered_only_after_they_are_computed():
    kv = KVBlockManager(num_blocks=20, block_size=BS)
    a = make_req(list(range(50)))
    kv.allocate_slots(a, 50, kv.get_computed_blocks(a))
    b = make_req(list(range(50)))
    assert kv.get_computed_blocks(b).num_tokens == 0  # allocated, not yet computed
    a.num_computed_tokens = 20
    kv.cache_full_blocks(a, 20)
    assert kv.get_computed_blocks(b).num_tokens == 16


def test_mm_key_is_part_of_the_block_hash():
    kv = KVBlockManager(num_blocks=40, block_size=BS)
    placeholder = [5] * 40
    tokens = [1, 2, 3, 4] + placeholder + list(range(60, 80))  # image at [4, 44)

    def with_key(key: str) -> Request:
        return make_req(tokens, [MMItem(key=key, modality="image", offset=4, length=40)])

    admit(kv, with_key("blake3:aaa"))
    assert kv.get_computed_blocks(with_key("blake3:bbb")).num_tokens == 0
    assert kv.get_computed_blocks(with_key("blake3:aaa")).num_tokens == 48
    assert kv.get_computed_blocks(make_req(tokens)).num_tokens == 0  # text-only lookalike
    # An image starting in block 1: block 0 (text only) is shared, block 1 on is not.
    late = [10 + i for i in range(16)] + [5] * 32 + [1]
    admit(kv, make_req(late, [MMItem(key="uuid:x", modality="image", offset=20, length=20)]))
    other = make_req(late, [MMItem(key="uuid:y", modality="image", offset=20, length=20)])
    assert kv.get_computed_blocks(other).num_tokens == 16
    # Same key, same tokens, but the item shifted inside the block: different KV, no sharing.
    same = [5] * 40 + [1]
    admit(kv, make_req(same, [MMItem(key="uuid:z", modality="image", offset=0, length=32)]))
    shifted = make_req(same, [MMItem(key="uuid:z", modality="image", offset=2, length=32)])
    assert kv.get_computed_blocks(shifted).num_tokens == 0


def test_identical_prompt_never_hits_its_last_token():
    kv = KVBlockManager(num_blocks=20, block_size=BS)
    admit(kv, make_req(list(range(48))))
    assert kv.get_computed_blocks(make_req(list(range(48)))).num_tokens == 32
    admit(kv, make_req(list(range(49))))
    assert kv.get_computed_blocks(make_req(list(range(49)))).num_tokens == 48


def test_lru_eviction_and_hit_on_a_cached_free_block():
    kv = KVBlockManager(num_blocks=5, block_size=BS)  # 4 usable blocks
    a, b = make_req(list(range(32)) + [0]), make_req(list(range(100, 132)) + [0])
    # Each uses 2 full blocks + 1 partial: allocate exactly the 2 full ones here.
    for r in (a, b):
        kv.allocate_slots(r, 32)
        r.num_computed_tokens = 32
        kv.cache_full_blocks(r, 32)
    a_blocks, b_blocks = list(a.block_ids), list(b.block_ids)
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 4
    # Least recently freed goes first, and within a request the tail before the head.
    c = make_req(list(range(500, 510)))
    assert kv.allocate_slots(c, 10) == [a_blocks[1]]
    a2 = make_req(list(range(32)) + [0])
    hit = kv.get_computed_blocks(a2)
    assert hit.block_ids == [a_blocks[0]]  # a's tail was evicted, its head is still cached
    assert kv.allocate_slots(a2, 16, hit) == [b_blocks[1]]  # next in LRU order: b's tail
    # The hit took a cached-but-free block back out of the queue without copying it.
    assert a2.block_ids[0] == a_blocks[0] and kv.num_free_blocks == 1
    b2 = make_req(list(range(100, 132)) + [0])
    assert kv.get_computed_blocks(b2).block_ids == [b_blocks[0]]


def test_refcounts_with_two_live_sharers():
    kv = KVBlockManager(num_blocks=10, block_size=BS)
    prompt = list(range(40))
    a = make_req(prompt)
    admit(kv, a)
    b = make_req(prompt + [1])
    assert admit(kv, b) == a.block_ids[:2]
    assert kv.num_free_blocks == 9 - 3 - 1  # b shares 2 blocks and adds one
    kv.free(a)
    assert kv.num_free_blocks == 9 - 3  # a's partial tail is free; the shared blocks are not
    c = make_req(prompt + [2])
    assert kv.get_computed_blocks(c).block_ids == b.block_ids[:2]
    kv.free(b)
    assert kv.num_free_blocks == 9
    assert kv.get_computed_blocks(c).num_tokens == 32  # freed but still findable


def test_prefix_caching_off_and_reset():
    kv = KVBlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    admit(kv, make_req(list(range(40))))
    assert kv.get_computed_blocks(make_req(list(range(40)))).num_tokens == 0
    assert kv.prefix_cache_queries == 0
    kv = KVBlockManager(num_blocks=10, block_size=BS)
    admit(kv, make_req(list(range(40))))
    kv.reset_prefix_cache()
    assert kv.get_computed_blocks(make_req(list(range(40)))).num_tokens == 0
