"""Triton kernels for the decoder's elementwise hot path: fused residual-add + RMSNorm,
SiLU-and-mul, neox RoPE, the paged KV-cache write, and RoPE fused with that write.

Each wrapper has exactly the signature and return convention of its torch reference in
`mmkernels.reference`, whose docstrings define the semantics, and rounds where the reference rounds
so that fp32 results agree to summation order and bf16/fp16 ones to about one ulp. Wrappers
allocate nothing but their outputs, never sync the host (no `.item()`, no data-dependent shapes),
and read inputs through their strides: only a non-unit stride on the last dim forces a copy, so
the q/k views that the qkv split hands over go in as they are.

Only `mmkernels.get` imports this module, when Triton is wanted, so triton is imported at the top.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One row of rms_norm lives in registers; past this the kernel would spill (largest real
# hidden size today: 16384).
_MAX_NORM_BLOCK = 32768


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dim is unit-stride (kernels index it with `+ arange`), else a
    contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:  # [..., n] -> [rows, n]
    # A view for 2-D inputs of any row stride; reshape copies only when leading dims don't merge.
    t = _unit_last(t)
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _tile_warps(num_elements: int) -> int:
    # ~8 values per thread (one 16-byte bf16 vector) up to 8 warps; bigger tiles put more values
    # on each thread rather than more warps, which keeps rms_norm's cross-warp reduction short.
    return min(max(num_elements // 256, 1), 8)


# ---------------------------------------------------------------------------------------------
# RMSNorm (+ fused residual add)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    hidden, stride_x, stride_res, stride_out, stride_res_out, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One program per token row: the whole row sits in registers, so x is read once even with
    # the residual add, and the sum of squares is one in-register reduction.
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 at long prefills
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden  # BLOCK is hidden rounded up to a power of two (4096, 5120, 96, ...)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # The reference adds in the stream dtype: round the sum before its statistics.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    # Masked lanes loaded 0 and add nothing; divide by the true hidden size, not BLOCK.
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * inv_rms).to(x.dtype)  # back to the input dtype before the weight, as HF does
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden] (any leading dims)
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`mmkernels.reference.rms_norm` in one kernel: out, or (out, x + residual) with the add fused.

    Inputs are never written; both outputs are new contiguous tensors with the reference's dtypes.
    """
    hidden = x.shape[-1]
    block = triton.next_power_of_2(hidden)
    if block > _MAX_NORM_BLOCK:
        raise ValueError(f"rms_norm: hidden size {hidden} exceeds the one-row-in-registers limit")
    res_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(res_dtype, weight.dtype), device=x.device)
    res_out = None if residual is None else torch.empty(x.shape, dtype=res_dtype, device=x.device)
    x2 = _rows(x)  # [T, hidden]
    num_tokens = x2.shape[0]
    if num_tokens > 0:
        res2 = x2 if residual is None else _rows(residual)  # unread when HAS_RESIDUAL is off
        res_out2 = out.view(-1, hidden) if res_out is None else res_out.view(-1, hidden)
        _rms_norm_kernel[(num_tokens,)](
            x2, res2, _unit_last(weight), out.view(-1, hidden), res_out2,
            hidden, x2.stride(0), res2.stride(0), hidden, hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=_tile_warps(block),
        )  # fmt: skip
    return out if res_out is None else (out, res_out)


