"""Split-KV (flash-decoding) for the Triton attention kernels: how many ranges a decode batch's
contexts are split into, where the partials go, how they are merged, and the one output store
both kernels end with (the normalized tile, or a partial and its log-sum-exp)."""

from __future__ import annotations

import functools
from typing import Protocol

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


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_splits(device: torch.device, num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
    """`num_kv_splits` of a decode batch on `device` (the SM count read from the device)."""
    sms = sm_count(device.index or 0) if device.type == "cuda" else 1
    return num_kv_splits(num_seqs, num_kv_heads, 1, max_seq_len, sms)


@triton.jit
def store_output(
    out_ptr, lse_ptr, acc, l_i, m_i,
    row_off, lse_row, q_head, row_ok, offs_d, d_ok, split,
    stride_ot, stride_oh, stride_os, stride_lt, stride_lh,
    NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    """A tile's output rows (token offsets ``row_off``, heads ``q_head``): normalized into the
    output with one split, else the fp32 partial of ``split`` and its log2-sum-exp. A split
    with no visible key writes 0 and lse -inf."""
    store_mask = row_ok[:, None] & d_ok[None, :]
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_off = row_off * stride_ot + q_head[:, None] * stride_oh + offs_d[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        tl.store(out_ptr + o_off + split * stride_os, o, mask=store_mask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + lse_row * stride_lt + q_head * stride_lh + split, lse, mask=row_ok)


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


def split_outputs(query: torch.Tensor, out: torch.Tensor, num_splits: int):
    """(target, lse, stride_os, stride_lt, stride_lh) of a launch: `out` itself for one split,
    else fp32 partials and their log-sum-exps (the merge loses nothing before the one rounding
    to the output dtype)."""
    if num_splits == 1:
        return out, out, 0, 0, 0  # lse is not touched when there is one split
    num_tokens, num_heads, head_dim = query.shape
    target = query.new_empty(num_tokens, num_heads, num_splits, head_dim, dtype=torch.float32)
    lse = query.new_empty(num_tokens, num_heads, num_splits, dtype=torch.float32)
    return target, lse, target.stride(2), lse.stride(0), lse.stride(1)


def merge_splits(out: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
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
