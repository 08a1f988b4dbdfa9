"""Programmatic dependent launch (kernels/pdl.py): a chain of dependent decode kernels captured
in a CUDA graph with PDL gives bit for bit what the same kernels give launched one by one
without it. Each kernel reads the one before it, so a kernel that started reading before its
predecessor finished would change the result. Skipped without an sm90+ GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.gpu

HIDDEN, INTER, HEADS, BLOCK = 1024, 2816, 8, 16


def _chain(x, w, kv, meta, pos, slots, table):
    from kernels import triton_attention, triton_gemv, triton_ops

    h = x
    for layer in range(4):
        qkv = triton_gemv.norm_linear(h, w["norm"], 1e-5, w["qkv"][layer])
        q, k, v = qkv.view(1, 3 * HEADS, HIDDEN // HEADS).split(HEADS, dim=1)
        q = triton_ops.rope_write_kv(q, k, v, pos, table, kv[layer], slots)
        a = triton_attention.paged_attention(q, kv[layer], meta, 0.125, num_splits=1 + layer % 2)
        h = triton_gemv.linear(a.view(1, HIDDEN), w["o"][layer], residual=h)
        gu = triton_gemv.norm_linear(h, w["norm"], 1e-5, w["gate_up"][layer])
        h = triton_gemv.silu_mul_linear(gu, w["down"][layer], residual=h)
        h = triton_ops.rms_norm(h, w["norm"], 1e-5)
    return h


def test_pdl_chain_in_a_graph_equals_plain_launches(monkeypatch):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs an sm90+ GPU")
    from kernels import pdl

    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, std=0.05):
        return (torch.randn(*shape, generator=g, device=dev) * std).to(dt)

    w = {"norm": (1 + rand(HIDDEN, std=0.1)),
         "qkv": [rand(3 * HIDDEN, HIDDEN) for _ in range(4)],
         "o": [rand(HIDDEN, HIDDEN) for _ in range(4)],
         "gate_up": [rand(2 * INTER, HIDDEN) for _ in range(4)],
         "down": [rand(HIDDEN, INTER) for _ in range(4)]}
    ctx = 300  # 299 cached keys + this token's
    num_blocks = -(-ctx // BLOCK) + 1
    kv0 = [rand(2, num_blocks, BLOCK, HEADS, HIDDEN // HEADS, std=1.0) for _ in range(4)]
    meta = SimpleNamespace(
        block_tables=torch.arange(1, num_blocks, dtype=torch.int32, device=dev)[None],
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([ctx], dtype=torch.int32, device=dev), max_query_len=1,
        max_seq_len=ctx)
    pos = torch.tensor([ctx - 1], device=dev)
    slots = torch.tensor([BLOCK + ctx - 1], device=dev)  # block 1 onwards, token ctx - 1
    inv = 1.0 / (10000 ** (torch.arange(0, HIDDEN // HEADS, 2, device=dev) / (HIDDEN // HEADS)))
    ang = torch.arange(4096, device=dev)[:, None] * inv[None]
    table = torch.cat([ang.cos(), ang.sin()], dim=-1).float()

    x_in = rand(1, HIDDEN, std=1.0)
    kv = [c.clone() for c in kv0]
    monkeypatch.setenv("MMSERVE_PDL", "0")
    assert not pdl.enabled(x_in)
    want = []
    for _ in range(3):
        for c, c0 in zip(kv, kv0):
            c.copy_(c0)
        x_in.copy_(rand(1, HIDDEN, std=1.0))
        want.append((_chain(x_in, w, kv, meta, pos, slots, table).clone(), x_in.clone()))

    monkeypatch.setenv("MMSERVE_PDL", "1")
    assert pdl.enabled(x_in)
    for c, c0 in zip(kv, kv0):
        c.copy_(c0)
    _chain(x_in, w, kv, meta, pos, slots, table)  # compile the PDL variants outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(x_in, w, kv, meta, pos, slots, table)
    for rep in range(20):
        expect, inp = want[rep % 3]
        for c, c0 in zip(kv, kv0):
            c.copy_(c0)
        x_in.copy_(inp)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expect), f"replay {rep} differs"
