"""The Triton paged attention against the torch reference: CPU under the interpreter, and GPU.

Interpreter mode is process-wide: Triton 3.x reads TRITON_INTERPRET when `@triton.jit` decorates
a function, and that includes triton's own library (tl.cdiv, ...) decorated at `import triton`;
an interpreted kernel calling a compiled library function fails. So the variable must be set
before triton is first imported, and setting it here would change the mode for every later test
module. Instead `test_interpreter_cases` reruns this file's `interp` cases in a child pytest with
TRITON_INTERPRET=1; run with the variable already set (as CI may), they run here one by one.
"""

from __future__ import annotations

import math
import os
from types import ModuleType, SimpleNamespace

import pytest
import torch
from interp_child import run_interpreter_cases

from mmkernels import reference

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BF16_TOL = {"atol": 1e-2, "rtol": 1.6e-2}  # bf16 output rounding (2^-8) plus bf16 P in P @ V
FP32_TOL = {"atol": 2e-5, "rtol": 2e-5}  # only summation order differs from the reference
interp_only = pytest.mark.skipif(not INTERPRETED, reason="runs in test_interpreter_cases' child")
compiled_only = pytest.mark.skipif(INTERPRETED, reason="GPU cases run compiled, not interpreted")


def test_interpreter_cases():
    if INTERPRETED:
        pytest.skip("already under the interpreter: the interp cases run in this process")
    run_interpreter_cases(__file__, "test_interp_", kernels="reference")


@pytest.fixture(scope="module")
def interp() -> ModuleType:
    """mmkernels.triton_attention, imported in a process where TRITON_INTERPRET=1."""
    import mmkernels.triton_attention as module

    # Guard the claim above: if a Triton release moved the switch, fail here, not in a compile.
    assert type(module._paged_attention_kernel).__name__ == "InterpretedFunction"
    return module


def _batch(seq_lens, q_lens, *, block_size, hq, hkv, d, dtype, seed, device="cpu"):
    """A random cache (every block, used or not), shuffled block tables, and the queries.

    Returns (query [T, hq, d], kv_cache, device-only meta for the kernel, full meta for the
    reference). Table padding holds an absurd block id, so reading past a sequence's blocks
    faults on GPU instead of passing silently.
    """
    g = torch.Generator().manual_seed(seed)
    tables = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(tables) + 3  # spare blocks hold random values the kernel must not read
    kv_cache = torch.randn(2, num_blocks, block_size, hkv, d, generator=g)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(n)] for n in tables]
    width = max(len(t) for t in tables) + 1
    block_tables = torch.tensor([t + [2**30] * (width - len(t)) for t in tables], dtype=torch.int32)
    qsl = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    query = torch.randn(qsl[-1], hq, d, generator=g)
    dev = {
        "query_start_loc": torch.tensor(qsl, dtype=torch.int32, device=device),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device),
        "block_tables": block_tables.to(device),
        "max_query_len": max(q_lens),
        "max_seq_len": max(seq_lens),
    }
    ref_meta = SimpleNamespace(
        block_tables=block_tables, query_start_loc_cpu=qsl, seq_lens_cpu=list(seq_lens)
    )
    # No host lists in the kernel's meta: reading one would raise AttributeError.
    return (query.to(device, dtype), kv_cache.to(device, dtype), SimpleNamespace(**dev), ref_meta)


def _check(attention, seq_lens, q_lens, *, block_size=16, hq=8, hkv=2, d=64,
           dtype=torch.float32, splits=1, seed=0, device="cpu", hints=None):
    query, kv_cache, meta, ref_meta = _batch(
        seq_lens, q_lens, block_size=block_size, hq=hq, hkv=hkv, d=d, dtype=dtype, seed=seed,
        device=device,
    )
    if hints is not None:
        meta.max_query_len, meta.max_seq_len = hints
    scale = 1 / math.sqrt(d)
    out = torch.full_like(query, float("nan"))  # every row the kernel skips stays NaN
    got = attention(query, kv_cache, meta, scale, num_splits=splits, out=out)
    assert got is out
    # The reference in fp32 on the host, from the same (possibly bf16-rounded) inputs.
    expected = reference.paged_attention(query.cpu().float(), kv_cache.cpu().float(), ref_meta,
                                         scale)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(got.cpu().float(), expected, **tol)


