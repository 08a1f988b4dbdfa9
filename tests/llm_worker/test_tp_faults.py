"""A TP worker that dies fails its group at once: the in-flight request ends with an error within
seconds (never a hang, whichever rank died: rank 0 answers the steps, rank 1 leaves rank 0 inside
a collective), the surviving worker is stopped, and later requests fail at once too."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import zmq

from llm_worker.config import LLMWorkerConfig
from llm_worker.engine import EngineCoreProc
from protocol.addresses import tcp
from protocol.messages import ErrorMsg, GenerateRequest, Hello, Sampling, Shutdown, TokenOutputs
from protocol.sockets import Receiver, Sender

LONG = Sampling(max_tokens=1500, temperature=0.0, ignore_eos=True)  # ~10 s of decode steps


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


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_killed_worker_fails_the_request_fast(tiny_llama, rank):
    config = LLMWorkerConfig(model=tiny_llama, max_model_len=1600, num_kv_blocks=128,
                             tensor_parallel_size=2, executor="mp")
    proc = EngineCoreProc(config, tcp())
    workers = proc.core.executor.procs
    loop = threading.Thread(target=proc.run, daemon=True)
    loop.start()
    ctx = zmq.Context()
    inbox = Receiver(ctx, tcp())
    to_engine = Sender(ctx, proc.receiver.addr)
    try:
        to_engine.send(Hello(frontend_id="t", reply_to=inbox.addr))
        to_engine.send(GenerateRequest("r", [1, 2, 3], LONG, [], inbox.addr))
        assert _next(inbox, TokenOutputs, "r", 30) is not None  # decoding is under way
        os.kill(workers[rank].pid, signal.SIGKILL)
        killed = time.monotonic()
        err = _next(inbox, ErrorMsg, "r", 10)
        assert err is not None and err.status == 500
        assert time.monotonic() - killed < 3
        # The group is gone as a whole: no worker is left waiting on its dead peer.
        assert all(w.poll() is not None for w in workers)
        to_engine.send(GenerateRequest("r2", [4, 5], LONG, [], inbox.addr))
        sent = time.monotonic()
        err = _next(inbox, ErrorMsg, "r2", 10)
        assert err is not None and err.status == 500 and time.monotonic() - sent < 2
    finally:
        to_engine.send(Shutdown())
        loop.join(10)
        proc.core.shutdown()
        inbox.close()
        to_engine.close()
        ctx.term()
    assert not loop.is_alive()


def test_a_dead_worker_is_noticed_without_any_reply(tiny_llama):
    """No peer is left to report it (one worker, no collective): the wait for its output sees
    the process gone, and every later call fails at once with the same cause."""
    from llm_worker.executor import ExecutorError
    from llm_worker.executor.mp import MPExecutor
    from protocol.step import SchedulerOutput

    executor = MPExecutor(LLMWorkerConfig(model=tiny_llama, max_model_len=64, num_kv_blocks=16,
                                          executor="mp"))
    try:
        executor.init_kv_cache(executor.num_available_blocks())
        (worker,) = executor.procs
        worker.kill()
        worker.wait(10)
        started = time.monotonic()
        step = SchedulerOutput.empty(finished_request_ids={"gone"})
        with pytest.raises(ExecutorError, match="exited with code -9"):
            executor.execute(step)
        assert time.monotonic() - started < 2
        with pytest.raises(ExecutorError, match="exited with code -9"):
            executor.execute(step)
    finally:
        executor.shutdown()
