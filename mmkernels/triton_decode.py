"""Triton attention for a decode batch (max_query_len == 1: one query per sequence, so sequence
i's token is row i), in one kernel per layer.

One program per (sequence, kv head, split): no search for its sequence, and the next KV tile's
block ids loaded before the current tile's K/V. In `decode_attention` the step's own K/V come in
registers: the kernel rotates q and k (RoPE), writes k and v into the cache and folds the new key
into the softmax itself, so a decode layer launches one attention kernel instead of a K/V writer
and a kernel that reads it back. `mmkernels.triton_attention.paged_attention` runs the same kernel
over a cache that already holds the new keys.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mmkernels.triton_splits import (
    PagedAttentionMeta,
    decode_splits,
    merge_splits,
    split_outputs,
    store_output,
)


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

    store_output(out_ptr, lse_ptr, acc, l_i, m_i, token, token, q_head, row_ok, offs_d, d_ok,
                 split, stride_ot, stride_oh, stride_os, stride_lt, stride_lh, NUM_SPLITS)


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
    target, lse, stride_os, stride_lt, stride_lh = split_outputs(query, out, num_splits)
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
    merge_splits(out, target, lse, num_splits)
    return out
