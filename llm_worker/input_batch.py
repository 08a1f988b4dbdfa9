"""Input-batch preparation: a step's token ids, positions, KV slots and block tables.

Everything is written into persistent buffers: host staging (pinned on CUDA, so the uploads are
asynchronous) and device tensors at fixed addresses, which is what CUDA-graph replay reads. A step
allocates no device tensor and never waits on the device; the only host work is filling numpy
views from each request's state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from protocol.messages import MMItem, Sampling


@dataclass
class RequestState:
    """The runner's copy of one request (the scheduler only sends what changed)."""

    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: np.ndarray  # int32 [num_blocks], grown as the scheduler adds blocks
    num_computed_tokens: int
    sampling: Sampling
    mm_items: list[MMItem] = field(default_factory=list)
    generator: torch.Generator | None = None  # set when the request has a seed
    # Token ids kept out of the sample until min_tokens outputs exist (EOS and stop ids).
    min_tokens_block: tuple[int, ...] = ()

    def add_blocks(self, new_block_ids: list[int]) -> None:
        if new_block_ids:
            self.block_ids = np.concatenate(
                [self.block_ids, np.asarray(new_block_ids, dtype=np.int32)])


# (request state, first position, count) -> the positions of those tokens, int64 [count].
PositionRule = Callable[[RequestState, int, int], np.ndarray]


@dataclass
class StepBatch:
    """What one step schedules, in row order (row i = i-th scheduled request)."""

    request_ids: list[str]
    num_tokens: int
    query_start_loc: list[int]  # [num_seqs + 1]
    seq_lens: list[int]  # context length of each row after this step
    sample_rows: list[int]  # rows whose last token yields a sample (prompt or chunks complete)
    # Media embeddings to splice in: (token index, mm key, first item row, count).
    splices: list[tuple[int, str, int, int]]
    padded_num_seqs: int = 0  # set when the batch is padded to a captured graph size

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_uniform_decode(self) -> bool:
        """Every row computes exactly one token and none takes media: graph-replayable."""
        return self.num_tokens == self.num_seqs and not self.splices


class InputBatch:
    def __init__(self, *, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int,
                 block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.non_blocking = device.type == "cuda"
        pin = self.non_blocking
        t, s, b = max_num_tokens, max_num_seqs, max_blocks_per_seq

        def host(*shape, dtype):
            return torch.zeros(*shape, dtype=dtype, pin_memory=pin)

        def dev(*shape, dtype):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.cpu_ids, self.input_ids = host(t, dtype=torch.int64), dev(t, dtype=torch.int64)
        self.cpu_pos, self.positions = host(t, dtype=torch.int64), dev(t, dtype=torch.int64)
        self.cpu_slots, self.slot_mapping = host(t, dtype=torch.int64), dev(t, dtype=torch.int64)
        self.cpu_qstart = host(s + 1, dtype=torch.int32)
        self.query_start_loc = dev(s + 1, dtype=torch.int32)
        self.cpu_seqlens, self.seq_lens = host(s, dtype=torch.int32), dev(s, dtype=torch.int32)
        self.cpu_blocks, self.block_tables = host(s, b, dtype=torch.int32), dev(s, b, dtype=torch.int32)
        # Token index of each sampled row's last token (the rows of hidden that get logits).
        self.cpu_sample_idx = host(s, dtype=torch.int64)
        self.sample_idx = dev(s, dtype=torch.int64)
        self._ids, self._pos = self.cpu_ids.numpy(), self.cpu_pos.numpy()
        self._slots, self._blocks = self.cpu_slots.numpy(), self.cpu_blocks.numpy()
        self._qstart, self._seqlens = self.cpu_qstart.numpy(), self.cpu_seqlens.numpy()

    def prepare(self, requests: dict[str, RequestState], num_scheduled: dict[str, int],
                positions: PositionRule | None = None) -> StepBatch:
        """Fill the host staging buffers for this step's rows. Positions follow the model's rule
        (`model.input_positions`); None is plain 1-D RoPE, token i at position i."""
        ids_np, pos_np, slots_np, blocks_np = self._ids, self._pos, self._slots, self._blocks
        bs = self.block_size
        qstart, seqlens, sample_rows = [0], [], []
        splices: list[tuple[int, str, int, int]] = []
        t = 0
        for row, (rid, n) in enumerate(num_scheduled.items()):
            st = requests[rid]
            start = st.num_computed_tokens
            end = start + n
            for item in st.mm_items:  # placeholder positions computed this step take embeddings
                a, b = max(item.offset, start), min(item.offset + item.length, end)
                if a < b:
                    splices.append((t + a - start, item.key, a - item.offset, b - a))
            table = st.block_ids
            if n == 1:  # decode: scalar writes beat building arrays
                ids_np[t] = st.token_ids[start]
                pos_np[t] = start if positions is None else positions(st, start, 1)[0]
                slots_np[t] = int(table[start // bs]) * bs + start % bs
            else:
                ids_np[t : t + n] = st.token_ids[start:end]
                kv_pos = np.arange(start, end)
                pos_np[t : t + n] = kv_pos if positions is None else positions(st, start, n)
                slots_np[t : t + n] = table[kv_pos // bs].astype(np.int64) * bs + kv_pos % bs
            blocks_np[row, : len(table)] = table
            t += n
            qstart.append(t)
            seqlens.append(end)
            if end == len(st.token_ids):  # the prompt (or chunk chain) is complete: sample
                sample_rows.append(row)
        return StepBatch(list(num_scheduled), t, qstart, seqlens, sample_rows, splices)

    def pad_to(self, batch: StepBatch, size: int) -> None:
        """Pad a uniform-decode batch with dummy rows up to a captured graph size: one token each,
        no KV write (slot -1), one visible key in the null block (seq_len 1)."""
        n = batch.num_seqs
        self._ids[n:size] = 0
        self._pos[n:size] = 0
        self._slots[n:size] = -1
        self._blocks[n:size, 0] = 0
        batch.query_start_loc.extend(range(n + 1, size + 1))
        batch.seq_lens.extend([1] * (size - n))
        batch.num_tokens = size
        batch.padded_num_seqs = size

    def upload(self, batch: StepBatch) -> None:
        """Copy the staged rows to the device buffers (async on CUDA: pinned sources)."""
        t, s = batch.num_tokens, batch.num_seqs
        self._qstart[: s + 1] = batch.query_start_loc
        self._seqlens[:s] = batch.seq_lens
        nb = -(-max(batch.seq_lens) // self.block_size)
        k = len(batch.sample_rows)
        sample_idx = self.cpu_sample_idx.numpy()
        for i, row in enumerate(batch.sample_rows):
            sample_idx[i] = batch.query_start_loc[row + 1] - 1
        nbk = self.non_blocking
        self.input_ids[:t].copy_(self.cpu_ids[:t], non_blocking=nbk)
        self.positions[:t].copy_(self.cpu_pos[:t], non_blocking=nbk)
        self.slot_mapping[:t].copy_(self.cpu_slots[:t], non_blocking=nbk)
        self.query_start_loc[: s + 1].copy_(self.cpu_qstart[: s + 1], non_blocking=nbk)
        self.seq_lens[:s].copy_(self.cpu_seqlens[:s], non_blocking=nbk)
        self.block_tables[:s, :nb].copy_(self.cpu_blocks[:s, :nb], non_blocking=nbk)
        if k:
            self.sample_idx[:k].copy_(self.cpu_sample_idx[:k], non_blocking=nbk)
