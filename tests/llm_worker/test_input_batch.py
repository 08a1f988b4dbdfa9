"""The runner's input batch on CPU: padded decode rows (what a CUDA graph replays) change no real
row and write no KV, and the warm-up's dummy steps leave the cache as they found it."""

from __future__ import annotations

import pytest
import torch
import transformers

from llm_worker.runner import ModelRunner
from protocol.messages import Sampling
from protocol.step import CachedRequestData, NewRequestData, SchedulerOutput

BS = 16
PROMPTS = {"a": 5, "b": 9, "c": 17}  # c spans two blocks


@pytest.fixture
def runner(tiny_llama):
    cfg = transformers.AutoConfig.from_pretrained(tiny_llama)
    r = ModelRunner(tiny_llama, cfg, device=torch.device("cpu"), dtype=torch.float32,
                    max_model_len=64, max_num_seqs=8, max_num_batched_tokens=32, block_size=BS)
    r.init_kv_cache(16)
    return r


def _prefill(r: ModelRunner) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(0)
    blocks = {"a": [1], "b": [2], "c": [3, 4]}
    new = [NewRequestData(rid, torch.randint(3, 100, (n,), generator=gen).tolist(), n,
                          Sampling(max_tokens=8, temperature=0.0), blocks[rid], 0)
           for rid, n in PROMPTS.items()]
    out = SchedulerOutput(new, [], dict(PROMPTS), sum(PROMPTS.values()))
    assert set(r.execute(out).sampled_token_ids) == set(PROMPTS)
    return blocks


def _decode_step(r: ModelRunner) -> SchedulerOutput:
    cached = [CachedRequestData(rid, [], len(r.requests[rid].token_ids) - 1) for rid in PROMPTS]
    out = SchedulerOutput([], cached, dict.fromkeys(PROMPTS, 1), len(PROMPTS))
    r._update_states(out)
    return out


def test_padded_decode_rows_change_nothing(runner):
    _prefill(runner)
    out = _decode_step(runner)
    before = [c.clone() for c in runner.kv_caches]
    bufs = runner.inputs
    batch = bufs.prepare(runner.requests, out.num_scheduled_tokens)
    assert batch.is_uniform_decode
    bufs.upload(batch)
    eager = runner._forward(batch)  # [3, vocab]
    eager_kv = [c.clone() for c in runner.kv_caches]
    assert any(not torch.equal(a, b) for a, b in zip(before, eager_kv))  # the step wrote K/V

    for c, b in zip(runner.kv_caches, before):  # same step again, padded to a graph size
        c.copy_(b)
    batch = bufs.prepare(runner.requests, out.num_scheduled_tokens)
    bufs.pad_to(batch, 8)
    bufs.upload(batch)
    meta = runner.attn_backend.build_metadata(bufs, batch)
    padded = runner._decode_logits(bufs.input_ids[:8], bufs.positions[:8], meta)
    torch.testing.assert_close(padded[:3], eager, rtol=1e-5, atol=1e-5)
    for a, b, old in zip(runner.kv_caches, eager_kv, before):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # real rows: same K/V (rounding)
        untouched = (b == old).all(-1).all(-1)  # [2, blocks, block_size]: slots the step left
        assert torch.equal(a[untouched], old[untouched])  # the dummy rows wrote nothing
        assert not a[:, 0].any()  # the null block stays zero


def test_warm_up_leaves_cache_and_outputs_alone(runner, tiny_llama):
    _prefill(runner)
    out = _decode_step(runner)
    kv = [c.clone() for c in runner.kv_caches]
    runner.warm_up()
    for a, b in zip(runner.kv_caches, kv):
        assert torch.equal(a, b)
    got = runner._sample(batch := runner.inputs.prepare(runner.requests, out.num_scheduled_tokens),
                         (runner.inputs.upload(batch), runner._forward(batch))[1]).result()
    assert set(got.sampled_token_ids) == set(PROMPTS)


