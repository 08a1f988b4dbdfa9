"""Scheduler: token budget, chunked prefill, preemption by recompute, stops, aborts, mm hook.

The fake runner below only sees the scheduler's deltas. It "computes" each position's KV as a
fingerprint of the previous position's KV (read back through the block table), the token and
the mm item there, and samples from the last fingerprint. So a token depends on the whole
history *as stored in the paged cache*: a wrong block table, a stale or wrongly shared block, or
a lost delta changes the output, and the tiny-cache run can't match the huge-cache run.
"""

from __future__ import annotations

import random
import time
import zlib
from dataclasses import dataclass

import pytest

from llm_worker.kv_blocks import KVBlockManager
from llm_worker.request import Request, RequestStatus
from llm_worker.scheduler import Scheduler, SchedulerConfig
from protocol.messages import MMItem, Sampling
from protocol.step import ModelRunnerOutput, NewRequestData, SchedulerOutput

VOCAB = 97
MOD = (1 << 61) - 1


@dataclass
class _St:
    tokens: list[int]
    num_prompt: int
    blocks: list[int]
    computed: int
    mm: list[MMItem]


class FakeRunner:
    def __init__(
        self, num_blocks: int, block_size: int, script: dict[str, list[int]] | None = None
    ):
        self.bs = block_size
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.state: dict[str, _St] = {}
        self.script = script or {}
        self.new_log: list[NewRequestData] = []

    def _slot(self, st: _St, p: int) -> tuple[int, int]:
        return st.blocks[p // self.bs], p % self.bs

    def _fingerprint(self, st: _St, p: int) -> int:
        prev = 0
        if p:
            b, o = self._slot(st, p - 1)
            prev = self.kv[b][o]
            assert prev is not None, "read KV that was never written"
        mm = 0
        for item in st.mm:
            if item.offset <= p < item.offset + item.length:
                mm = zlib.crc32(item.key.encode()) + (p - item.offset)
        return (prev * 1_000_003 + st.tokens[p] * 31 + mm + 1) % MOD

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for rid in out.finished_request_ids:
            self.state.pop(rid, None)
        for new in out.new_requests:
            self.new_log.append(new)
            self.state[new.request_id] = _St(
                list(new.token_ids), new.num_prompt_tokens, list(new.block_ids),
                new.num_computed_tokens, list(new.mm_items),
            )  # fmt: skip
        for c in out.cached_requests:
            st = self.state[c.request_id]
            assert c.num_computed_tokens == st.computed  # the delta agrees with the worker
            st.blocks += c.new_block_ids
        sampled = {}
        for rid, n in out.num_scheduled_tokens.items():
            st = self.state[rid]
            assert 0 not in st.blocks  # the null block is never handed out
            for p in range(st.computed, st.computed + n):
                b, o = self._slot(st, p)
                self.kv[b][o] = self._fingerprint(st, p)
            st.computed += n
            if st.computed == len(st.tokens):
                b, o = self._slot(st, st.computed - 1)
                tok = self.kv[b][o] % VOCAB
                if rid in self.script:
                    tok = self.script[rid][len(st.tokens) - st.num_prompt]
                st.tokens.append(tok)
                sampled[rid] = tok
        return ModelRunnerOutput(sampled)


def make(num_blocks=64, bs=16, max_num_seqs=8, budget=64, max_model_len=256, prefix=True,
         script=None, ready=None, min_partial_prefill=0):  # fmt: skip
    cfg = SchedulerConfig(max_num_seqs, budget, max_model_len, block_size=bs,
                          min_partial_prefill=min_partial_prefill)
    sched = Scheduler(cfg, KVBlockManager(num_blocks, bs, prefix), embeddings_ready=ready)
    return sched, FakeRunner(num_blocks, bs, script)


def step(sched: Scheduler, runner: FakeRunner, outputs: dict[str, list[int]] | None = None):
    out = sched.schedule()
    cfg = sched.config
    assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
    assert out.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
    assert len(out.num_scheduled_tokens) <= cfg.max_num_seqs
    assert sched.num_running <= cfg.max_num_seqs
    if out.preempted_request_ids:  # memory is tight: nobody is admitted in the same step
        assert not out.new_requests
        newest_kept = max((r.arrival_order for r in sched.running), default=-1)
        assert all(sched.requests[r].arrival_order > newest_kept for r in out.preempted_request_ids)
    if outputs is not None:
        for new in out.new_requests:  # a resumed request carries prompt + outputs so far
            req = sched.requests[new.request_id]
            assert new.token_ids == req.prompt_token_ids + outputs.get(new.request_id, [])
    res = sched.update_from_output(out, runner.execute(out))
    if outputs is not None:
        for t in res:
            outputs.setdefault(t.request_id, []).extend(t.new_token_ids)
    return out, res


def drain(sched: Scheduler, runner: FakeRunner, outputs=None, max_steps: int = 1000) -> list:
    """Step until every request finished; a scheduler that stops making progress fails here."""
    steps = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return steps
        steps.append(step(sched, runner, outputs))
    raise AssertionError(f"no progress after {max_steps} steps: {list(sched.requests.values())}")


def req(rid, prompt, max_tokens=8, eos=(), mm=None, **kw) -> Request:
    return Request(
        rid, prompt, Sampling(max_tokens=max_tokens, **kw), eos_token_ids=eos, mm_items=mm
    )


def test_budget_respected_and_long_prompt_chunked():
    sched, runner = make(budget=32)
    sched.add_request(req("long", list(range(100)), max_tokens=3))
    outs = [step(sched, runner) for _ in range(3)]
    sched.add_request(req("short", [1, 2, 3], max_tokens=2))
    outs += drain(sched, runner)
    sizes = [o.num_scheduled_tokens.get("long") for o, _ in outs]
    assert sizes[:4] == [32, 32, 32, 4]  # 4 left + "short"'s 3 tokens share the 4th step
    assert outs[3][0].num_scheduled_tokens == {"long": 4, "short": 3}  # running first
    assert [r for o in outs[:3] for r in o[1]] == []  # no token before the prompt is done
    assert [t.request_id for t in outs[3][1]] == ["long", "short"]


def test_max_num_seqs_respected():
    sched, runner = make(max_num_seqs=2, budget=512)
    for i in range(5):
        sched.add_request(req(f"r{i}", [i + 1] * 5, max_tokens=3))
    out, _ = step(sched, runner)
    assert [n.request_id for n in out.new_requests] == ["r0", "r1"]
    assert sched.num_running == 2 and sched.num_waiting == 3
    drain(sched, runner)  # asserts the limit every step
    assert sched.stats().num_steps > 3


def _workload(seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    shared = [rng.randrange(VOCAB) for _ in range(40)]
    reqs = []
    for i in range(16):
        n = rng.randrange(5, 60)
        prompt = (shared[: rng.randrange(17, 41)] if i % 3 == 0 else []) + [
            rng.randrange(VOCAB) for _ in range(n)
        ]
        mm = None
        if i % 4 == 1:  # shared placeholder tokens, images from a small set of keys
            prompt = [1, 2, 3] + [5] * 20 + prompt  # same tokens for every image
            mm = [MMItem(key=f"blake3:{i // 4 % 2}", modality="image", offset=3, length=20)]
        reqs.append(req(f"r{i}", prompt[:90], max_tokens=rng.randrange(5, 35), mm=mm))
    return reqs


def _run(**kw) -> tuple[dict[str, list[int]], Scheduler]:
    sched, runner = make(max_model_len=128, **kw)
    reqs, outputs = _workload(), {}
    for r in reqs[:8]:
        sched.add_request(r)
    for i in range(2000):
        if i == 5:
            for r in reqs[8:]:
                sched.add_request(r)
        if i > 5 and not sched.has_unfinished_requests():
            break
        step(sched, runner, outputs)
    assert not sched.has_unfinished_requests()
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks
    return outputs, sched


def test_preemption_by_recompute_gives_the_same_outputs():
    want, big = _run(num_blocks=2000, prefix=False)
    assert big.num_preemptions == 0
    got, tiny = _run(num_blocks=12, budget=48)  # 11 usable blocks of 16 tokens
    assert tiny.num_preemptions > 0
    assert tiny.kv.prefix_cache_hits > 0
    assert got == want
    assert all(len(v) >= 5 for v in got.values()) and len(got) == 16


def test_resumed_request_is_sent_again_with_prompt_and_outputs():
    sched, runner = make(num_blocks=5, bs=4, budget=64, max_model_len=16)
    a, b = req("a", [1, 2, 3, 4, 5, 6], max_tokens=8), req("b", [9, 8, 7, 6, 5, 4], max_tokens=8)
    for r in (a, b, req("c", [3] * 6, max_tokens=2)):  # "c" waits: the cache holds a and b
        sched.add_request(r)
    outputs: dict[str, list[int]] = {}
    for _ in range(20):  # both fit until "a" needs a third block for its 9th token
        out, _ = step(sched, runner, outputs)
        if out.preempted_request_ids:
            break
    assert out.preempted_request_ids == {"b"}  # the newest goes, never the oldest
    assert b.status == RequestStatus.PREEMPTED and b.block_ids == []
    assert [r.request_id for r in sched.waiting] == ["b", "c"]  # ahead of younger requests
    preempted_at = list(outputs["b"])
    assert preempted_at and b.num_computed_tokens == 0
    drain(sched, runner, outputs)
    resumed = [n for n in runner.new_log if n.request_id == "b"][1]
    assert resumed.token_ids == b.prompt_token_ids + preempted_at
    assert resumed.num_prompt_tokens == 6
    assert len(outputs["a"]) == len(outputs["b"]) == 8 and len(outputs["c"]) == 2


def test_abort_frees_blocks_and_is_reported():
    sched, runner = make()
    sched.add_request(req("a", list(range(40)), max_tokens=50))
    sched.add_request(req("b", list(range(50, 90)), max_tokens=50))
    for _ in range(3):
        step(sched, runner)
    free_before, a_blocks = sched.kv.num_free_blocks, len(sched.requests["a"].block_ids)
    sched.add_request(req("w", [1, 2, 3]))
    (a,) = sched.abort_requests(["a", "nope"])
    assert a.status == RequestStatus.FINISHED_ABORTED and a.finish_reason == "abort"
    assert a.block_ids == [] and sched.kv.num_free_blocks == free_before + a_blocks
    assert [r.request_id for r in sched.abort_requests(["w"])] == ["w"]  # waiting one too
    out = sched.schedule()
    assert out.finished_request_ids == {"a", "w"} and set(out.num_scheduled_tokens) == {"b"}
    sched.abort_requests(["b"])  # between schedule and update: its result is dropped
    assert sched.update_from_output(out, runner.execute(out)) == []
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks
    assert not sched.has_unfinished_requests() and sched.schedule().finished_request_ids == {"b"}


SCRIPT = [7, 50, 8, 9, 10, 11, 12, 13]


@pytest.mark.parametrize(
    "sampling, eos, max_model_len, want, reason, stop_id",
    [
        ({"max_tokens": 8}, [50], 256, [7, 50], "stop", 50),
        ({"max_tokens": 4, "ignore_eos": True}, [50], 256, [7, 50, 8, 9], "length", None),
        ({"max_tokens": 8, "stop_token_ids": [8]}, [], 256, [7, 50, 8], "stop", 8),
        ({"max_tokens": 8, "min_tokens": 3}, [50, 8], 256, [7, 50, 8], "stop", 8),
        ({"max_tokens": 8, "min_tokens": 2}, [50], 256, [7, 50], "stop", 50),
        ({"max_tokens": 3}, [], 256, [7, 50, 8], "length", None),
        ({"max_tokens": 8}, [], 6, [7, 50, 8], "length", None),  # 3 prompt + 3 = max_model_len
    ],
)
def test_finish_reasons(sampling, eos, max_model_len, want, reason, stop_id):
    sched, runner = make(max_model_len=max_model_len, script={"x": SCRIPT})
    sched.add_request(req("x", [1, 2, 3], eos=eos, **sampling))
    res = [t for _, r in drain(sched, runner) for t in r]
    assert [t.new_token_ids[0] for t in res] == want
    assert [t.finish_reason for t in res] == [None] * (len(want) - 1) + [reason]
    assert res[-1].stop_token_id == stop_id
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks


def test_num_cached_tokens_on_first_output_only():
    sched, runner = make()
    sched.add_request(req("a", list(range(40)), max_tokens=2))
    drain(sched, runner)
    sched.add_request(req("b", list(range(36)) + [99], max_tokens=3))
    res = [t for _, r in drain(sched, runner) for t in r]
    assert [t.num_cached_tokens for t in res] == [32, 0, 0]
    assert sched.stats().prefix_cache_hits == 32


def test_queue_seconds_from_arrival_to_first_schedule_on_first_output_only(monkeypatch):
    now = [100.0]  # the engine's monotonic clock, moved by hand
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    sched, runner = make(max_num_seqs=1)
    sched.add_request(req("a", [1, 2, 3], max_tokens=2))
    sched.add_request(req("b", [4, 5], max_tokens=2))  # waits for a's only seat
    outs = []
    for t in (101.0, 103.0, 107.0, 108.0):
        now[0] = t
        outs += step(sched, runner)[1]
    assert [(o.request_id, o.queue_seconds) for o in outs] == [
        ("a", 1.0), ("a", None), ("b", 7.0), ("b", None)]


def test_waiting_for_embeddings_prefills_text_before_the_item():
    ready: set[str] = set()
    sched, runner = make(max_num_seqs=2, ready=ready.__contains__)
    item = MMItem(key="uuid:k", modality="image", offset=20, length=10)
    sched.add_request(req("a", list(range(40)), mm=[item]))
    sched.add_request(req("c", [5] * 8 + [1], mm=[MMItem("uuid:k2", "image", 0, 8)]))
    sched.add_request(req("b", list(range(10))))
    sched.add_request(req("d", [1, 2]))  # max_num_seqs=2: waits behind "c"
    assert sched.requests["a"].status == RequestStatus.WAITING_FOR_EMBEDDINGS
    out, res = step(sched, runner)
    assert out.num_scheduled_tokens == {"a": 20, "b": 10}  # "c" steps aside, not blocking "b"
    assert [t.request_id for t in res] == ["b"]
    assert [r.request_id for r in sched.waiting] == ["c", "d"]  # "c" kept its place
    out, _ = step(sched, runner)
    assert "a" not in out.num_scheduled_tokens  # stalled on the embedding
    ready.add("uuid:k")
    out, res = step(sched, runner)
    assert out.num_scheduled_tokens["a"] == 20 and "a" in {t.request_id for t in res}
    assert sched.request_ready(sched.requests["c"]) == 0


def test_short_text_before_a_missing_item_waits_for_it():
    """Under min_partial_prefill, the text before an item being encoded is not prefilled on
    its own (a step of its own would cost a whole weight read); at or past it, it is. Once the
    embedding arrives, the whole prompt goes in one chunk."""
    ready: set[str] = set()
    sched, runner = make(ready=ready.__contains__, min_partial_prefill=16, budget=128)
    sched.add_request(req("short", list(range(40)), mm=[MMItem("uuid:s", "image", 15, 10)]))
    sched.add_request(req("long", list(range(40)), mm=[MMItem("uuid:l", "image", 16, 10)]))
    out, _ = step(sched, runner)
    assert out.num_scheduled_tokens == {"long": 16}
    assert sched.requests["short"].status == RequestStatus.WAITING_FOR_EMBEDDINGS
    out, _ = step(sched, runner)
    assert out.num_scheduled_tokens == {}  # both stalled: no step at all
    ready.update({"uuid:s", "uuid:l"})
    out, _ = step(sched, runner)
    assert out.num_scheduled_tokens == {"long": 24, "short": 40}
    assert SchedulerConfig(4, 64, 128).min_partial_prefill == 64  # the default defers


def test_config_validation():
    with pytest.raises(ValueError):
        SchedulerConfig(0, 64, 128)
    with pytest.raises(ValueError):
        SchedulerConfig(4, 64, 128, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="min_partial_prefill"):
        SchedulerConfig(4, 64, 128, min_partial_prefill=-1)
    with pytest.raises(ValueError, match="max_model_len"):
        Scheduler(SchedulerConfig(4, 64, 128), KVBlockManager(8, 16))  # 7 * 16 < 128
    sched = Scheduler(SchedulerConfig(4, 64, 128), KVBlockManager(9, 16))
    with pytest.raises(ValueError):
        sched.add_request(req("x", [1] * 129))
