"""Paged attention: the per-step metadata and the pluggable backend that consumes it."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

import mmkernels
from llm_worker.input_batch import InputBatch, StepBatch
from mmkernels import reference


@dataclass
class AttentionMetadata:
    """What every attention layer of one step needs; built once per step by the runner."""

    # [num_tokens] int64: block_id * block_size + offset, where each new token's K/V is written
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    # [num_seqs] int32: context length of each seq AFTER this step (cached + new)
    seq_lens: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32 (padded)
    query_start_loc_cpu: list[int]  # query_start_loc as a python list, for the reference loop
    seq_lens_cpu: list[int]  # seq_lens as a python list
    max_query_len: int  # 1 is a promise: a decode batch, one query per sequence (row i = seq i)
    max_seq_len: int
    # Split-KV ranges for the Triton kernel; None = its heuristic. A captured graph fixes it.
    num_splits: int | None = None


class AttentionBackend(ABC):
    """Writes a step's new K/V into the paged cache, then attends over it.

    One instance is shared by every layer; per-layer state lives in the kv_cache tensor passed in,
    whose layout is [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim].
    """

    def build_metadata(self, bufs: InputBatch, batch: StepBatch) -> AttentionMetadata:
        """The step's metadata as views of the input batch's device buffers (uploaded already)."""
        s = batch.num_seqs
        qsl = batch.query_start_loc
        return AttentionMetadata(
            slot_mapping=bufs.slot_mapping[: batch.num_tokens],
            query_start_loc=bufs.query_start_loc[: s + 1],
            seq_lens=bufs.seq_lens[:s],
            block_tables=bufs.block_tables[:s, : -(-max(batch.seq_lens) // bufs.block_size)],
            query_start_loc_cpu=qsl,
            seq_lens_cpu=batch.seq_lens,
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_seq_len=max(batch.seq_lens),
        )

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Causal attention of each sequence's new tokens over its whole cached context.

        The new tokens are the last q_len of each sequence's seq_len tokens; their K/V are
        written at `meta.slot_mapping` before attending, so they see themselves. With ``rope``
        (a `RotaryEmbedding.step`: positions and cos | sin table) q and k arrive unrotated and
        are rotated on the way in: the Triton backend does it in the K/V write's kernel.
        """


class TorchAttentionBackend(AttentionBackend):
    """The pure-torch reference: SDPA over each sequence's gathered blocks (CPU serving)."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if rope is None:
            reference.write_kv_cache(key, value, kv_cache, meta.slot_mapping)
        else:
            query = reference.rope_write_kv(query, key, value, *rope, kv_cache, meta.slot_mapping)
        return reference.paged_attention(query, kv_cache, meta, scale)


class TritonAttentionBackend(AttentionBackend):
    """The Triton paged-attention kernel (CUDA serving), after the dispatched K/V writer (with
    RoPE fused into it when the layer hands the rotation over). A decode step (max_query_len
    == 1) runs `decode_attention` instead, which does all three in one kernel
    (MMSERVE_REFERENCE_OPS=decode_attention keeps the writer and the attention apart).

    Reads only the device fields of the metadata, so a decode step can be CUDA-graph captured.
    Implementations are resolved on the first forward, when the device is known, so building the
    backend loads neither Triton nor a kernel module.
    """

    def __init__(self) -> None:
        self._write_kv: Callable[..., None] | None = None
        self._rope_write_kv: Callable[..., torch.Tensor] | None = None
        self._attend: Callable[..., torch.Tensor] | None = None
        self._decode: Callable[..., torch.Tensor] | None = None  # None: write, then attend

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if self._write_kv is None or self._rope_write_kv is None or self._attend is None:
            self._write_kv = mmkernels.get("write_kv_cache", kv_cache.device)
            self._rope_write_kv = mmkernels.get("rope_write_kv", kv_cache.device)
            # Always the Triton kernel: choosing this backend is choosing it (CPU: interpreter).
            module = importlib.import_module(mmkernels.TRITON["paged_attention"].split(":")[0])
            if mmkernels.kept_on_reference("decode_attention"):  # the separate writer's path
                self._attend = module.varlen_attention
            else:
                self._attend, self._decode = module.paged_attention, module.decode_attention
        if meta.max_query_len == 1 and self._decode is not None:
            # A decode step: one kernel rotates, writes the new K/V and attends.
            return self._decode(query, key, value, kv_cache, meta, scale, meta.slot_mapping,
                                rope, num_splits=meta.num_splits)
        if rope is None:
            self._write_kv(key, value, kv_cache, meta.slot_mapping)
        else:
            query = self._rope_write_kv(query, key, value, *rope, kv_cache, meta.slot_mapping)
        return self._attend(query, kv_cache, meta, scale, num_splits=meta.num_splits)

    @staticmethod
    def decode_splits(device: torch.device, num_seqs: int, num_kv_heads: int,
                      max_seq_len: int) -> int:
        """The kernel's split-KV count for a decode batch (Triton loads with the backend)."""
        from mmkernels.triton_attention import decode_splits

        return decode_splits(device, num_seqs, num_kv_heads, max_seq_len)

    def graph_metadata(self, bufs: InputBatch, num_tokens: int, num_seqs: int,
                       max_query_len: int, max_seq_len: int, num_splits: int
                       ) -> AttentionMetadata:
        """Metadata of a captured step over the first `num_tokens` tokens and `num_seqs` rows of
        the buffers: whole-width block tables, the length hints fixed at capture (they choose
        the kernel's tiles, never its bounds: the kernel reads the true lengths on the device;
        max_query_len 1 only for decode graphs, which replay only uniform decode batches),
        and a fixed split count. One graph serves every context up to max_seq_len."""
        return AttentionMetadata(
            slot_mapping=bufs.slot_mapping[:num_tokens],
            query_start_loc=bufs.query_start_loc[: num_seqs + 1],
            seq_lens=bufs.seq_lens[:num_seqs],
            block_tables=bufs.block_tables[:num_seqs],
            query_start_loc_cpu=[],  # never read by the kernel: it must not be (graph replay)
            seq_lens_cpu=[],
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            num_splits=num_splits,
        )


ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    "torch": TorchAttentionBackend,
    "triton": TritonAttentionBackend,
}
