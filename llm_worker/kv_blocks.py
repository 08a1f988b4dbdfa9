"""Paged KV block manager with prefix caching by chained block hashes.

A request's KV lives in fixed-size blocks listed in ``request.block_ids``. A *full* block whose
KV has been computed is registered under a chained hash of (parent hash, its token ids, the mm
items overlapping it), so a later request with the same prefix reuses it instead of recomputing.
Freed blocks keep their hash until they are reallocated: the free queue doubles as an LRU of
cached-but-unreferenced blocks, evicted least recently freed first.

Block 0 is reserved as the null block: the runner pads block tables (and CUDA-graph batches)
with it, so it is never handed to a request and never counted as usable.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from llm_worker.request import Request
from protocol.hashing import hash_ints

NULL_BLOCK_ID = 0


class ComputedBlocks(NamedTuple):
    """A prefix-cache hit: blocks to share and how many tokens of KV they hold."""

    block_ids: list[int]
    num_tokens: int


class _Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None


def mm_extra(request: Request, start: int, end: int) -> tuple:
    """(key, item offset relative to the block start) for every mm item overlapping the block.

    Placeholder tokens are identical for every image, so without the key two prompts with
    different images would share KV. The relative offset (negative when the item began in an
    earlier block) pins which slice of the item sits where, even if the tokens around it are
    placeholder-like too.
    """
    extra: list = []
    for item in request.mm_items:
        if item.offset >= end:
            break  # sorted by offset
        if item.offset + item.length > start:
            extra.extend((item.key, item.offset - start))
    return tuple(extra)


class KVBlockManager:
    def __init__(
        self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 2:
            raise ValueError("num_blocks must be >= 2 (block 0 is the reserved null block)")
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [_Block(i) for i in range(num_blocks)]
        # Insertion order = LRU order; an OrderedDict gives O(1) pop-front and O(1) removal from
        # the middle (a prefix hit on a freed block takes it back out of the queue).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        # Per request: how many leading blocks were already offered to the cache, so each
        # step only hashes the blocks that became full.
        self._num_registered: dict[str, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # -- sizes --------------------------------------------------------------------------------

    @property
    def num_total_blocks(self) -> int:
        return len(self.blocks) - 1  # without the null block

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (free, or cached but unreferenced)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------

    def _hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """Hashes of the first ``num_blocks`` full blocks, extending the request's memo."""
        hashes = request.block_hashes
        if len(hashes) < num_blocks:
            tokens = request.all_token_ids
            bs = self.block_size
            parent = hashes[-1] if hashes else None
            for i in range(len(hashes), num_blocks):
                s, e = i * bs, (i + 1) * bs
                parent = hash_ints(parent, tuple(tokens[s:e]), mm_extra(request, s, e))
                hashes.append(parent)
        return hashes[:num_blocks]

    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """Longest cached prefix of the request's tokens, in whole blocks.

        Never the whole sequence: the last token is always computed so its logits exist.
        Pure lookup; the hit counters are updated when ``allocate_slots`` takes the blocks, so a
        lookup retried because the cache was full is not counted twice.
        """
        if not self.enable_prefix_caching:
            return ComputedBlocks([], 0)
        max_blocks = (request.num_tokens - 1) // self.block_size
        block_ids: list[int] = []
        for h in self._hashes(request, max_blocks):
            bid = self._cached.get(h)
            if bid is None:
                break
            block_ids.append(bid)
        return ComputedBlocks(block_ids, len(block_ids) * self.block_size)

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that are full of *computed* KV.

        Called after the step that computed them, never at allocation: a block registered at
        allocation could be found by another request while its KV is still unwritten (the owner
        preempted or aborted before the step ran). A request that starts in the same step as
        an identical prefix therefore misses; that is the price of never reading garbage.
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(num_computed_tokens // self.block_size, len(request.block_ids))
        done = self._num_registered.get(request.request_id, 0)
        if num_full <= done:
            return
        hashes = self._hashes(request, num_full)
        for i in range(done, num_full):
            block = self.blocks[request.block_ids[i]]
            # Same content already cached in another block: keep one copy findable; this block
            # simply stays unhashed and is recycled normally when freed.
            if block.block_hash is None and hashes[i] not in self._cached:
                block.block_hash = hashes[i]
                self._cached[hashes[i]] = block.block_id
        self._num_registered[request.request_id] = num_full

    def reset_prefix_cache(self) -> None:
        """Forget every hash (e.g. after weights change). Blocks in use stay allocated."""
        self._cached.clear()
        for block in self.blocks:
            block.block_hash = None
        # Requests' hash memos stay valid (hashes are content-derived); blocks that were
        # registered before the reset are simply not re-registered.

    # -- allocation ---------------------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed: ComputedBlocks | None = None
    ) -> list[int] | None:
        """Make room for ``num_computed_tokens + computed + num_new_tokens`` tokens.

        ``computed`` (first allocation only) is shared, not copied: its blocks get a reference.
        Returns the newly allocated block ids, or None with nothing changed if the free queue
        is too short.
        """
        hit_ids = computed.block_ids if computed else []
        num_hit_tokens = computed.num_tokens if computed else 0
        total = request.num_computed_tokens + num_hit_tokens + num_new_tokens
        num_new = self.num_blocks_for(total) - len(request.block_ids) - len(hit_ids)
        # A hit on a cached-but-free block takes it out of the free queue too.
        num_hit_free = sum(1 for b in hit_ids if self.blocks[b].ref_cnt == 0)
        if max(num_new, 0) + num_hit_free > len(self._free):
            return None

        first = not request.block_ids
        for bid in hit_ids:
            block = self.blocks[bid]
            if block.ref_cnt == 0:
                del self._free[bid]
            block.ref_cnt += 1
        request.block_ids.extend(hit_ids)
        if first and self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_hit_tokens
            self._num_registered[request.request_id] = len(hit_ids)

        new_ids = [self._pop_free() for _ in range(num_new)]
        request.block_ids.extend(new_ids)
        return new_ids

    def _pop_free(self) -> int:
        bid, _ = self._free.popitem(last=False)
        block = self.blocks[bid]
        if block.block_hash is not None:  # evict: its content is about to be overwritten
            if self._cached.get(block.block_hash) == bid:
                del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return bid

    def free(self, request: Request) -> None:
        """Drop the request's references. Tail blocks are queued first so they are evicted
        first: a prefix's head is the part most likely to be shared again."""
        for bid in reversed(request.block_ids):
            block = self.blocks[bid]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[bid] = None
        request.block_ids = []
        self._num_registered.pop(request.request_id, None)
