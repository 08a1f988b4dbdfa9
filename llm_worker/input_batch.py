"""Input-batch preparation: a step's token ids, positions, KV slots and block tables.

Everything is written into persistent buffers: host staging (pinned on CUDA, so the uploads are
asynchronous) and device tensors at fixed addresses, which is what CUDA-graph replay reads. A step
allocates no device tensor and never waits on the device; the only host work is filling numpy
views from each request's state. The staging is double-buffered: with asynchronous scheduling a
step is prepared while the previous one may not have run its upload yet, so consecutive steps
stage into alternate buffers (the one before that has finished: its result was read).

A token sampled by the step still in flight is not known on the host: its row takes a zero and
is listed in `StepBatch.pending`, and the runner fills it on the device from that step's output.

Positions are 1-D (token i at position i) unless the model has a `PositionScheme` (M-RoPE: three
per token); then the positions buffer is [max_num_tokens, rows], token-major, so that a step's
tokens are `positions[:num_tokens]` either way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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
    # Sampled by steps in flight, not yet appended to token_ids (asynchronous scheduling).
    num_pending: int = 0
    # Repetition / presence / frequency penalties: the sampler reads the token history.
    penalized: bool = False
    # Set by a model's PositionScheme: the prompt's positions, int64 [num_prompt_tokens, rows],
    # and the shift of every later token (token i at i + position_delta in each row).
    prompt_positions: np.ndarray | None = None
    position_delta: int = 0

    def add_blocks(self, new_block_ids: list[int]) -> None:
        if new_block_ids:
            self.block_ids = np.concatenate(
                [self.block_ids, np.asarray(new_block_ids, dtype=np.int32)])


class PositionScheme(ABC):
    """A model's token positions when they are not "token i at position i" (M-RoPE). The
    prompt's are computed once, from its media items, when the runner adds the request (again
    on resume, so preemption cannot shift them); every later token is text at i + delta."""

    rows: int  # positions per token

    @abstractmethod
    def prompt_positions(self, num_prompt_tokens: int,
                         mm_items: list[MMItem]) -> tuple[np.ndarray, int]:
        """(int64 [num_prompt_tokens, rows], delta of the tokens after the prompt)."""

    def __call__(self, st: RequestState, start: int, count: int) -> np.ndarray:
        """int64 [count, rows]: the positions of the request's tokens [start, start + count)."""
        prompt = st.prompt_positions
        cut = min(max(len(prompt) - start, 0), count)  # how many of them are prompt tokens
        out = np.empty((count, self.rows), dtype=np.int64)
        out[:cut] = prompt[start : start + cut]
        out[cut:] = (np.arange(start + cut, start + count) + st.position_delta)[:, None]
        return out


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
    # (token index, request id) of input tokens sampled by the step in flight: zeros in the
    # staged ids until the runner copies them from that step's device output.
    pending: list[tuple[int, str]] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_uniform_decode(self) -> bool:
        """Every row computes exactly one token and none takes media: graph-replayable."""
        return self.num_tokens == self.num_seqs and not self.splices