# ---------------------------------------------------------------------------------------------
# SiLU-and-mul


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_out, BLOCK: tl.constexpr):
    # Grid (token, column block): tokens on axis 0, whose limit is 2**31 (axis 1's is 65535).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # The reference rounds silu(gate) to the input dtype before the product: round here too.
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [..., 2 * d] -> [..., d]
    """`mmkernels.reference.silu_and_mul`: silu(gate) * up; a new contiguous output."""
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    x2 = _rows(x)  # [T, 2 * d]
    if x2.shape[0] > 0 and d > 0:
        # 1024 columns over 4 warps: 8 per thread, one 16-byte vector of bf16 for gate and up.
        block = min(1024, triton.next_power_of_2(d))
        grid = (x2.shape[0], triton.cdiv(d, block))
        _silu_and_mul_kernel[grid](x2, out, d, x2.stride(0), d, BLOCK=block, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# RoPE (neox rotate-half)


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, stride_h, stride_out_h, cos, sin,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # x_ptr/out_ptr point at one token; heads go BLOCK_H at a time to bound the tile size.
    d = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D] over one half of head_dim
    for h0 in tl.static_range(0, NUM_HEADS, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
        mask = (h < NUM_HEADS) & (d < HALF)
        src = x_ptr + h * stride_h + d
        x1 = tl.load(src, mask=mask, other=0.0)
        x2 = tl.load(src + HALF, mask=mask, other=0.0)
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        dst = out_ptr + h * stride_out_h + d
        ty = out_ptr.dtype.element_ty
        tl.store(dst, (x1f * cos - x2f * sin).to(ty), mask=mask)
        tl.store(dst + HALF, (x2f * cos + x1f * sin).to(ty), mask=mask)


@triton.jit
def _cos_sin(pos_ptr, cache_ptr, tok, stride_pos, stride_cache,
             HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token `tok`'s cos and sin rows, [1, BLOCK_D] fp32 each (the reference rotates in fp32
    whatever the cache dtype)."""
    pos = tl.load(pos_ptr + tok * stride_pos).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    cache_row = cache_ptr + pos * stride_cache
    cos = tl.load(cache_row + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cache_row + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_q_out_t, stride_q_out_h, stride_k_out_t, stride_k_out_h,
    stride_pos, stride_cache,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program per token rotates all its q and k heads: cos/sin are loaded once per token and
    # shared by Hq + Hkv heads (GQA or not). Head counts are constexpr (fixed per model, one
    # compile) so the head loop unrolls.
    tok = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(pos_ptr, cache_ptr, tok, stride_pos, stride_cache, HALF, BLOCK_D)
    _rotate_heads(
        q_ptr + tok * stride_qt, q_out_ptr + tok * stride_q_out_t,
        stride_qh, stride_q_out_h, cos, sin, NUM_Q_HEADS, HALF, BLOCK_H, BLOCK_D,
    )  # fmt: skip
    _rotate_heads(
        k_ptr + tok * stride_kt, k_out_ptr + tok * stride_k_out_t,
        stride_kh, stride_k_out_h, cos, sin, NUM_K_HEADS, HALF, BLOCK_H, BLOCK_D,
    )  # fmt: skip


def apply_rope(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int64 (int32 works too)
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim]: cos | sin, head_dim // 2 each
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mmkernels.reference.apply_rope` in one kernel for q and k.

    Out of place, like the reference: returns new contiguous (q, k) in the inputs' dtypes and
    leaves q and k (often views into the qkv projection output) untouched.
    """
    head_dim = q.shape[-1]
    half = head_dim // 2
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    num_tokens = q.shape[0]
    if num_tokens > 0:
        q, k, cache = _unit_last(q), _unit_last(k), _unit_last(cos_sin_cache)
        block_d = triton.next_power_of_2(half)  # 32/40/48/64 -> 32/64/64/64, masked
        # 16 heads x 64 lanes = 1024 values per tile: 8 per thread at 4 warps.
        block_h = min(triton.next_power_of_2(max(q.shape[1], k.shape[1])), 16)
        _rope_kernel[(num_tokens,)](
            q, k, q_out, k_out, positions, cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            positions.stride(0), cache.stride(0),
            NUM_Q_HEADS=q.shape[1], NUM_K_HEADS=k.shape[1], HALF=half, BLOCK_H=block_h, BLOCK_D=block_d,
            num_warps=_tile_warps(block_h * block_d),
        )  # fmt: skip
    return q_out, k_out


# ---------------------------------------------------------------------------------------------
# KV-cache write


@triton.jit
def _write_kv_cache_kernel(
    key_ptr, value_ptr, cache_ptr, slot_ptr,
    num_heads, head_dim, block_size,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_slot,
    stride_c_kv, stride_c_block, stride_c_off, stride_c_h,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program per token copies its [Hkv, D] key and value tile to the token's slot.
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok * stride_slot).to(tl.int64)  # int64: slot * stride is large
    if slot < 0:
        return  # a padding token: skipped on device, so the host never checks the mapping
    block, offset = slot // block_size, slot % block_size
    h = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    d = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    mask = (h < num_heads) & (d < head_dim)  # both rounded up to powers of two (D = 80, 96)
    k = tl.load(key_ptr + tok * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + h * stride_vh + d, mask=mask)
    dst = cache_ptr + block * stride_c_block + offset * stride_c_off + h * stride_c_h + d
    ty = cache_ptr.dtype.element_ty
    tl.store(dst, k.to(ty), mask=mask)
    tl.store(dst + stride_c_kv, v.to(ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, block_id * block_size + offset; <0 = skip
) -> None:
    """`mmkernels.reference.write_kv_cache`: scatter K/V into the cache in place, casting to its
    dtype; negative slots are skipped inside the kernel."""
    if kv_cache.stride(-1) != 1:
        # The cache is written in place, so a contiguous copy would lose the writes.
        raise ValueError("write_kv_cache: kv_cache's head_dim must be unit-stride")
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    key, value = _unit_last(key), _unit_last(value)
    num_heads, head_dim = key.shape[1], key.shape[2]
    block_h, block_d = triton.next_power_of_2(num_heads), triton.next_power_of_2(head_dim)
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        num_heads, head_dim, kv_cache.shape[2],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), slot_mapping.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=_tile_warps(block_h * block_d),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# RoPE + KV-cache write


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, pos_ptr, table_ptr, cache_ptr, slot_ptr, block_size,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_q_out_t, stride_q_out_h, stride_pos, stride_table, stride_slot,
    stride_c_kv, stride_c_block, stride_c_off, stride_c_h,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_KH: tl.constexpr, BLOCK_HD: tl.constexpr,
):  # fmt: skip
    # One program per token: q is rotated into q_out, k is rotated straight into its cache slot
    # and v copied beside it, so the rotated k never goes through memory on its own.
    tok = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(pos_ptr, table_ptr, tok, stride_pos, stride_table, HALF, BLOCK_D)
    _rotate_heads(
        q_ptr + tok * stride_qt, q_out_ptr + tok * stride_q_out_t,
        stride_qh, stride_q_out_h, cos, sin, NUM_Q_HEADS, HALF, BLOCK_H, BLOCK_D,
    )  # fmt: skip
    slot = tl.load(slot_ptr + tok * stride_slot).to(tl.int64)
    if slot >= 0:  # negative: a padding token, whose q is rotated but whose K/V is not kept
        dst = cache_ptr + (slot // block_size) * stride_c_block + (slot % block_size) * stride_c_off
        _rotate_heads(
            k_ptr + tok * stride_kt, dst, stride_kh, stride_c_h, cos, sin,
            NUM_K_HEADS, HALF, BLOCK_H, BLOCK_D,
        )  # fmt: skip
        h = tl.arange(0, BLOCK_KH)[:, None]
        d = tl.arange(0, BLOCK_HD)[None, :]
        mask = (h < NUM_K_HEADS) & (d < HEAD_DIM)
        v = tl.load(v_ptr + tok * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(dst + stride_c_kv + h * stride_c_h + d, v.to(cache_ptr.dtype.element_ty),
                 mask=mask)


def rope_write_kv(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int64 (int32 works too)
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim]: cos | sin
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; <0 = skip
) -> torch.Tensor:
    """`mmkernels.reference.rope_write_kv` in one kernel: returns the rotated q (new, contiguous)
    and writes the rotated k and v into the cache in place."""
    if kv_cache.stride(-1) != 1:
        raise ValueError("rope_write_kv: kv_cache's head_dim must be unit-stride")
    head_dim = q.shape[-1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_tokens = q.shape[0]
    if num_tokens > 0:
        q, k, v, table = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(cos_sin_cache)
        half = head_dim // 2
        block_h = min(triton.next_power_of_2(max(q.shape[1], k.shape[1])), 16)
        block_kh, block_hd = triton.next_power_of_2(k.shape[1]), triton.next_power_of_2(head_dim)
        _rope_write_kv_kernel[(num_tokens,)](
            q, k, v, q_out, positions, table, kv_cache, slot_mapping, kv_cache.shape[2],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            q_out.stride(0), q_out.stride(1), positions.stride(0), table.stride(0),
            slot_mapping.stride(0),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            NUM_Q_HEADS=q.shape[1], NUM_K_HEADS=k.shape[1], HEAD_DIM=head_dim, HALF=half,
            BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(half),
            BLOCK_KH=block_kh, BLOCK_HD=block_hd,
            num_warps=_tile_warps(block_h * triton.next_power_of_2(half)),
        )  # fmt: skip
    return q_out