PREFILL = ([7, 20, 33], [7, 20, 33])
DECODE = ([9, 17, 40, 1, 64], [1, 1, 1, 1, 1])  # most lengths not a multiple of any block size
# Decoding sequences beside chunks whose prefix is already cached (12 = 8 cached + 4 new, ...).
MIXED = ([12, 33, 5, 50, 17], [4, 1, 5, 9, 1])


# -- CPU, interpreter -------------------------------------------------------------------------


@pytest.mark.parametrize("name,seq_lens,q_lens", [
    ("prefill", *PREFILL), ("decode", *DECODE), ("mixed", *MIXED),
])  # fmt: skip
@pytest.mark.parametrize("block_size,hq,hkv,d", [
    (16, 8, 2, 64),  # GQA 4:1
    (32, 2, 2, 80),  # MHA, head dim padded 80 -> 128
    (32, 8, 2, 80),
    (16, 3, 3, 64),
])  # fmt: skip
@interp_only
def test_interp_matches_reference_fp32(interp, name, seq_lens, q_lens, block_size, hq, hkv, d):
    _check(interp.paged_attention, seq_lens, q_lens, block_size=block_size, hq=hq, hkv=hkv, d=d,
           seed=sum(seq_lens) + block_size + d)


@pytest.mark.parametrize("seq_lens,q_lens", [DECODE, MIXED])
@pytest.mark.parametrize("splits", [2, 3])
@interp_only
def test_interp_split_kv_matches_reference(interp, seq_lens, q_lens, splits):
    # 3 splits over contexts of 1-4 KV tiles: some splits get no tile and must weigh nothing.
    _check(interp.paged_attention, seq_lens, q_lens, splits=splits, seed=splits)


@pytest.mark.parametrize("seq_lens,q_lens,splits", [(*MIXED, 1), (*DECODE, 3)])
@interp_only
def test_interp_bf16_within_tolerance(interp, seq_lens, q_lens, splits):
    _check(interp.paged_attention, seq_lens, q_lens, hq=4, hkv=1, d=80, dtype=torch.bfloat16,
           splits=splits, seed=7)


@interp_only
def test_interp_decode_single_token_context_one_past_a_block(interp):
    # q_len 1 at seq_len 17 with block size 16: the query's own key is alone in its block.
    _check(interp.paged_attention, [17, 33, 16], [1, 1, 1], block_size=16, seed=3)


@interp_only
def test_interp_length_hints_are_not_bounds(interp):
    # A CUDA graph is captured with fixed hints; the device lengths must still rule (a short
    # chunk's tile config on a batch that holds a 9-token chunk, a max_seq_len far too small).
    # max_query_len == 1 is the one promise: a decode batch, one query per sequence.
    _check(interp.paged_attention, *MIXED, hints=(2, 2), splits=1, seed=11)
    _check(interp.paged_attention, *DECODE, hints=(1, 2), splits=1, seed=12)


@interp_only
def test_interp_mixed_graph_padding(interp):
    # How a captured mixed step pads a batch: empty sequences (no query, no context) after the
    # real ones, then one sequence that owns the padding tokens; hints fixed at the bucket.
    seq_lens, q_lens = MIXED
    _check(interp.paged_attention, [*seq_lens, 0, 0, 0, 6], [*q_lens, 0, 0, 0, 6],
           hints=(64, 4096), splits=1, seed=13)


@interp_only
def test_interp_default_output_and_heuristic(interp):
    query, kv_cache, meta, ref_meta = _batch(*DECODE, block_size=16, hq=4, hkv=2, d=64,
                                             dtype=torch.float32, seed=5)
    out = interp.paged_attention(query, kv_cache, meta, 0.125)
    torch.testing.assert_close(out, reference.paged_attention(query, kv_cache, ref_meta, 0.125),
                               **FP32_TOL)


@interp_only
def test_interp_num_kv_splits_heuristic(interp):
    f = interp.num_kv_splits
    assert f(1, 32, 1, 4096, num_sms=132) == interp.MAX_SPLITS  # batch 1, long context: fill
    assert f(1, 32, 1, 1024, num_sms=132) == 1024 // interp.MIN_TOKENS_PER_SPLIT  # split floor
    assert f(1, 32, 1, 200, num_sms=132) == 1  # too short to amortize the reduce
    assert f(64, 32, 1, 4096, num_sms=132) == 1  # enough programs without splitting
    assert f(1, 32, 512, 4096, num_sms=132) == 1  # prefill never splits
    assert 1 < f(8, 8, 1, 4096, num_sms=132) < interp.MAX_SPLITS


