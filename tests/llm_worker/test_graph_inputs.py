"""What the CUDA graphs replay, run eagerly on CPU through the Triton kernels (interpreted): the
mixed-step forward (`_mixed_logits`: fixed-hint graph metadata over every sequence slot, input
embeddings from the buffer) and the decode forward (`_decode_logits` with graph metadata, padded
rows, split-KV fixed) equal the eager step, and padding writes no KV. Only the capture itself
needs a GPU (tests/e2e/test_gpu_parity.py).

TRITON_INTERPRET is read once per process, so `test_interpreter_child` reruns the `interp`
cases of this file in a child pytest."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from interp_child import run_interpreter_cases

from llm_worker.runner import ModelRunner
from protocol.messages import Sampling
from protocol.step import CachedRequestData, NewRequestData, SchedulerOutput

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interp_only = pytest.mark.skipif(not INTERPRETED, reason="runs in test_interpreter_child")
PROMPTS = {"a": 5, "b": 9, "c": 17}  # 31 tokens: the 32-token mixed graph
BLOCKS = {"a": [1], "b": [2], "c": [3, 4]}


def test_interpreter_child():
    if INTERPRETED:
        pytest.skip("already under the interpreter")
    run_interpreter_cases(__file__, "test_interp_", kernels="triton")


def _kv_unchanged_but_real(kv, eager_kv, before) -> None:
    for a, b, old in zip(kv, eager_kv, before):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # the real rows' K/V
        untouched = (b == old).all(-1).all(-1)
        assert torch.equal(a[untouched], old[untouched])  # padding wrote nothing
        assert not a[:, 0].any()  # the null block stays zero


@interp_only
def test_interp_graph_forwards_equal_eager(tiny_llama):
    cfg = transformers.AutoConfig.from_pretrained(tiny_llama)
    r = ModelRunner(tiny_llama, cfg, device=torch.device("cpu"), dtype=torch.float32,
                    max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, block_size=16,
                    attention_backend="triton")
    r.init_kv_cache(16)
    r.embeds_buf = torch.zeros(32, r.model.hidden_size)
    gen = torch.Generator().manual_seed(0)
    new = [NewRequestData(rid, torch.randint(3, 100, (n,), generator=gen).tolist(), n,
                          Sampling(max_tokens=8, temperature=0.0), BLOCKS[rid], 0)
           for rid, n in PROMPTS.items()]
    r._update_states(SchedulerOutput(new, [], dict(PROMPTS), sum(PROMPTS.values())))
    bufs = r.inputs

    # A prefill step: eager, then as the mixed graph runs it.
    before = [c.clone() for c in r.kv_caches]
    batch = bufs.prepare(r.requests, dict(PROMPTS))
    bufs.upload(batch)
    eager = r._forward(batch)
    eager_kv = [c.clone() for c in r.kv_caches]
    for c, b in zip(r.kv_caches, before):
        c.copy_(b)
    batch = bufs.prepare(r.requests, dict(PROMPTS))
    bufs.pad_mixed(batch, 32)
    bufs.upload(batch)
    r._embed(batch, r.embeds_buf)
    torch.testing.assert_close(r._mixed_logits(32)[:3], eager, rtol=1e-4, atol=1e-4)
    _kv_unchanged_but_real(r.kv_caches, eager_kv, before)
    r._sample(batch, eager).result()  # every prompt takes its first token

    # A decode step: eager, then padded 3 -> 4 rows with graph metadata, one and two splits.
    cached = [CachedRequestData(rid, [], len(r.requests[rid].token_ids) - 1) for rid in PROMPTS]
    out = SchedulerOutput([], cached, dict.fromkeys(PROMPTS, 1), len(PROMPTS))
    r._update_states(out)
    before = [c.clone() for c in r.kv_caches]
    batch = bufs.prepare(r.requests, out.num_scheduled_tokens)
    assert batch.is_uniform_decode
    bufs.upload(batch)
    eager = r._forward(batch)
    eager_kv = [c.clone() for c in r.kv_caches]
    for splits in (1, 2):
        for c, b in zip(r.kv_caches, before):
            c.copy_(b)
        batch = bufs.prepare(r.requests, out.num_scheduled_tokens)
        bufs.pad_to(batch, 4)
        bufs.upload(batch)
        got = r._decode_logits(bufs.input_ids[:4], bufs.positions[:4], r._graph_metadata(4, splits))
        torch.testing.assert_close(got[:3], eager, rtol=1e-4, atol=1e-4)
        _kv_unchanged_but_real(r.kv_caches, eager_kv, before)
