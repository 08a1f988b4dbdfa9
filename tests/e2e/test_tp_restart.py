"""Acceptance 4 of issue 10 over real HTTP: `mmserve serve -tp 2 --executor mp`, one TP worker
SIGKILLed mid-request. The request gets a 5xx within seconds, /health answers 503 saying the
decoder group is down and /metrics says so too; the engine starts a new group, /health is 200
again and the same greedy tokens come back as before the kill."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_utils import Server, alive, children_of, cmdline, get, metric

pytestmark = pytest.mark.slow

PROMPT = list(range(5, 45))  # token ids: two full KV blocks, so a stale prefix cache would show
RESTART_S = 120  # the new group: two interpreters start, load the shards, join gloo, warm up


def _workers(srv: Server) -> list[int]:
    """The engine's TP worker processes (the `mp` executor's children)."""
    engine = srv.child("llm-worker")
    return sorted(p for p in children_of(engine) if "llm_worker.worker_loop" in cmdline(p))


def _labelled(base: str, name: str) -> float:
    """The value of the family ``name``'s one sample (mmserve: families carry model_name)."""
    _, body = get(base + "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def _wait(what, timeout_s: float, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(poll_s)
    return None


def test_killed_tp_worker_fails_fast_and_the_group_comes_back(tiny_llama):
    srv = Server(tiny_llama, "-tp", "2", "--executor", "mp", "--max-model-len", "2048",
                 timeout=180)
    client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0,
                           timeout=60)
    try:
        model = client.models.list().data[0].id

        def greedy(max_tokens: int = 8) -> list[str]:
            r = client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens,
                                          temperature=0, logprobs=1,
                                          extra_body={"ignore_eos": True})
            return r.choices[0].logprobs.tokens

        before = greedy()
        assert len(before) == 8
        workers = _workers(srv)
        assert len(workers) == 2, workers
        assert _labelled(srv.base, "mmserve:executor_healthy") == 1
        steps = metric(srv.base, "mmserve_num_steps")

        failed: dict[str, float] = {}

        def long_request() -> None:
            try:
                greedy(1500)  # ~10 s of decode steps: still running when the worker dies
            except openai.APIStatusError as e:
                failed["status"], failed["at"] = e.status_code, time.monotonic()

        t = threading.Thread(target=long_request, daemon=True)
        t.start()
        assert _wait(lambda: metric(srv.base, "mmserve_num_running") >= 1
                     and metric(srv.base, "mmserve_num_steps") > steps + 5, 30)
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        t.join(15)
        assert not t.is_alive(), "the in-flight request hung on the dead group"
        assert 500 <= failed["status"] < 600 and failed["at"] - killed < 5, failed

        # Down: /health names the decoder group, the gauges drop, new requests fail at once.
        def down():
            status, body = get(srv.base + "/health")
            return status == 503 and json.loads(body)
        health = _wait(down, 5)
        assert health and health["status"] == "group_down", health
        assert "tensor-parallel group is down" in health["engine"]["reason"], health
        assert _labelled(srv.base, "mmserve:executor_healthy") == 0
        assert metric(srv.base, "mmserve_engine_healthy") == 0
        assert _labelled(srv.base, "mmserve:executor_restarts_total") == 0
        sent = time.monotonic()
        with pytest.raises(openai.APIStatusError) as refused:
            greedy()
        assert refused.value.status_code == 503 and time.monotonic() - sent < 2
        assert not alive(workers[0])  # the survivor was stopped with its group

        # Back: a new group (new processes), /health 200, the restart counted, same tokens.
        assert _wait(lambda: get(srv.base + "/health")[0] == 200, RESTART_S, 0.5)
        health = json.loads(get(srv.base + "/health")[1])
        assert health["status"] == "ready" and health["engine"]["reason"] is None, health
        assert health["engine"]["executor_restarts"] == 1, health
        assert _labelled(srv.base, "mmserve:executor_restarts_total") == 1
        assert _labelled(srv.base, "mmserve:executor_healthy") == 1
        new = _workers(srv)
        assert len(new) == 2 and not set(new) & set(workers), (new, workers)
        assert greedy() == before
    finally:
        srv.stop()