def test_graph_sizes_and_split_buckets(runner):
    from llm_worker.graphs import DecodeGraphs, capture_sizes, split_buckets

    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_sizes(12) == [1, 2, 4, 8, 12] and capture_sizes(1) == [1]
    assert capture_sizes(256, max_num_tokens=32) == [1, 2, 4, 8, 16, 24, 32]
    assert split_buckets(1) == [1] and split_buckets(12) == [1, 2, 4, 8]
    # A heuristic like the kernel's: many splits for small batches, capped by context length.
    graphs = DecodeGraphs(runner.inputs, runner._decode_logits, runner._graph_metadata,
                          capture_sizes(8), lambda n, ctx: max(1, min(16 // n, ctx // 256)), 4096)
    assert graphs.buckets == {1: [1, 2, 4, 8, 16], 2: [1, 2, 4, 8], 4: [1, 2, 4], 8: [1, 2]}
    assert graphs.padded_size(3) == 4 and graphs.padded_size(9) is None
    assert graphs.num_splits(1, 128) == 1  # a short context: no empty splits to merge
    assert graphs.num_splits(1, 3 * 256) == 2  # 3 wanted, 2 captured
    assert graphs.num_splits(2, 4096) == 8


def test_padded_mixed_step_changes_nothing(runner):
    """A prefill step padded as a mixed graph pads it (31 tokens -> 32, every sequence slot,
    the spare one owning the padding): the sampled rows' logits and the KV match the eager
    step; the padding writes nothing."""
    blocks = {"a": [1], "b": [2], "c": [3, 4]}
    gen = torch.Generator().manual_seed(0)
    new = [NewRequestData(rid, torch.randint(3, 100, (n,), generator=gen).tolist(), n,
                          Sampling(max_tokens=8, temperature=0.0), blocks[rid], 0)
           for rid, n in PROMPTS.items()]
    runner._update_states(SchedulerOutput(new, [], dict(PROMPTS), sum(PROMPTS.values())))
    bufs, before = runner.inputs, [c.clone() for c in runner.kv_caches]
    batch = bufs.prepare(runner.requests, dict(PROMPTS))
    bufs.upload(batch)
    eager = runner._forward(batch)  # [3, vocab]
    eager_kv = [c.clone() for c in runner.kv_caches]

    for c, b in zip(runner.kv_caches, before):
        c.copy_(b)
    batch = bufs.prepare(runner.requests, dict(PROMPTS))
    bufs.pad_mixed(batch, 32)
    assert batch.num_seqs == bufs.num_seq_slots == runner.max_num_seqs + 1
    bufs.upload(batch)
    embeds = torch.empty(32, runner.model.hidden_size)
    runner._embed(batch, embeds)
    meta = runner.attn_backend.build_metadata(bufs, batch)
    hidden = runner.model(None, bufs.positions[:32], runner.kv_caches, meta, inputs_embeds=embeds)
    padded = runner.model.compute_logits(hidden[bufs.sample_idx[: bufs.num_seq_slots]])
    torch.testing.assert_close(padded[:3], eager, rtol=1e-5, atol=1e-5)
    for a, b, old in zip(runner.kv_caches, eager_kv, before):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        untouched = (b == old).all(-1).all(-1)
        assert torch.equal(a[untouched], old[untouched])
        assert not a[:, 0].any()


def test_mixed_padding_longer_than_max_model_len(tiny_llama):
    """The spare slot reads one key per padding token: a step padded past max_model_len (5
    tokens -> 64, max_model_len 16) still finds every one of them in its block-table row, and
    the real row's logits match the unpadded step."""
    cfg = transformers.AutoConfig.from_pretrained(tiny_llama)
    r = ModelRunner(tiny_llama, cfg, device=torch.device("cpu"), dtype=torch.float32,
                    max_model_len=16, max_num_seqs=2, max_num_batched_tokens=64, block_size=BS)
    r.init_kv_cache(4)
    bufs = r.inputs
    assert bufs.block_tables.shape[1] * BS >= 64
    prompt = torch.randint(3, 100, (5,), generator=torch.Generator().manual_seed(1)).tolist()
    r._update_states(SchedulerOutput(
        [NewRequestData("a", prompt, 5, Sampling(max_tokens=4, temperature=0.0), [1], 0)],
        [], {"a": 5}, 5))
    batch = bufs.prepare(r.requests, {"a": 5})
    bufs.upload(batch)
    eager = r._forward(batch)
    batch = bufs.prepare(r.requests, {"a": 5})
    bufs.pad_mixed(batch, 64)
    bufs.upload(batch)
    embeds = torch.empty(64, r.model.hidden_size)
    r._embed(batch, embeds)
    meta = r.attn_backend.build_metadata(bufs, batch)
    hidden = r.model(None, bufs.positions[:64], r.kv_caches, meta, inputs_embeds=embeds)
    torch.testing.assert_close(r.model.compute_logits(hidden[bufs.sample_idx[:1]]), eager,
                               rtol=1e-5, atol=1e-5)
