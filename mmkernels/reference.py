"""Pure-torch references for the decoder hot-path kernels.

They define the semantics the Triton kernels must match and are what CPU serving runs. Every
function takes and returns tensors (plus the attention metadata) so a kernel can replace it
one-for-one.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class PagedAttentionMeta(Protocol):
    """The fields of `llm_worker.attention.AttentionMetadata` the reference reads.

    A Protocol, not an import, because mmkernels/ sits below llm_worker/ and must not import it.
    """

    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc_cpu: list[int]  # [num_seqs + 1]
    seq_lens_cpu: list[int]  # [num_seqs]


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, block_id * block_size + offset; <0 = skip
) -> None:
    """Scatter each token's K/V into its cache slot, in place."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    # Views, not copies: the cache is one contiguous tensor, so blocks x offsets flatten to slots.
    k_slots = kv_cache[0].view(-1, num_kv_heads, head_dim)  # [num_slots, Hkv, D]
    v_slots = kv_cache[1].view(-1, num_kv_heads, head_dim)
    # Negative slots mark padding tokens (e.g. a CUDA-graph batch padded to its captured size).
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, key, value = slot_mapping[valid], key[valid], value[valid]
    k_slots.index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    v_slots.index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    meta: PagedAttentionMeta,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Varlen causal attention over the paged cache (chunked prefill and decode alike).

    Sequence i owns query rows query_start_loc[i]:query_start_loc[i+1]; those are the LAST q_len
    tokens of its seq_len-token context, whose K/V must already be in the cache.
    """
    block_size = kv_cache.shape[2]
    out = torch.empty_like(query)
    qsl, seq_lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    for i, seq_len in enumerate(seq_lens):
        q_start, q_end = qsl[i], qsl[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = meta.block_tables[i, :num_blocks].long()  # [num_blocks]
        # Gather this sequence's blocks into a contiguous [seq_len, Hkv, D] K and V.
        k = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
        v = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
        q = query[q_start:q_end].transpose(0, 1)  # [Hq, q_len, D]
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, seq_len, D]
        if q_len == seq_len:
            mask, causal = None, True
        else:
            # Query row j sits at absolute position seq_len - q_len + j and sees keys <= it.
            q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
            k_pos = torch.arange(seq_len, device=query.device)
            mask, causal = k_pos[None, :] <= q_pos[:, None], False  # [q_len, seq_len]
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        )  # [Hq, q_len, D]
        out[q_start:q_end] = o.transpose(0, 1)
    return out


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm; with `residual`, first adds it (fused add) and also returns the sum.

    Returns `out` alone, or `(out, new_residual)` where new_residual = x + residual, so a decoder
    layer can carry the residual stream without a separate add kernel.
    """
    if residual is not None:
        x = x + residual
        residual = x
    # Statistics in fp32 as HF does, then back to the input dtype before the weight multiply.
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return out if residual is None else (out, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [..., 2 * d] -> [..., d]
    """SiLU(gate) * up, with gate and up stacked on the last dim (the merged gate_up output)."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """A projection as nn.Linear computes it (cuBLAS on CUDA): [..., K] @ [N, K]^T (+ [N]),
    then `+ residual` [..., N] when given (the residual stream's add after o_proj / down)."""
    out = F.linear(x, weight, bias)
    return out if residual is None else out + residual


def norm_linear_of(rms_norm_op, linear_op):
    """`norm_linear` composed of an rms_norm and a linear implementation (the reference's own, or
    the resolved kernels of a device when the fused one is switched off)."""

    def norm_linear(
        x: torch.Tensor,  # [num_tokens, hidden]
        norm_weight: torch.Tensor,  # [hidden]
        eps: float,
        weight: torch.Tensor,  # [N, hidden]
        bias: torch.Tensor | None = None,  # [N]
    ) -> torch.Tensor:  # [num_tokens, N]
        """linear(rms_norm(x)): a decoder layer's norm and the projection after it."""
        return linear_op(rms_norm_op(x, norm_weight, eps), weight, bias)

    return norm_linear


def silu_mul_linear_of(silu_and_mul_op, linear_op):
    """`silu_mul_linear` composed of a silu_and_mul and a linear implementation."""

    def silu_mul_linear(
        x: torch.Tensor,  # [num_tokens, 2 * d]: the merged [gate | up]
        weight: torch.Tensor,  # [N, d]
        bias: torch.Tensor | None = None,  # [N]
        residual: torch.Tensor | None = None,  # [num_tokens, N]
    ) -> torch.Tensor:  # [num_tokens, N]
        """linear(silu(gate) * up) (+ residual): the MLP's activation and down projection."""
        return linear_op(silu_and_mul_op(x), weight, bias, residual)

    return silu_mul_linear


norm_linear = norm_linear_of(rms_norm, linear)
silu_mul_linear = silu_mul_linear_of(silu_and_mul, linear)


def apply_rope(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int64
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim]: cos | sin, head_dim // 2 each
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) rotary embedding, the layout of HF Llama/Qwen2/Mistral."""
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)  # [num_tokens, head_dim // 2]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rope_write_kv_of(apply_rope_op, write_kv_cache_op):
    """`rope_write_kv` composed of an apply_rope and a write_kv_cache implementation."""

    def rope_write_kv(
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        positions: torch.Tensor,  # [num_tokens] int64
        cos_sin_cache: torch.Tensor,  # [max_position, head_dim]: cos | sin
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        slot_mapping: torch.Tensor,  # [num_tokens] int64; <0 = skip
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """RoPE on q and k, the rotated k and v written to the cache; returns the rotated q."""
        q, k = apply_rope_op(q, k, positions, cos_sin_cache)
        write_kv_cache_op(k, v, kv_cache, slot_mapping)
        return q

    return rope_write_kv


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)  # [T, H, D // 2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


rope_write_kv = rope_write_kv_of(apply_rope, write_kv_cache)
