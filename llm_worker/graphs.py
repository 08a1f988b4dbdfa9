"""CUDA-graph capture and replay of decode steps.

A decode step of a 7B model is ~300 kernel launches; launched eagerly from Python each costs
40-70 us of host time, so below batch 64 the GPU waits on the host (15 ms/step against a 3 ms
roofline). A graph replays them all with one launch.

One graph per (batch size, split-KV count): sizes from `capture_sizes(max_num_seqs)`, split
counts the powers of two up to what the attention heuristic gives that size at max_model_len (so
small batches get 1, 2, 4, 8, 16 and large ones just 1). A step of n decode rows replays the
smallest captured size >= n, its extra rows padded (`InputBatch.pad_to`: no KV write, one key in
the null block), at the largest captured split count <= the heuristic's for its longest context:
a 128-token context does not pay for 16 mostly empty splits and their merge. A graph holds the forward *and* the LM head, reading the input batch's fixed
device buffers; its logits live in the graphs' shared memory pool and are valid until the next
replay. Only uniform decode batches replay (one token per row, no media splice); prefill and
mixed steps run eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from llm_worker.attention import AttentionMetadata
from llm_worker.input_batch import InputBatch
from mmkernels.cuda_graphs import capture_graph

log = logging.getLogger(__name__)

# (input_ids [n], positions [n] or [n, rows], metadata) -> logits [n, vocab] float32
DecodeFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]
# (num_seqs, max_seq_len) -> split-KV count the attention kernel wants for that decode batch
SplitsFn = Callable[[int, int], int]


def capture_sizes(max_num_seqs: int, max_num_tokens: int | None = None) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_num_seqs (and max_num_seqs itself): padding
    costs at most 7 rows, and a decode step's weight read does not grow with rows anyway. No
    decode batch outgrows the step's token budget, nor do the input buffers, so neither does a
    graph (a 256-row graph over 32-token buffers held 32 queries for 256 sequences)."""
    if max_num_tokens is not None:
        max_num_seqs = min(max_num_seqs, max_num_tokens)
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs]
    sizes += list(range(8, max_num_seqs, 8)) + [max_num_seqs]
    return sorted(set(sizes))


def split_buckets(most: int) -> list[int]:
    """1, 2, 4, ... up to `most`."""
    return [1 << i for i in range(most.bit_length()) if 1 << i <= most]


class DecodeGraphs:
    def __init__(self, bufs: InputBatch, decode: DecodeFn,
                 metadata: Callable[[int, int], AttentionMetadata], sizes: list[int],
                 splits: SplitsFn, max_seq_len: int):
        self.bufs = bufs
        self.sizes = sorted(sizes)
        self._decode = decode
        self._metadata = metadata  # (num_seqs, num_splits) -> the graph's metadata
        self._splits = splits
        self.buckets = {s: split_buckets(splits(s, max_seq_len)) for s in self.sizes}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self.num_replays = 0  # steps served by a graph (tests and benches read it)
        self.last: tuple[int, int] | None = None  # (size, splits) of the latest replay

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def padded_size(self, num_seqs: int) -> int | None:
        """The captured size a batch of num_seqs rows replays at (None: too large)."""
        for s in self.sizes:
            if s >= num_seqs:
                return s
        return None

    def num_splits(self, size: int, max_seq_len: int) -> int:
        """The captured split count a padded batch with this longest context replays at."""
        want = self._splits(size, max_seq_len)
        return max(b for b in self.buckets[size] if b <= want)

    def _dummy_inputs(self, size: int) -> None:
        """Valid inputs for capture: dummy rows as padding makes them (they write no KV)."""
        b = self.bufs
        b.input_ids[:size].zero_()
        b.positions[:size].zero_()
        b.slot_mapping[:size].fill_(-1)
        b.query_start_loc[: size + 1].copy_(torch.arange(size + 1, dtype=torch.int32))
        b.seq_lens[:size].fill_(1)
        b.block_tables[:size].zero_()

    @torch.inference_mode()
    def capture(self, pool) -> float:
        """Capture every size, largest first so the smaller graphs reuse its memory pool; returns
        the seconds it took."""
        t0 = time.perf_counter()
        for size in sorted(self.sizes, reverse=True):
            for splits in sorted(self.buckets[size], reverse=True):
                self._dummy_inputs(size)
                meta = self._metadata(size, splits)
                ids, pos = self.bufs.input_ids[:size], self.bufs.positions[:size]
                self.graphs[size, splits], self.logits[size, splits] = capture_graph(
                    lambda ids=ids, pos=pos, meta=meta: self._decode(ids, pos, meta), pool)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        log.info("captured %d decode graphs (sizes %s) in %.1f s", len(self.graphs),
                 ",".join(f"{s}x{len(self.buckets[s])}" for s in self.sizes), elapsed)
        return elapsed

    def replay(self, size: int, splits: int) -> torch.Tensor:
        """Run the captured step of `size` rows over the uploaded buffers; [size, vocab] logits."""
        self.graphs[size, splits].replay()
        self.num_replays += 1
        self.last = (size, splits)
        return self.logits[size, splits]


