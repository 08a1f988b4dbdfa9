"""The pure-torch kernel references against independent dense computations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmkernels.reference import apply_rope, paged_attention, rms_norm, silu_and_mul, write_kv_cache


def _dense_causal(q, k, v, scale):
    """Plain softmax attention of all seq_len queries, GQA by repeating KV heads."""
    # q [S, Hq, D], k/v [S, Hkv, D]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [Hq, S, S]
    s = q.shape[0]
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)  # [S, Hq, D]


def _paged_batch(seq_lens, q_lens, block_size, num_blocks, hq=4, hkv=2, d=16, seed=0):
    """Random full-context q/k/v per sequence, K/V scattered into shuffled cache blocks."""
    g = torch.Generator().manual_seed(seed)
    kv_cache = torch.zeros(2, num_blocks, block_size, hkv, d)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables, full, slots, queries = [], [], [], []
    for seq_len, q_len in zip(seq_lens, q_lens, strict=True):
        table = [free.pop() for _ in range(-(-seq_len // block_size))]
        tables.append(table)
        q, k, v = (torch.randn(seq_len, h, d, generator=g) for h in (hq, hkv, hkv))
        full.append((q, k, v))
        pos = torch.arange(seq_len)
        slots.append(torch.tensor(table)[pos // block_size] * block_size + pos % block_size)
        queries.append(q[seq_len - q_len :])
    write_kv_cache(
        torch.cat([k for _, k, _ in full]),
        torch.cat([v for _, _, v in full]),
        kv_cache,
        torch.cat(slots),
    )
    width = max(len(t) for t in tables)
    meta = SimpleNamespace(
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        query_start_loc_cpu=[0, *torch.tensor(q_lens).cumsum(0).tolist()],
        seq_lens_cpu=list(seq_lens),
    )
    return torch.cat(queries), kv_cache, meta, full


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize(
    "seq_lens,q_lens",
    [
        ([7, 20, 33], [7, 20, 33]),  # plain prefill
        ([9, 17, 40, 1], [1, 1, 1, 1]),  # decode
        ([12, 33, 5, 16], [4, 1, 5, 9]),  # chunked prefill mixed with decode
    ],
)
def test_paged_attention_matches_dense(block_size, seq_lens, q_lens):
    query, kv_cache, meta, full = _paged_batch(seq_lens, q_lens, block_size, num_blocks=40)
    scale = 1 / math.sqrt(query.shape[-1])
    out = paged_attention(query, kv_cache, meta, scale)
    assert out.shape == query.shape
    start = 0
    for (q, k, v), q_len in zip(full, q_lens, strict=True):
        expected = _dense_causal(q, k, v, scale)[-q_len:]
        torch.testing.assert_close(out[start : start + q_len], expected, atol=1e-5, rtol=1e-5)
        start += q_len
    # Not degenerate: different sequences give different outputs.
    assert not torch.allclose(out[0], out[-1])


def test_write_kv_cache_scatters_and_skips_padding():
    kv_cache = torch.zeros(2, 3, 4, 2, 8)  # 3 blocks of 4 slots
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    write_kv_cache(key, value, kv_cache, torch.tensor([9, -1, 2]))
    torch.testing.assert_close(kv_cache[0, 2, 1], key[0])  # slot 9 = block 2, offset 1
    torch.testing.assert_close(kv_cache[1, 0, 2], value[2])
    assert kv_cache.count_nonzero() == 2 * 2 * 2 * 8  # the -1 (padding) token wrote nothing


def test_rms_norm_fused_residual():
    x, res, w = torch.randn(5, 32), torch.randn(5, 32), torch.randn(32)
    plain = rms_norm(x, w, 1e-6)
    torch.testing.assert_close(plain, F.rms_norm(x, (32,), w, 1e-6))
    out, new_res = rms_norm(x, w, 1e-6, residual=res)
    torch.testing.assert_close(new_res, x + res)
    torch.testing.assert_close(out, F.rms_norm(x + res, (32,), w, 1e-6))


def test_silu_and_mul():
    x = torch.randn(6, 2 * 24)
    torch.testing.assert_close(silu_and_mul(x), F.silu(x[:, :24]) * x[:, 24:])


def test_apply_rope_matches_hf_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d, max_pos = 16, 64
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)  # [max_pos, d / 2]
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.tensor([0, 5, 63, 17, 17])
    q, k = torch.randn(5, 4, d), torch.randn(5, 2, d)
    q_out, k_out = apply_rope(q, k, positions, cache)
    emb = torch.cat((freqs, freqs), dim=-1)[positions]  # HF layout: [T, d]
    # HF wants [batch, heads, seq, d] with cos/sin [batch, seq, d].
    q_hf, k_hf = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos()[None], emb.sin()[None]
    )
    torch.testing.assert_close(q_out, q_hf[0].transpose(0, 1))
    torch.testing.assert_close(k_out, k_hf[0].transpose(0, 1))
    torch.testing.assert_close(q_out[0], q[0])  # position 0 is the identity