class InputBatch:
    def __init__(self, *, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int,
                 block_size: int, device: torch.device, position_rows: int = 1):
        self.block_size = block_size
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.non_blocking = device.type == "cuda"
        pin = self.non_blocking
        # One spare sequence row beyond max_num_seqs: a padded mixed step gives its padding
        # tokens to it (`pad_mixed`). Its block-table row stays zero: the null block.
        self.num_seq_slots = max_num_seqs + 1
        # Its keys (one per padding token, up to a whole step) must fit in one row, also when
        # max_model_len is shorter than a step: rows are at least a step's blocks wide.
        t, s = max_num_tokens, self.num_seq_slots
        b = max(max_blocks_per_seq, -(-max_num_tokens // block_size))
        self.max_blocks_per_seq = b
        # Two buffers (int64, int32) mirrored on the device: a step is two copies, not seven.
        # Every field is a fixed view into one of them (what a captured graph reads).
        p = t * position_rows
        n64, n32 = 2 * t + p + s, 2 * s + 1 + s * b
        self._layout = (t, p, s, b, (t,) if position_rows == 1 else (t, position_rows))
        self._staging = [(torch.zeros(n64, dtype=torch.int64, pin_memory=pin),
                          torch.zeros(n32, dtype=torch.int32, pin_memory=pin))
                         for _ in range(2)]
        self._dev64 = torch.zeros(n64, dtype=torch.int64, device=device)
        self._dev32 = torch.zeros(n32, dtype=torch.int32, device=device)
        (self.input_ids, self.positions, self.slot_mapping, self.sample_idx,
         self.query_start_loc, self.seq_lens, self.block_tables) = self._fields(self._dev64,
                                                                                self._dev32)
        self._stage = 1
        self._flip()

    def _fields(self, b64: torch.Tensor, b32: torch.Tensor) -> tuple[torch.Tensor, ...]:
        t, p, s, b, pos_shape = self._layout
        return (b64[:t], b64[t : t + p].view(pos_shape), b64[t + p : 2 * t + p],  # ids, pos,
                b64[2 * t + p :],  # slots; token index of each sampled row's last token
                b32[: s + 1], b32[s + 1 : 2 * s + 1],  # query_start_loc, seq_lens
                b32[2 * s + 1 :].view(s, b))  # block tables

    def _flip(self) -> None:
        """Stage the next step in the other host buffer (see the module docstring)."""
        self._stage = 1 - self._stage
        self._host64, self._host32 = self._staging[self._stage]
        (self.cpu_ids, self.cpu_pos, self.cpu_slots, self.cpu_sample_idx, self.cpu_qstart,
         self.cpu_seqlens, self.cpu_blocks) = self._fields(self._host64, self._host32)
        self._ids, self._pos = self.cpu_ids.numpy(), self.cpu_pos.numpy()
        self._slots, self._blocks = self.cpu_slots.numpy(), self.cpu_blocks.numpy()
        self._qstart, self._seqlens = self.cpu_qstart.numpy(), self.cpu_seqlens.numpy()
        self._sample_idx = self.cpu_sample_idx.numpy()

    def prepare(self, requests: dict[str, RequestState], num_scheduled: dict[str, int],
                positions: PositionScheme | None = None) -> StepBatch:
        """Fill the host staging buffers for this step's rows. Positions follow the model's
        scheme; None is plain 1-D RoPE, token i at position i."""
        self._flip()
        ids_np, pos_np, slots_np, blocks_np = self._ids, self._pos, self._slots, self._blocks
        bs = self.block_size
        qstart, seqlens, sample_rows = [0], [], []
        splices: list[tuple[int, str, int, int]] = []
        pending: list[tuple[int, str]] = []
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
            known = len(st.token_ids)
            if n == 1:  # decode: scalar writes beat building arrays
                if start < known:
                    ids_np[t] = st.token_ids[start]
                else:  # sampled by the step in flight
                    ids_np[t] = 0
                    pending.append((t, rid))
                pos_np[t] = start if positions is None else positions(st, start, 1)[0]
                slots_np[t] = int(table[start // bs]) * bs + start % bs
            else:
                if end > known:  # a pending token is only ever a sequence's next single input
                    raise RuntimeError(f"{rid}: a {n}-token chunk reaches a pending token")
                ids_np[t : t + n] = st.token_ids[start:end]
                kv_pos = np.arange(start, end)
                pos_np[t : t + n] = kv_pos if positions is None else positions(st, start, n)
                slots_np[t : t + n] = table[kv_pos // bs].astype(np.int64) * bs + kv_pos % bs
            blocks_np[row, : len(table)] = table
            t += n
            qstart.append(t)
            seqlens.append(end)
            if end == known + st.num_pending:  # the prompt (or chunk chain) is complete: sample
                sample_rows.append(row)
        return StepBatch(list(num_scheduled), t, qstart, seqlens, sample_rows, splices,
                         pending=pending)

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

    def pad_mixed(self, batch: StepBatch, num_tokens: int) -> None:
        """Pad any step to a captured mixed-graph shape: `num_tokens` tokens and every sequence
        slot. Rows after the real ones are empty (no query), except the spare last slot, which
        owns the padding tokens: no KV write (slot -1), keys read from the null block. Sample
        indices past the real ones point at token 0 (their logits are dropped)."""
        n, t, slots = batch.num_seqs, batch.num_tokens, self.num_seq_slots
        self._ids[t:num_tokens] = 0
        self._pos[t:num_tokens] = 0
        self._slots[t:num_tokens] = -1
        self._sample_idx[len(batch.sample_rows) : slots] = 0
        batch.query_start_loc.extend([t] * (slots - 1 - n) + [num_tokens])
        batch.seq_lens.extend([0] * (slots - 1 - n) + [num_tokens - t])
        batch.num_tokens = num_tokens
        batch.padded_num_seqs = slots

    def upload(self, batch: StepBatch) -> None:
        """Copy the staged step to the device buffers: two copies, async on CUDA (pinned)."""
        s = batch.num_seqs
        self._qstart[: s + 1] = batch.query_start_loc
        self._seqlens[:s] = batch.seq_lens
        for i, row in enumerate(batch.sample_rows):
            self._sample_idx[i] = batch.query_start_loc[row + 1] - 1
        # int32: query_start_loc, seq_lens and the block-table rows in use (a contiguous prefix).
        n32 = 2 * self.num_seq_slots + 1 + s * self.max_blocks_per_seq
        self._dev64.copy_(self._host64, non_blocking=self.non_blocking)
        self._dev32[:n32].copy_(self._host32[:n32], non_blocking=self.non_blocking)
