"""A TP worker that dies fails its group at once: the in-flight request ends with an error within
seconds (never a hang, whichever rank died: rank 0 answers the steps, rank 1 leaves rank 0 inside
a collective), the surviving worker is stopped, and requests that come while the group is down
fail at once too (503). The heartbeats say the group is down; the engine starts a new group and,
once it is up, serves the same greedy tokens as before. Under `mp` the worker process is
SIGKILLed; under `ray` its actor is killed."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import sys
import threading
import time

import pytest
import zmq

from llm_worker.config import LLMWorkerConfig
from llm_worker.engine_proc import EngineCoreProc
from protocol.addresses import tcp
from protocol.messages import (
    ErrorMsg,
    GenerateRequest,
    Heartbeat,
    Hello,
    Sampling,
    Shutdown,
    TokenOutputs,
)
from protocol.sockets import Receiver, Sender

LONG = Sampling(max_tokens=1500, temperature=0.0, ignore_eos=True)  # ~10 s of decode steps
SHORT = Sampling(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = list(range(5, 45))  # two full KV blocks: a prefix cache hit if the engine kept them
RESTART_S = 120  # a new group: processes (actors) start, load the model, join gloo, warm up
RAY = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray not installed")


@pytest.fixture(scope="module", autouse=True)
def _ray_down():
    yield
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def _kill(executor, rank: int) -> None:
    if executor.config.executor == "ray":
        import ray

        ray.kill(executor.actors[rank])
    else:
        os.kill(executor.procs[rank].pid, signal.SIGKILL)


def _all_stopped(executor) -> bool:
    if executor.config.executor == "ray":
        import ray

        done, _ = ray.wait(executor.serving, num_returns=len(executor.serving), timeout=5)
        return not executor.actors and len(done) == len(executor.serving)
    return all(w.poll() is not None for w in executor.procs)


def _next(inbox: Receiver, kind: type, request_id: str, timeout_s: float):
    """The first ``kind`` message about ``request_id`` (None after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = inbox.recv(timeout_ms=50)
        if got is None:
            continue
        msg = got[0]
        if isinstance(msg, ErrorMsg) and msg.request_id == request_id:
            return msg if kind is ErrorMsg else None
        if kind is TokenOutputs and isinstance(msg, TokenOutputs):
            if any(o.request_id == request_id for o in msg.outputs):
                return msg
    return None


def _tokens(inbox: Receiver, request_id: str, timeout_s: float) -> list[int] | None:
    """Every token of ``request_id`` until it finishes (None on an error or a timeout)."""
    tokens: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = _next(inbox, TokenOutputs, request_id, deadline - time.monotonic())
        if msg is None:
            return None
        for o in msg.outputs:
            if o.request_id == request_id:
                tokens += o.new_token_ids
                if o.finish_reason is not None:
                    return tokens
    return None


def _beat_where(inbox: Receiver, pred, timeout_s: float) -> Heartbeat | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = inbox.recv(timeout_ms=50)
        if got is not None and isinstance(got[0], Heartbeat) and pred(got[0].stats):
            return got[0]
    return None


@contextlib.contextmanager
def _serving(config: LLMWorkerConfig):
    """An EngineCoreProc on a thread, and this test's sockets to it (Hello already sent)."""
    proc = EngineCoreProc(config, tcp())
    loop = threading.Thread(target=proc.run, daemon=True)
    loop.start()
    ctx = zmq.Context()
    inbox = Receiver(ctx, tcp())
    to_engine = Sender(ctx, proc.receiver.addr)
    try:
        to_engine.send(Hello(frontend_id="t", reply_to=inbox.addr))
        yield proc, inbox, to_engine
    finally:
        to_engine.send(Shutdown())
        loop.join(10)
        proc.core.shutdown()
        inbox.close()
        to_engine.close()
        ctx.term()
    assert not loop.is_alive()


def _tp2(model: str, executor: str) -> LLMWorkerConfig:
    return LLMWorkerConfig(model=model, max_model_len=1600, num_kv_blocks=128,
                           tensor_parallel_size=2, executor=executor)


@pytest.mark.slow
@pytest.mark.parametrize("executor, rank", [("mp", 0), ("mp", 1),
                                            pytest.param("ray", 1, marks=RAY)])
def test_killed_worker_fails_the_request_fast(tiny_llama, executor, rank):
    with _serving(_tp2(tiny_llama, executor)) as (proc, inbox, to_engine):
        group = proc.core.executor
        to_engine.send(GenerateRequest("r0", PROMPT, SHORT, [], inbox.addr))
        before = _tokens(inbox, "r0", 30)
        assert before is not None and len(before) == SHORT.max_tokens
        to_engine.send(GenerateRequest("r", [1, 2, 3], LONG, [], inbox.addr))
        assert _next(inbox, TokenOutputs, "r", 30) is not None  # decoding is under way
        _kill(group, rank)
        killed = time.monotonic()
        err = _next(inbox, ErrorMsg, "r", 10)
        assert err is not None and err.status == 500
        assert time.monotonic() - killed < 3
        # The group is gone as a whole: no worker is left waiting on its dead peer.
        assert _all_stopped(group)
        to_engine.send(GenerateRequest("r2", [4, 5], LONG, [], inbox.addr))
        sent = time.monotonic()
        err = _next(inbox, ErrorMsg, "r2", 10)
        assert err is not None and err.status == 503 and time.monotonic() - sent < 2
        assert _beat_where(inbox, lambda s: not s.executor_healthy, 2) is not None
        # A new group comes up (new workers), and serves what the old one did, token for token.
        assert _beat_where(inbox, lambda s: s.executor_healthy and s.executor_restarts == 1,
                           RESTART_S) is not None
        assert proc.core.executor is not group
        to_engine.send(GenerateRequest("r3", PROMPT, SHORT, [], inbox.addr))
        assert _tokens(inbox, "r3", 30) == before


@pytest.mark.slow
def test_a_worker_that_dies_while_idle_is_noticed_and_replaced(tiny_llama):
    """No request is there to find out: the idle busy loop checks the group, so the beats say
    it is down within a beat or two and a new group is started."""
    with _serving(_tp2(tiny_llama, "mp")) as (proc, inbox, to_engine):
        group = proc.core.executor
        assert _beat_where(inbox, lambda s: s.executor_healthy, 5) is not None
        _kill(group, 1)
        assert _beat_where(inbox, lambda s: not s.executor_healthy, 2) is not None
        assert _all_stopped(group)
        assert _beat_where(inbox, lambda s: s.executor_healthy and s.executor_restarts == 1,
                           RESTART_S) is not None
        to_engine.send(GenerateRequest("r", PROMPT, SHORT, [], inbox.addr))
        tokens = _tokens(inbox, "r", 30)
        assert tokens is not None and len(tokens) == SHORT.max_tokens


@pytest.mark.parametrize("executor, why", [("mp", "exited with code -9"),
                                           pytest.param("ray", "ended: .*ActorDied", marks=RAY)])
def test_a_dead_worker_is_noticed_without_any_reply(tiny_llama, executor, why):
    """No peer is left to report it (one worker, no collective): the wait for its output sees
    the worker gone (its process, its actor's serve() call), and every later call fails at once
    with the same cause."""
    from llm_worker.executor import ExecutorError, make_executor
    from protocol.step import SchedulerOutput

    group = make_executor(LLMWorkerConfig(model=tiny_llama, max_model_len=64, num_kv_blocks=16,
                                          executor=executor))
    try:
        group.init_kv_cache(group.num_available_blocks())
        _kill(group, 0)
        time.sleep(1.0)  # dead before the step is sent: nobody will ever answer it
        started = time.monotonic()
        step = SchedulerOutput.empty(finished_request_ids={"gone"})
        with pytest.raises(ExecutorError, match=why):
            group.execute(step)
        assert time.monotonic() - started < 2
        with pytest.raises(ExecutorError, match=why):
            group.execute(step)
    finally:
        group.shutdown()


@pytest.mark.slow
def test_a_hung_worker_fails_its_group_after_the_worker_timeout(tiny_llama):
    """A stopped worker (SIGSTOP: alive to its parent, so no death to see) leaves rank 0 inside
    a collective. Its heartbeats stop, so the group fails after tp_worker_timeout_s instead of
    the 10-minute collective timeout; the request gets a 500 and a new group takes over."""
    import dataclasses

    config = dataclasses.replace(_tp2(tiny_llama, "mp"), tp_worker_timeout_s=3.0)
    with _serving(config) as (proc, inbox, to_engine):
        group = proc.core.executor
        to_engine.send(GenerateRequest("r", [1, 2, 3], LONG, [], inbox.addr))
        assert _next(inbox, TokenOutputs, "r", 30) is not None  # decoding is under way
        time.sleep(4.0)  # longer than the timeout: a busy group is not a hung one
        assert proc.core.executor is group and group.error is None
        os.kill(group.procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        err = _next(inbox, ErrorMsg, "r", 15)
        assert err is not None and err.status == 500
        assert 3.0 <= time.monotonic() - stopped < 8
        assert "no heartbeat" in (group.error or "")
        assert _all_stopped(group)  # the stopped process is killed with the rest
        assert _beat_where(inbox, lambda s: s.executor_healthy and s.executor_restarts == 1,
                           RESTART_S) is not None
        to_engine.send(GenerateRequest("r2", PROMPT, SHORT, [], inbox.addr))
        tokens = _tokens(inbox, "r2", 30)
        assert tokens is not None and len(tokens) == SHORT.max_tokens