# Token counts of the captured mixed steps. An eager 7B step costs ~16 ms of Python launches on
# the H200 host, more than the GPU work of a step of a few hundred tokens (a 632-token image
# prefill measured ~30 ms eager); a graph pays only its padding (< 128 tokens, ~2.5 ms of GEMMs
# past 256). Past 1024 tokens the GPU work dominates and a padded bucket would cost more than the
# launches it hides, so larger steps run eagerly.
MIXED_SIZES = (16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024)


class MixedGraphs:
    """Graphs for the steps that are not uniform decode (prefill chunks, prefill + decode,
    media splices) of at most 1024 tokens: one per token count in MIXED_SIZES, every sequence
    slot in use (`InputBatch.pad_mixed`), the input embeddings read from a fixed buffer (the
    lookup and the media splices run before the replay), logits for every sequence slot."""

    def __init__(self, bufs: InputBatch, forward: Callable[[int], torch.Tensor],
                 max_tokens: int):
        self.bufs = bufs
        self.sizes = [s for s in MIXED_SIZES if s <= max_tokens]
        self._forward = forward  # num_tokens -> logits [num_seq_slots, vocab], from the buffers
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.num_replays = 0

    def padded_size(self, num_tokens: int) -> int | None:
        return next((s for s in self.sizes if s >= num_tokens), None)

    def _dummy_inputs(self, num_tokens: int) -> None:
        """Every slot empty but the spare last one, which owns all tokens (no KV write)."""
        b, slots = self.bufs, self.bufs.num_seq_slots
        b.input_ids[:num_tokens].zero_()
        b.positions[:num_tokens].zero_()
        b.slot_mapping[:num_tokens].fill_(-1)
        b.query_start_loc[:slots].zero_()
        b.query_start_loc[slots].fill_(num_tokens)
        b.seq_lens[:slots].zero_()
        b.seq_lens[slots - 1].fill_(num_tokens)
        b.sample_idx[:slots].zero_()

    @torch.inference_mode()
    def capture(self, pool) -> float:
        t0 = time.perf_counter()
        for size in sorted(self.sizes, reverse=True):
            self._dummy_inputs(size)
            self.graphs[size], self.logits[size] = capture_graph(
                lambda size=size: self._forward(size), pool)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        log.info("captured %d mixed-step graphs (tokens %s) in %.1f s", len(self.graphs),
                 ",".join(map(str, self.sizes)), elapsed)
        return elapsed

    def replay(self, num_tokens: int) -> torch.Tensor:
        """[num_seq_slots, vocab] logits: row i for the i-th sampled row of the step."""
        self.graphs[num_tokens].replay()
        self.num_replays += 1
        return self.logits[num_tokens]