@interp_only
def test_interp_triton_backend_writes_then_attends(interp, monkeypatch):
    from llm_worker.attention import ATTENTION_BACKENDS, AttentionMetadata, TorchAttentionBackend

    # The writer is the reference one on CPU (the Triton writer has its own tests).
    monkeypatch.setenv("MMSERVE_KERNELS", "reference")
    seq_lens, q_lens = MIXED
    query, kv_cache, meta, ref_meta = _batch(seq_lens, q_lens, block_size=16, hq=4, hkv=2, d=64,
                                             dtype=torch.float32, seed=9)
    key, value = torch.randn(2, query.shape[0], 2, 64).unbind(0)
    slots = []
    for table, s, n in zip(ref_meta.block_tables.tolist(), seq_lens, q_lens, strict=True):
        slots += [table[p // 16] * 16 + p % 16 for p in range(s - n, s)]
    full = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=meta.query_start_loc,
        seq_lens=meta.seq_lens, block_tables=meta.block_tables,
        query_start_loc_cpu=ref_meta.query_start_loc_cpu, seq_lens_cpu=ref_meta.seq_lens_cpu,
        max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len,
    )
    cache_ref, cache_rope, cache_rope_ref = kv_cache.clone(), kv_cache.clone(), kv_cache.clone()
    backend = ATTENTION_BACKENDS["triton"]()
    got = backend.forward(query, key, value, kv_cache, full, 0.125)
    expected = TorchAttentionBackend().forward(query, key, value, cache_ref, full, 0.125)
    torch.testing.assert_close(kv_cache, cache_ref, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, **FP32_TOL)
    # With the rotation handed over: q and k rotated on the way in (the fused writer).
    rope = (torch.tensor([p for s, n in zip(seq_lens, q_lens) for p in range(s - n, s)]),
            torch.randn(max(seq_lens), 64))
    got = backend.forward(query, key, value, cache_rope, full, 0.125, rope)
    q_rot, k_rot = reference.apply_rope(query, key, *rope)
    reference.write_kv_cache(k_rot, value, cache_rope_ref, full.slot_mapping)
    torch.testing.assert_close(cache_rope, cache_rope_ref, rtol=0, atol=0)
    torch.testing.assert_close(got, reference.paged_attention(q_rot, cache_rope_ref, full, 0.125),
                               **FP32_TOL)
    assert not torch.equal(cache_rope, kv_cache)  # the rotation changed what was written


def _check_decode(attention, seq_lens, *, rope, splits, hq=8, hkv=2, d=64, block_size=16,
                  dtype=torch.float32, seed=0, pad_rows=0, device="cpu", tol=None):
    """`decode_attention` with this step's K/V against the reference writer + attention: the
    cache it leaves (the new k rotated, v beside it; padding rows write nothing) and its output.
    ``pad_rows`` extra rows are what `InputBatch.pad_to` appends: slot -1, seq_len 1, the null
    block."""
    n = len(seq_lens)
    query, kv_cache, meta, ref_meta = _batch(
        seq_lens + [1] * pad_rows, [1] * (n + pad_rows), block_size=block_size, hq=hq, hkv=hkv,
        d=d, dtype=dtype, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    key, value = torch.randn(2, n + pad_rows, hkv, d, generator=g).to(device, dtype).unbind(0)
    tables = ref_meta.block_tables.tolist()
    slots = [tables[i][(s - 1) // block_size] * block_size + (s - 1) % block_size
             for i, s in enumerate(seq_lens)] + [-1] * pad_rows
    slot_mapping = torch.tensor(slots, device=device)
    positions = torch.tensor([s - 1 for s in seq_lens] + [0] * pad_rows, device=device)
    table = torch.randn(max(seq_lens), d, generator=g).to(device, dtype)
    scale = 1 / math.sqrt(d)

    expected_cache = kv_cache.clone()
    if rope:
        q_ref = reference.rope_write_kv(query, key, value, positions, table, expected_cache,
                                        slot_mapping)
    else:
        q_ref = query
        reference.write_kv_cache(key, value, expected_cache, slot_mapping)
    ref_meta.seq_lens_cpu = seq_lens + [1] * pad_rows
    expected = reference.paged_attention(q_ref.cpu().float(), expected_cache.cpu().float(),
                                         ref_meta, scale)
    out = torch.full_like(query, float("nan"))
    got = attention(query, key, value, kv_cache, meta, scale, slot_mapping,
                    (positions, table) if rope else None, num_splits=splits, out=out)
    assert got is out
    if device == "cpu" and dtype == torch.float32:  # the interpreter rotates as the reference
        torch.testing.assert_close(kv_cache, expected_cache, rtol=0, atol=0)
    else:  # the order of the fp32 rotation's terms may flip a bf16 rounding
        torch.testing.assert_close(kv_cache.float(), expected_cache.float(), **BF16_TOL)
    tol = tol or (FP32_TOL if dtype == torch.float32 else BF16_TOL)
    torch.testing.assert_close(got[:n].cpu().float(), expected[:n], **tol)


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (2, 2, 80), (3, 3, 64)])
@interp_only
def test_interp_decode_attention_writes_and_attends(interp, rope, splits, hq, hkv, d):
    # Contexts of 1 (only the new key) up to 4 KV tiles, one ending a block, plus padding rows.
    _check_decode(interp.decode_attention, [9, 17, 40, 1, 64, 16], rope=rope, splits=splits,
                  hq=hq, hkv=hkv, d=d, seed=hq + d + splits, pad_rows=2)


@pytest.mark.parametrize("hq,hkv", [(4, 1), (2, 2)])  # GQA and MHA
@interp_only
def test_interp_decode_attention_bf16(interp, hq, hkv):
    _check_decode(interp.decode_attention, [9, 17, 40, 1, 64], rope=True, splits=2, hq=hq,
                  hkv=hkv, d=80, dtype=torch.bfloat16, seed=21)


@interp_only
def test_interp_decode_attention_sees_its_own_key(interp):
    # Poison the cache slot the new key goes to: a kernel that read the slot back instead of
    # using the key from registers (or read it before writing) would attend to NaN.
    seq_lens = [5, 33]
    query, kv_cache, meta, ref_meta = _batch(seq_lens, [1, 1], block_size=16, hq=4, hkv=2, d=64,
                                             dtype=torch.float32, seed=4)
    tables = ref_meta.block_tables.tolist()
    slots = torch.tensor([tables[i][(s - 1) // 16] * 16 + (s - 1) % 16
                          for i, s in enumerate(seq_lens)])
    kv_cache.view(2, -1, 2, 64)[:, slots] = float("nan")
    key, value = torch.randn(2, 2, 2, 64).unbind(0)
    out = interp.decode_attention(query, key, value, kv_cache, meta, 0.125, slots, num_splits=2)
    assert torch.isfinite(out).all()
    assert torch.equal(kv_cache.view(2, -1, 2, 64)[0, slots], key)


@interp_only
def test_interp_triton_backend_decodes_in_one_kernel(interp, monkeypatch):
    from llm_worker.attention import ATTENTION_BACKENDS, AttentionMetadata

    seq_lens = [9, 17, 40]
    query, kv_cache, meta, ref_meta = _batch(seq_lens, [1, 1, 1], block_size=16, hq=4, hkv=2,
                                             d=64, dtype=torch.float32, seed=8)
    key, value = torch.randn(2, 3, 2, 64).unbind(0)
    tables = ref_meta.block_tables.tolist()
    slots = torch.tensor([tables[i][(s - 1) // 16] * 16 + (s - 1) % 16
                          for i, s in enumerate(seq_lens)])
    full = AttentionMetadata(
        slot_mapping=slots, query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens,
        block_tables=meta.block_tables, query_start_loc_cpu=ref_meta.query_start_loc_cpu,
        seq_lens_cpu=ref_meta.seq_lens_cpu, max_query_len=1, max_seq_len=40,
    )
    rope = (torch.tensor([s - 1 for s in seq_lens]), torch.randn(40, 64))
    monkeypatch.setenv("MMSERVE_KERNELS", "reference")  # the unfused path's writer
    outs, caches = [], []
    for reference_ops in ("", "decode_attention"):
        monkeypatch.setenv("MMSERVE_REFERENCE_OPS", reference_ops)
        backend = ATTENTION_BACKENDS["triton"]()
        cache = kv_cache.clone()
        outs.append(backend.forward(query, key, value, cache, full, 0.125, rope))
        caches.append(cache)
        assert (backend._decode is None) == bool(reference_ops)
    torch.testing.assert_close(caches[0], caches[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], outs[1], **FP32_TOL)


# -- GPU, compiled ------------------------------------------------------------------------------


def _long(n_seqs, seed, max_len=1500):
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(1, max_len, (n_seqs,), generator=g).tolist()
    return seq_lens, g


@pytest.mark.gpu
@compiled_only
@pytest.mark.parametrize("d,block_size", [(64, 8), (80, 16), (96, 32), (128, 64), (128, 16)])
@pytest.mark.parametrize("hq,hkv", [(32, 8), (16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_mixed_batch(d, block_size, hq, hkv, dtype):
    from mmkernels.triton_attention import paged_attention

    seq_lens, g = _long(12, seed=d + block_size + hq)
    # Half decode, half chunks of up to 300 tokens (some whole prompts) over a cached prefix.
    q_lens = [1 if i % 2 else int(torch.randint(1, min(s, 300) + 1, (1,), generator=g))
              for i, s in enumerate(seq_lens)]
    _check(paged_attention, seq_lens, q_lens, block_size=block_size, hq=hq, hkv=hkv, d=d,
           dtype=dtype, device="cuda", seed=d)


@pytest.mark.gpu
@compiled_only
@pytest.mark.parametrize("prefill_len", [128, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_prefill(prefill_len, dtype):
    from mmkernels.triton_attention import paged_attention

    seq_lens = [prefill_len, prefill_len // 2 + 3, 17]
    _check(paged_attention, seq_lens, seq_lens, hq=32, hkv=32, d=128, dtype=dtype,
           device="cuda", seed=prefill_len)


@pytest.mark.gpu
@compiled_only
@pytest.mark.parametrize("splits", [None, 1, 4, 16])
@pytest.mark.parametrize("n_seqs", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_decode_split_kv(splits, n_seqs, dtype):
    from mmkernels.triton_attention import paged_attention

    seq_lens, _ = _long(n_seqs, seed=n_seqs, max_len=5000)
    _check(paged_attention, seq_lens, [1] * n_seqs, hq=32, hkv=8, d=128, dtype=dtype,
           device="cuda", splits=splits, seed=n_seqs)


@pytest.mark.gpu
@compiled_only
def test_gpu_graph_replay_follows_device_lengths():
    """Captured once, the kernel must follow new seq_lens / tables written into the same buffers."""
    from mmkernels.triton_attention import paged_attention

    hq, hkv, d, bs = 32, 8, 128, 16
    # Captured on long contexts so the tables and the cache are wide enough for the replay batch.
    query, kv_cache, meta, _ = _batch([1200] * 4, [1] * 4, block_size=bs, hq=hq, hkv=hkv, d=d,
                                      dtype=torch.bfloat16, seed=1, device="cuda")
    meta.max_seq_len = 4096  # capture-time hints, as graphs.py would pass
    out = torch.empty_like(query)
    paged_attention(query, kv_cache, meta, d**-0.5, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(query, kv_cache, meta, d**-0.5, out=out)
    seq_lens = [5, 333, 64, 1000]
    new_q, new_cache, new_meta, ref_meta = _batch(seq_lens, [1] * 4, block_size=bs, hq=hq, hkv=hkv,
                                                  d=d, dtype=torch.bfloat16, seed=2, device="cuda")
    kv_cache[:, : new_cache.shape[1]].copy_(new_cache)
    query.copy_(new_q)
    meta.seq_lens.copy_(new_meta.seq_lens)
    meta.block_tables[:, : new_meta.block_tables.shape[1]].copy_(new_meta.block_tables)
    graph.replay()
    expected = reference.paged_attention(new_q.float().cpu(), new_cache.float().cpu(), ref_meta,
                                         d**-0.5)
    torch.testing.assert_close(out.float().cpu(), expected, **BF16_TOL)


@pytest.mark.gpu
@compiled_only
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("splits", [None, 4])
@pytest.mark.parametrize("n_seqs", [1, 64])
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (32, 32, 128), (4, 4, 16), (16, 16, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_decode_attention(rope, splits, n_seqs, hq, hkv, d, dtype):
    from mmkernels.triton_attention import decode_attention

    seq_lens, _ = _long(n_seqs, seed=n_seqs + d, max_len=3000)
    _check_decode(decode_attention, seq_lens, rope=rope, splits=splits, hq=hq, hkv=hkv, d=d,
                  dtype=dtype, seed=n_seqs + hq, pad_rows=3, device="cuda")
