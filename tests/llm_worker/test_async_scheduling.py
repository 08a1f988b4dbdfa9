"""Asynchronous scheduling (step N+1 scheduled and queued before step N's ids are read) gives
the same tokens as synchronous steps, whatever the step mix: arrivals mid-stream, stop ids,
max_tokens, seeded sampling, penalties, min_tokens, logprobs, chunked prefill, preemption,
aborts, media. On CPU the device work is not overlapped, but every host path is the same: the
pending-token rows, the device fill of the next step's inputs, the late landing of ids."""

from __future__ import annotations

import pytest

from llm_worker.config import LLMWorkerConfig
from llm_worker.engine import EngineCore
from protocol.messages import GenerateRequest, Sampling


def prompt(seed: int, n: int) -> list[int]:
    return [3 + (seed * 7919 + i * 104729) % 300 for i in range(n)]


def drive(core: EngineCore, arrivals: dict[int, list[GenerateRequest]],
          aborts: dict[int, list[str]] | None = None, max_steps: int = 400) -> dict:
    """Step until idle; requests join (and are aborted) at the given step numbers. Returns
    request id -> (token ids, finish reason, logprobs)."""
    got: dict[str, tuple[list[int], str | None, list]] = {}
    for step in range(max_steps):
        for msg in arrivals.get(step, []):
            assert core.add_request(msg) is None
            got[msg.request_id] = ([], None, [])
        core.abort((aborts or {}).get(step, []))
        for o in core.step():
            toks, _, lps = got[o.request_id]
            toks.extend(o.new_token_ids)
            lps.extend(o.logprobs or [])
            got[o.request_id] = (toks, o.finish_reason, lps)
        if step > max(arrivals) and not core.has_work():
            return got
    raise AssertionError("the engine did not go idle")


def both(path: str, scenario, **cfg) -> tuple[dict, dict, EngineCore]:
    out = {}
    for mode in ("off", "on"):
        core = EngineCore(LLMWorkerConfig(model=path, device="cpu", dtype="float32",
                                          async_scheduling=mode, **cfg))
        out[mode] = scenario(core)
        if mode == "on":
            return out["off"], out["on"], core
        core.shutdown()


def greedy(n: int, **kw) -> Sampling:
    return Sampling(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def req(rid: str, seed: int, n: int, sampling: Sampling) -> GenerateRequest:
    return GenerateRequest(rid, prompt(seed, n), sampling, [2], "")


def test_async_equals_sync_over_a_mixed_workload(tiny_llama):
    # Find a token the sync run emits mid-stream, so a stop id ends a request while the next
    # step (already scheduled) holds it.
    probe, _, core = both(tiny_llama, lambda c: drive(c, {0: [req("p", 1, 9, greedy(12))]}))
    core.shutdown()
    stop_id = probe["p"][0][5]
    arrivals = {
        0: [req("a", 1, 9, greedy(12, stop_token_ids=[stop_id])),
            req("b", 2, 30, greedy(20)),
            req("c", 3, 5, Sampling(max_tokens=16, temperature=0.9, top_p=0.9, top_k=40,
                                    seed=7, ignore_eos=True))],
        3: [req("d", 4, 40, greedy(10, repetition_penalty=1.3, frequency_penalty=0.4)),
            req("e", 5, 7, greedy(6, logprobs=3))],
        4: [req("f", 6, 12, Sampling(max_tokens=9, temperature=0.0, min_tokens=6,
                                     stop_token_ids=[stop_id]))],
        9: [req("g", 7, 3, greedy(1)), req("h", 8, 18, greedy(15))],
    }
    sync, asyn, core = both(tiny_llama, lambda c: drive(c, arrivals, {6: ["b"]}),
                            max_num_batched_tokens=32)
    runner = core.executor.worker.runner
    core.shutdown()
    # An abort lands between steps: asynchronously, the step before it has not been applied
    # yet, so one token fewer reached the caller; what did is the same.
    cut = asyn.pop("b")[0]
    assert cut == sync["b"][0][: len(cut)] and len(sync["b"][0]) - len(cut) <= 1
    assert asyn == {k: v for k, v in sync.items() if k != "b"}
    assert sync["a"][1] == "stop" and sync["a"][0][-1] == stop_id
    assert sync["b"][1] is None  # aborted at step 6: no finished output
    assert sync["c"][1] == "length" and len(sync["c"][0]) == 16
    assert len(sync["e"][2]) == 6 and sync["g"][0] and len(sync["h"][0]) == 15
    assert not runner.in_flight  # every step's ids landed


def test_async_steps_overlap_and_read_ids_on_the_device(tiny_llama):
    core = EngineCore(LLMWorkerConfig(model=tiny_llama, device="cpu", dtype="float32",
                                      async_scheduling="on"))
    runner = core.executor.worker.runner
    fills = []
    upload = runner._upload
    runner._upload = lambda batch: (fills.append(len(batch.pending)), upload(batch))[1]
    try:
        for i in range(3):
            core.add_request(req(f"r{i}", i, 6, greedy(5)))
        assert core.step() == []  # the prefill is in flight; nothing applied yet
        assert len(core.in_flight) == 1
        outs = core.step()  # the first decode goes out, then the prefill's ids come back
        assert [len(o.new_token_ids) for o in outs] == [1, 1, 1]
        assert len(core.in_flight) == 1 and fills[-1] == 3  # its inputs are the pending ids
        while core.has_work():
            core.step()
        # 5 tokens each: 1 prefill + 4 decodes, none scheduled past max_tokens.
        assert core.scheduler.num_steps == 5
        assert all(s.num_pending == 0 for s in runner.requests.values())
    finally:
        core.shutdown()


def test_async_preemption_keeps_the_token_in_flight(tiny_llama):
    # 6 blocks of 16 for 4 requests growing past a block each: preemption while steps fly.
    arrivals = {0: [req(f"p{i}", i, 14, greedy(24)) for i in range(4)]}
    sync, asyn, core = both(tiny_llama, lambda c: drive(c, arrivals), num_kv_blocks=7,
                            max_model_len=64)
    preempted = core.scheduler.num_preemptions
    core.shutdown()
    assert preempted > 0
    assert asyn == sync
    assert all(len(v[0]) == 24 for v in sync.values())


@pytest.mark.parametrize("mode,expect", [("auto", False), ("on", True), ("off", False)])
def test_async_scheduling_flag(tiny_llama, mode, expect):
    cfg = LLMWorkerConfig(model=tiny_llama, device="cpu", async_scheduling=mode)
    assert cfg.resolved_async_scheduling() is expect
    with pytest.raises(ValueError, match="async_scheduling"):
        LLMWorkerConfig(model=tiny_llama, async_scheduling="yes")
