"""Triton paged attention: one varlen kernel for chunked prefill and decode over the block table.

Same signature and semantics as `mmkernels.reference.paged_attention`, but it reads only device
metadata (query_start_loc, seq_lens, block_tables) plus the ints max_query_len / max_seq_len, and
those two ints are tuning hints, never bounds (except max_query_len == 1, below): any batch
whose true lengths exceed them is still computed correctly. No host list, no host sync, no per-sequence loop, so a CUDA graph can hold it.

Layout of the work:
- grid axis 0 walks "query tiles": sequence i owns tiles qsl[i] // BLOCK_Q + i onwards (at most
  q_len // BLOCK_Q + 1 of them), so num_tokens // BLOCK_Q + num_seqs programs cover any batch and
  each finds its sequence by binary search over query_start_loc (vLLM's unified-attention trick).
- grid axis 1 is the kv head; the GROUP q heads that share it are packed into the tile's rows
  (row r = query token r // GROUP_P, head r % GROUP_P), so K/V are read once per group.
- grid axis 2 splits the context into NUM_SPLITS ranges (flash-decoding); with more than one, each
  program writes a normalized partial and its log-sum-exp, and `_reduce_splits_kernel` merges them.

A decode batch (max_query_len == 1, a promise: one query per sequence) runs
`mmkernels.triton_decode.decode_attention` instead; the split-KV pieces both share live in
`mmkernels.triton_splits`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mmkernels.triton_decode import DecodeConfig, decode_attention, decode_config
from mmkernels.triton_splits import (
    MAX_SPLITS,
    MIN_TOKENS_PER_SPLIT,
    PagedAttentionMeta,
    decode_splits,
    merge_splits,
    num_kv_splits,
    sm_count,
    split_outputs,
    store_output,
)


class TileConfig(NamedTuple):
    block_m: int  # tile rows: BLOCK_Q query tokens x GROUP_P q heads
    block_n: int  # KV positions per inner-loop step (independent of the cache block size)
    num_warps: int
    num_stages: int


def tile_config(
    max_query_len: int, group_p: int, head_dim_p: int, elem_bytes: int, on_gpu: bool,
    num_tokens: int = 0, num_kv_heads: int = 1, num_sms: int = 0,
) -> TileConfig:
    """Tile sizes and warps for a batch shape (rows always hold at least one whole GQA group)."""
    if not on_gpu:
        # The interpreter runs tiles as numpy arrays: small tiles keep it fast and make tiny test
        # shapes cross query-tile, KV-tile and cache-block boundaries.
        return TileConfig(max(16, group_p), 16, 1, 1)
    if max_query_len == 1:
        # Decode is bandwidth-bound: 16 rows is tl.dot's minimum M; 64 KV positions per step keep
        # 16 KB (bf16, d=128) of K in flight per load.
        return TileConfig(max(16, group_p), 64, 4, 2)
    big_tiles = (num_tokens // max(128 // group_p, 1)) * num_kv_heads
    if max_query_len >= 512 and head_dim_p <= 128 and elem_bytes <= 2 and big_tiles >= 2 * num_sms:
        # Long prefill chunks are compute-bound: 128x128 tiles on 8 warps measured best on an H200
        # (268 TFLOP/s at 4 x 2048 tokens, d=128, vs 225 for 128x64 and 258 for 64x64). In fp32
        # their K/V stages outgrow shared memory. Only when they still give two waves of
        # programs: one 632-token prompt makes 5 x 32 of them for 132 SMs, and its longest
        # program (the last query tile, 5 KV tiles of 128) sets the kernel's time.
        return TileConfig(max(128, group_p), 128, 8, 2)
    # Short chunks: 64x64 on 4 warps with a 3-stage pipeline gives twice as many programs
    # (61 vs 53 TFLOP/s at 64 x 128 tokens).
    return TileConfig(max(64, group_p), 64, 4, 3)


@triton.jit
def _find_seq(query_start_loc_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    """The largest sequence i whose first query tile (qsl[i] // BLOCK_Q + i) is <= pid."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tiles(
    acc, l_i, m_i,  # [M, D_P], [M], [M] fp32 online-softmax state
    q, q_pos,  # [M, D_P], [M] absolute positions
    k_cache_ptr, v_cache_ptr, table_row, kv_head,
    tile_lo, tile_hi, kv_end,
    offs_d, d_ok, scale_log2,
    stride_cb, stride_cs, stride_ch,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FULL_D: tl.constexpr,  # head_dim is a power of two: no column mask
    MASKED: tl.constexpr,  # tiles that hold the causal diagonal or run past kv_end
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold KV tiles [tile_lo, tile_hi) into the running softmax of one query tile."""
    for tile in range(tile_lo, tile_hi):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] absolute KV positions
        n_ok = offs_n < kv_end
        # Each position finds its own cache block, so a tile may span blocks or share one.
        if MASKED:
            block = tl.load(table_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0)
        else:
            block = tl.load(table_row + offs_n // BLOCK_SIZE)
        slot = block.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs
        ptrs = slot[:, None] + kv_head * stride_ch + offs_d[None, :]  # [BLOCK_N, D_P]
        if MASKED or not FULL_D:
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_cache_ptr + ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + ptrs, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_cache_ptr + ptrs)
            v = tl.load(v_cache_ptr + ptrs)
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [M, N] fp32
        if MASKED:
            visible = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen nothing yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])  # [M, N]
        alpha = tl.exp2(m_i - m_ref)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _paged_attention_kernel(
    out_ptr,  # [T, Hq, D] (one split) or fp32 partials [T, Hq, NUM_SPLITS, D]
    lse_ptr,  # fp32 [T, Hq, NUM_SPLITS] log2-sum-exp of each partial (unused with one split)
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    scale_log2,  # softmax scale * log2(e): the softmax runs in base 2 (exp2 is one instruction)
    num_seqs,
    stride_qt, stride_qh,
    stride_cb, stride_cs, stride_ch,
    stride_bt,
    stride_ot, stride_oh, stride_os,
    stride_lt, stride_lh,
    GROUP: tl.constexpr,  # q heads per kv head
    GROUP_P: tl.constexpr,  # GROUP rounded up to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,  # HEAD_DIM rounded up to a power of two (80 -> 128, masked)
    BLOCK_SIZE: tl.constexpr,  # cache block size
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no silent tf32), else "tf32"
    DOT_FP32: tl.constexpr,  # upcast dot operands: the interpreter multiplies bf16 as raw bits
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_P
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_seq(query_start_loc_ptr, pid, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_end = tl.load(query_start_loc_ptr + seq + 1)
    q_len = q_end - q_start
    # The sequence owns tiles q_start // BLOCK_Q + seq .. q_end // BLOCK_Q + seq and runs them
    # last query tile first: causal tiles grow with their index, and the longest ones should
    # start in the first wave, not trail the last.
    q_tile = q_end // BLOCK_Q + seq - pid
    if q_tile * BLOCK_Q >= q_len:  # the spare tiles of the over-allocated grid
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # tokens cached before this step's queries

    offs_m = tl.arange(0, BLOCK_M)
    q_row = q_tile * BLOCK_Q + offs_m // GROUP_P  # [BLOCK_M] query index within the sequence
    head_in_group = offs_m % GROUP_P
    q_head = kv_head * GROUP + head_in_group  # [BLOCK_M]
    row_ok = (q_row < q_len) & (head_in_group < GROUP)
    q_pos = ctx_len + q_row  # [BLOCK_M] absolute position: sees keys at positions <= it
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_ok = offs_d < HEAD_DIM
    token = (q_start + q_row).to(tl.int64)  # [BLOCK_M] row of query / out
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [BLOCK_M, HEAD_DIM_P]
    if DOT_FP32:
        q = q.to(tl.float32)

    # Keys this tile may see end at its last row's position (causal); this split takes its share.
    kv_end = tl.minimum(seq_len, ctx_len + tl.minimum((q_tile + 1) * BLOCK_Q, q_len))
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    table_row = block_tables_ptr + seq * stride_bt
    # Tiles wholly at or before the tile's first query position need no mask: only the diagonal
    # ones (and the partial last tile) pay for it, as in FlashAttention's causal loop.
    full_hi = tl.maximum(tl.minimum(tile_hi, (ctx_len + q_tile * BLOCK_Q + 1) // BLOCK_N), tile_lo)
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, table_row, kv_head, tile_lo, full_hi,
        kv_end, offs_d, d_ok, scale_log2, stride_cb, stride_cs, stride_ch,
        BLOCK_N, BLOCK_SIZE, HEAD_DIM == HEAD_DIM_P, False, DOT_FP32, DOT_PRECISION,
    )
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, table_row, kv_head, full_hi, tile_hi,
        kv_end, offs_d, d_ok, scale_log2, stride_cb, stride_cs, stride_ch,
        BLOCK_N, BLOCK_SIZE, HEAD_DIM == HEAD_DIM_P, True, DOT_FP32, DOT_PRECISION,
    )

    store_output(out_ptr, lse_ptr, acc, l_i, m_i, token[:, None], token, q_head, row_ok, offs_d,
                 d_ok, split, stride_ot, stride_oh, stride_os, stride_lt, stride_lh, NUM_SPLITS)


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    meta: PagedAttentionMeta,
    scale: float,
    *,
    num_splits: int | None = None,  # None: `num_kv_splits` heuristic; tests and benches force it
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim], e.g. a graph's buffer
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Varlen causal attention over the paged cache, as `mmkernels.reference.paged_attention`.
    A decode batch (max_query_len == 1) runs `decode_attention` over the cache as it is."""
    if meta.max_query_len == 1:
        return decode_attention(query, None, None, kv_cache, meta, scale, num_splits=num_splits,
                                out=out)
    return varlen_attention(query, kv_cache, meta, scale, num_splits=num_splits, out=out)


def varlen_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: PagedAttentionMeta,
    scale: float,
    *,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`paged_attention` through the varlen kernel whatever the batch (decode included: the
    path with a separate K/V writer, MMSERVE_REFERENCE_OPS=decode_attention)."""
    num_tokens, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    num_seqs = meta.seq_lens.shape[0]
    assert num_heads % num_kv_heads == 0, "GQA needs num_heads to be a multiple of num_kv_heads"
    assert query.stride(-1) == 1 and kv_cache.stride(-1) == 1
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0 or num_seqs == 0:
        return out
    on_gpu = query.device.type == "cuda"
    if num_splits is None:  # prefill tiles already give many programs
        num_splits = (1 if meta.max_query_len > 1 else
                      decode_splits(query.device, num_seqs, num_kv_heads, meta.max_seq_len))
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    head_dim_p = triton.next_power_of_2(head_dim)
    cfg = tile_config(meta.max_query_len, group_p, head_dim_p, query.element_size(), on_gpu,
                      num_tokens, num_kv_heads, sm_count(query.device.index or 0) if on_gpu else 0)
    block_q = cfg.block_m // group_p
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, num_splits)
    target, lse, stride_os, stride_lt, stride_lh = split_outputs(query, out, num_splits)
    k_cache, v_cache = kv_cache[0], kv_cache[1]  # [num_blocks, block_size, Hkv, D] views
    _paged_attention_kernel[grid](
        target, lse, query, k_cache, v_cache,
        meta.block_tables, meta.query_start_loc, meta.seq_lens,
        scale * math.log2(math.e), num_seqs,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0),
        target.stride(0), target.stride(1), stride_os,
        stride_lt, stride_lh,
        GROUP=group, GROUP_P=group_p, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 or not on_gpu else "tf32",
        DOT_FP32=not on_gpu,  # triton 3.9's interpreter: np.matmul on the uint16 bits of bf16
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    merge_splits(out, target, lse, num_splits)
    return out


__all__ = ["MAX_SPLITS", "MIN_TOKENS_PER_SPLIT", "DecodeConfig", "PagedAttentionMeta",
           "TileConfig", "decode_attention", "decode_config", "decode_splits", "num_kv_splits",
           "paged_attention", "tile_config", "varlen_attention"]
