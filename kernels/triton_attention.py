"""Triton paged attention: one varlen kernel for chunked prefill and decode over the block table.

Same signature and semantics as `kernels.reference.paged_attention`, but it reads only device
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

A decode batch (max_query_len == 1, a promise: every sequence has exactly one query, so sequence
i's token is row i) runs `_decode_kernel` instead: one program per (sequence, kv head, split)
with no search, the next KV tile's block ids loaded before the current tile's K/V, and, in
`decode_attention`, the step's own K/V taken from registers: the kernel rotates q and k (RoPE),
writes k and v into the cache and folds the new key into the softmax itself, so a decode layer
launches one attention kernel instead of a K/V writer and a kernel that reads it back.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Protocol

import torch
import triton
import triton.language as tl


class PagedAttentionMeta(Protocol):
    """The fields of `llm_worker.attention.AttentionMetadata` this kernel reads (device only)."""

    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    max_query_len: int
    max_seq_len: int


class TileConfig(NamedTuple):
    block_m: int  # tile rows: BLOCK_Q query tokens x GROUP_P q heads
    block_n: int  # KV positions per inner-loop step (independent of the cache block size)
    num_warps: int
    num_stages: int


# Below this many tokens per split, the partial write and the reduce cost more than the
# parallelism buys (one split streams ~64 KB of bf16 K+V per kv head at head_dim 128).
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 16
# Aim for about 4 programs per SM in decode: one 4-warp program per SM cannot keep enough loads in
# flight to approach HBM bandwidth.
PROGRAMS_PER_SM = 4


def num_kv_splits(
    num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int, num_sms: int
) -> int:
    """How many ranges to split each context into (1 = no split-KV).

    Only decode batches split (prefill tiles already give many programs, and their partials would
    be q_len times larger). A decode batch gets num_seqs * num_kv_heads programs; when that is
    below PROGRAMS_PER_SM * num_sms, split the context so the GPU fills, but never below
    MIN_TOKENS_PER_SPLIT tokens per split nor above MAX_SPLITS.
    """
    if max_query_len > 1:
        return 1
    programs = num_seqs * num_kv_heads
    wanted = -(-PROGRAMS_PER_SM * num_sms // max(programs, 1))
    splits = min(wanted, max_seq_len // MIN_TOKENS_PER_SPLIT, MAX_SPLITS)
    return max(splits, 1)


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


class DecodeConfig(NamedTuple):
    block_m: int  # rows: the q heads of one kv head, padded to at least 16 (tl.dot)
    block_n: int  # KV positions per tile
    num_warps: int
    num_stages: int


def decode_config(group: int, on_gpu: bool) -> DecodeConfig:
    """The decode kernel's tiles for ``group`` q heads per kv head."""
    block_m = max(16, triton.next_power_of_2(group))
    if not on_gpu:  # small KV tiles cross block boundaries at tiny test shapes
        return DecodeConfig(block_m, 16, 1, 1)
    # 64 KV positions on 4 warps, 2 stages: within 1 us of the best of 36 configs at batch 1,
    # context 128 (6.8 us a layer against 5.9 for 128 positions; bench/decode_attention.py).
    return DecodeConfig(block_m, 64, 4, 2)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_splits(device: torch.device, num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
    """`num_kv_splits` of a decode batch on `device` (the SM count read from the device)."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 1
    return num_kv_splits(num_seqs, num_kv_heads, 1, max_seq_len, sms)


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

    store_mask = row_ok[:, None] & d_ok[None, :]
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # a split with no visible key writes 0 and lse -inf
    o = acc / l_safe[:, None]
    o_off = token[:, None] * stride_ot + q_head[:, None] * stride_oh + offs_d[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        tl.store(out_ptr + o_off + split * stride_os, o, mask=store_mask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + token * stride_lt + q_head * stride_lh + split, lse, mask=row_ok)


@triton.jit
def _decode_tiles(
    acc, l_i, m_i,  # [M, D_P], [M], [M] fp32 online-softmax state
    q1, q2,  # [M, HALF_P]: the two halves of each row's query (dot operands)
    k_cache_ptr, v_cache_ptr, table_row, kv_head,
    tile_lo, tile_hi, kv_end,
    offs_h, h_ok, offs_d, d_ok, scale_log2,
    stride_cb, stride_cs, stride_ch,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HALF: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold cached KV tiles [tile_lo, tile_hi) into one decode query's running softmax.

    K is read as two halves, so q may arrive rotated in registers (rotate-half RoPE pairs
    column c with c + HALF). Each tile's block ids are loaded one tile ahead: the block-table
    read stays off the path from one tile's K/V loads to the next's. Rows are padded to 16 for
    tl.dot even with one q head per kv head: broadcast products and sums instead measured
    1.7x slower at batch 1 and 2x at batch 64 on the H200 (bench/decode_attention.py)."""
    offs_n = tile_lo * BLOCK_N + tl.arange(0, BLOCK_N)
    block = tl.load(table_row + offs_n // BLOCK_SIZE, mask=offs_n < kv_end, other=0)
    for _ in range(tile_lo, tile_hi):
        n_ok = offs_n < kv_end
        row = block.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        offs_n += BLOCK_N
        block = tl.load(table_row + offs_n // BLOCK_SIZE, mask=offs_n < kv_end, other=0)
        mask_h = n_ok[:, None] & h_ok[None, :]
        k_ptrs = k_cache_ptr + row[:, None] + offs_h[None, :]  # [BLOCK_N, HALF_P]
        k1 = tl.load(k_ptrs, mask=mask_h, other=0.0)
        k2 = tl.load(k_ptrs + HALF, mask=mask_h, other=0.0)
        v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, D_P]
        if DOT_FP32:
            k1, k2, v = k1.to(tl.float32), k2.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PRECISION)  # [M, N]
        s = tl.where(n_ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _decode_kernel(
    out_ptr,  # [S, Hq, D] (one split) or fp32 partials [S, Hq, NUM_SPLITS, D]
    lse_ptr,  # fp32 [S, Hq, NUM_SPLITS] (unused with one split)
    q_ptr,  # [S, Hq, D]: sequence i's query is row i
    k_ptr, v_ptr,  # [S, Hkv, D] the step's new K/V (NEW_KV), else unused
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    block_tables_ptr,  # [S, max_blocks] int32
    seq_lens_ptr,  # [S] int32, context length after this step
    slot_ptr,  # [S] int64 where the new K/V goes (< 0: a padding row, nothing written)
    pos_ptr, table_ptr,  # ROPE: [S] positions into the cos | sin table [*, D]
    scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    stride_bt, stride_pos, stride_table,
    stride_ot, stride_oh, stride_os,
    stride_lt, stride_lh,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,  # >= GROUP rows, at least 16 (tl.dot): the q heads of one kv head
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    NEW_KV: tl.constexpr,  # the new K/V come in k_ptr/v_ptr: write them and attend from registers
    ROPE: tl.constexpr,  # rotate q and the new k first (NEW_KV only)
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    token = seq.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)

    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < GROUP
    q_head = kv_head * GROUP + offs_m
    offs_h = tl.arange(0, HALF_P)
    h_ok = offs_h < HALF
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = q_ptr + token * stride_qt + q_head[:, None] * stride_qh + offs_h[None, :]
    q_mask = row_ok[:, None] & h_ok[None, :]
    q1 = tl.load(q_ptrs, mask=q_mask, other=0.0)  # [BLOCK_M, HALF_P]
    q2 = tl.load(q_ptrs + HALF, mask=q_mask, other=0.0)
    cached = seq_len
    if NEW_KV:
        cached = seq_len - 1  # the cache holds every key but this step's
        k_row = k_ptr + token * stride_kt + kv_head * stride_kh + offs_h
        k1 = tl.load(k_row, mask=h_ok, other=0.0)
        k2 = tl.load(k_row + HALF, mask=h_ok, other=0.0)
        if ROPE:  # neox rotate-half in fp32, rounded back as the unfused kernels round it
            pos = tl.load(pos_ptr + token * stride_pos).to(tl.int64)
            cs = table_ptr + pos * stride_table
            cos = tl.load(cs + offs_h, mask=h_ok, other=0.0).to(tl.float32)
            sin = tl.load(cs + HALF + offs_h, mask=h_ok, other=0.0).to(tl.float32)
            q1f, q2f = q1.to(tl.float32), q2.to(tl.float32)
            q1 = (q1f * cos[None, :] - q2f * sin[None, :]).to(q_ptr.dtype.element_ty)
            q2 = (q2f * cos[None, :] + q1f * sin[None, :]).to(q_ptr.dtype.element_ty)
            k1f, k2f = k1.to(tl.float32), k2.to(tl.float32)
            k1, k2 = k1f * cos - k2f * sin, k2f * cos + k1f * sin
        # What the cache keeps, and every later step reads: k and v in the cache's dtype.
        k1 = k1.to(k_cache_ptr.dtype.element_ty)
        k2 = k2.to(k_cache_ptr.dtype.element_ty)
        v_new = tl.load(v_ptr + token * stride_vt + kv_head * stride_vh + offs_d, mask=d_ok,
                        other=0.0).to(v_cache_ptr.dtype.element_ty)
        slot = tl.load(slot_ptr + token)
        if (split == NUM_SPLITS - 1) & (slot >= 0):  # one program per (token, kv head) writes
            dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs \
                + kv_head * stride_ch
            tl.store(k_cache_ptr + dst + offs_h, k1, mask=h_ok)
            tl.store(k_cache_ptr + dst + HALF + offs_h, k2, mask=h_ok)
            tl.store(v_cache_ptr + dst + offs_d, v_new, mask=d_ok)
    q1d, q2d = q1, q2
    if DOT_FP32:
        q1d, q2d = q1.to(tl.float32), q2.to(tl.float32)

    num_tiles = tl.cdiv(cached, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    acc, l_i, m_i = _decode_tiles(
        acc, l_i, m_i, q1d, q2d, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt,
        kv_head, tile_lo, tile_hi, cached, offs_h, h_ok, offs_d, d_ok, scale_log2,
        stride_cb, stride_cs, stride_ch, BLOCK_N, BLOCK_SIZE, HALF, DOT_FP32, DOT_PRECISION,
    )
    if NEW_KV:  # the last split also sees the query's own key, straight from registers
        s_new = tl.sum(q1.to(tl.float32) * k1.to(tl.float32)[None, :], 1) \
            + tl.sum(q2.to(tl.float32) * k2.to(tl.float32)[None, :], 1)
        s_new = tl.where(split == NUM_SPLITS - 1, s_new * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, s_new)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s_new - m_ref)
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new

    store_mask = row_ok[:, None] & d_ok[None, :]
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_off = token * stride_ot + q_head[:, None] * stride_oh + offs_d[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        tl.store(out_ptr + o_off + split * stride_os, o, mask=store_mask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + token * stride_lt + q_head * stride_lh + split, lse, mask=row_ok)


@triton.jit
def _reduce_splits_kernel(
    out_ptr,  # [T, Hq, D]
    part_ptr,  # fp32 [T, Hq, NUM_SPLITS, D]
    lse_ptr,  # fp32 [T, Hq, NUM_SPLITS]
    stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps,
    stride_lt, stride_lh,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    NUM_SPLITS_P: tl.constexpr,
):
    """Merge the partials of one (token, q head): weights 2^(lse_s - max lse), renormalized."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS_P)
    offs_d = tl.arange(0, HEAD_DIM_P)
    s_ok = offs_s < NUM_SPLITS
    lse = tl.load(lse_ptr + token * stride_lt + head * stride_lh + offs_s, mask=s_ok,
                  other=float("-inf"))  # [NUM_SPLITS_P]
    w = tl.exp2(lse - tl.max(lse, 0))  # empty splits (lse -inf) weigh 0; split 0 is never empty
    part = tl.load(
        part_ptr + token * stride_pt + head * stride_ph + offs_s[:, None] * stride_ps
        + offs_d[None, :],
        mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )  # [NUM_SPLITS_P, HEAD_DIM_P]
    o = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d,
             o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def _split_outputs(query: torch.Tensor, out: torch.Tensor, num_splits: int):
    """(target, lse, stride_os, stride_lt, stride_lh) of a launch: `out` itself for one split,
    else fp32 partials and their log-sum-exps (the merge loses nothing before the one rounding
    to the output dtype)."""
    if num_splits == 1:
        return out, out, 0, 0, 0  # lse is not touched when there is one split
    num_tokens, num_heads, head_dim = query.shape
    target = query.new_empty(num_tokens, num_heads, num_splits, head_dim, dtype=torch.float32)
    lse = query.new_empty(num_tokens, num_heads, num_splits, dtype=torch.float32)
    return target, lse, target.stride(2), lse.stride(0), lse.stride(1)


def _merge_splits(out: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                  num_splits: int) -> None:
    if num_splits == 1:
        return
    num_tokens, num_heads, head_dim = out.shape
    head_dim_p = triton.next_power_of_2(head_dim)
    _reduce_splits_kernel[(num_tokens, num_heads)](
        out, target, lse,
        out.stride(0), out.stride(1),
        target.stride(0), target.stride(1), target.stride(2),
        lse.stride(0), lse.stride(1),
        HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p,
        NUM_SPLITS=num_splits, NUM_SPLITS_P=triton.next_power_of_2(num_splits),
        num_warps=4 if head_dim_p >= 128 else 2,  # one row of <= 128 fp32 per split: tiny
    )  # fmt: skip


def decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]: one query per sequence
    key: torch.Tensor | None,  # [num_seqs, num_kv_heads, head_dim] this step's K, or None
    value: torch.Tensor | None,  # [num_seqs, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    meta: PagedAttentionMeta,
    scale: float,
    slot_mapping: torch.Tensor | None = None,  # [num_seqs] int64 (< 0: write nothing)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # (positions, cos | sin table)
    *,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,  # None: `decode_config`; benches sweep it
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Attention of a decode batch (max_query_len == 1) in one kernel.

    With ``key``/``value`` (and ``slot_mapping``), the cache does not hold this step's K/V yet:
    the kernel rotates q and k when ``rope`` is given, writes k and v at their slots, and
    attends over the cached keys plus the new one from registers, as `rope_write_kv` (or
    `write_kv_cache`) followed by `paged_attention` would. Without them the cache already holds
    every key."""
    num_tokens, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    num_seqs = meta.seq_lens.shape[0]
    assert num_heads % num_kv_heads == 0 and head_dim % 2 == 0
    assert num_tokens == num_seqs, "a decode batch has one query per sequence"
    assert query.stride(-1) == 1 and kv_cache.stride(-1) == 1
    new_kv = key is not None
    if new_kv:
        assert value is not None and slot_mapping is not None
        assert key.stride(-1) == 1 and value.stride(-1) == 1
    else:
        assert rope is None, "rope needs the new key"
        key = value = query  # never read
        slot_mapping = meta.seq_lens
    positions, table = rope if rope is not None else (meta.seq_lens, query)
    if table.stride(-1) != 1:
        table = table.contiguous()
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    on_gpu = query.device.type == "cuda"
    if num_splits is None:
        num_splits = decode_splits(query.device, num_seqs, num_kv_heads, meta.max_seq_len)
    group = num_heads // num_kv_heads
    cfg = config or decode_config(group, on_gpu)
    target, lse, stride_os, stride_lt, stride_lh = _split_outputs(query, out, num_splits)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        target, lse, query, key, value, k_cache, v_cache,
        meta.block_tables, meta.seq_lens, slot_mapping, positions, table,
        scale * math.log2(math.e),
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0), positions.stride(0), table.stride(0),
        target.stride(0), target.stride(1), stride_os,
        stride_lt, stride_lh,
        GROUP=group, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HEAD_DIM=head_dim, HEAD_DIM_P=triton.next_power_of_2(head_dim),
        # tl.dot's K is at least 16 (tiny test models have head_dim 16): the rest is masked
        HALF=head_dim // 2, HALF_P=max(16, triton.next_power_of_2(head_dim // 2)),
        BLOCK_SIZE=block_size, NUM_SPLITS=num_splits, NEW_KV=new_kv, ROPE=rope is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 or not on_gpu else "tf32",
        DOT_FP32=not on_gpu,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    _merge_splits(out, target, lse, num_splits)
    return out


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    meta: PagedAttentionMeta,
    scale: float,
    *,
    num_splits: int | None = None,  # None: `num_kv_splits` heuristic; tests and benches force it
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim], e.g. a graph's buffer
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Varlen causal attention over the paged cache, as `kernels.reference.paged_attention`.
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
                      num_tokens, num_kv_heads, _num_sms(query.device.index or 0) if on_gpu else 0)
    block_q = cfg.block_m // group_p
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, num_splits)
    target, lse, stride_os, stride_lt, stride_lh = _split_outputs(query, out, num_splits)
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
    _merge_splits(out, target, lse, num_splits)
    return out
