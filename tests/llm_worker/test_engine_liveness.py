"""Heartbeats come from the engine's own thread: a step that takes seconds (a long prefill, a first
compile) leaves the engine "busy", never "dead" to its frontends. The beats say how long the step
in flight has run, so the frontend can tell busy from ready. (Through real processes and HTTP:
tests/e2e/test_slow_step.py.)"""

from __future__ import annotations

import threading
import time

import zmq

from llm_worker.config import LLMWorkerConfig
from llm_worker.engine_proc import EngineCoreProc
from protocol.addresses import tcp
from protocol.messages import (
    GenerateRequest,
    Heartbeat,
    Hello,
    Ready,
    Sampling,
    Shutdown,
    TokenOutputs,
)
from protocol.sockets import Receiver, Sender

STEP_S = 2.0


def test_heartbeats_keep_coming_during_a_long_step(tiny_llama):
    proc = EngineCoreProc(LLMWorkerConfig(model=tiny_llama, max_model_len=64, num_kv_blocks=16),
                          tcp(), heartbeat_s=0.2)
    real_step = proc.core.step

    def slow_step():
        time.sleep(STEP_S)  # the busy loop is stuck here: no beat may depend on it
        return real_step()

    proc.core.step = slow_step
    loop = threading.Thread(target=proc.run, daemon=True)
    loop.start()
    ctx = zmq.Context()
    inbox = Receiver(ctx, tcp())
    to_engine = Sender(ctx, proc.receiver.addr)
    try:
        to_engine.send(Hello(frontend_id="t", reply_to=inbox.addr))
        to_engine.send(GenerateRequest("r", [1, 2, 3], Sampling(max_tokens=1), [], inbox.addr))
        beats, running, started, finished = [], [], time.monotonic(), None
        while finished is None and time.monotonic() - started < 30:
            got = inbox.recv(timeout_ms=100)
            if got is None:
                continue
            if isinstance(got[0], Heartbeat):
                beats.append(time.monotonic())
                running.append(got[0].step_running_s)
            elif isinstance(got[0], TokenOutputs):
                finished = time.monotonic()
        assert finished is not None and finished - started >= STEP_S
        gaps = [b - a for a, b in zip(beats, beats[1:])]
        during = [b for b in beats if started + 0.3 < b < finished - 0.3]
        assert len(during) >= 5 and max(gaps) < 0.8, (len(during), max(gaps))
        # The step in flight is reported live and grows while it runs; idle beats say None.
        in_step = [r for r in running if r is not None]
        assert max(in_step) > STEP_S - 0.5 and in_step == sorted(in_step), in_step
        idle = []
        while time.monotonic() - finished < 0.6:
            got = inbox.recv(timeout_ms=100)
            if got is not None and isinstance(got[0], Heartbeat):
                idle.append(got[0])
        assert idle[-1].step_running_s is None and idle[-1].stats.num_steps == 1, idle[-1]
    finally:
        to_engine.send(Shutdown())
        loop.join(10)
        inbox.close()
        to_engine.close()
        ctx.term()
        proc.core.shutdown()


def test_ready_comes_with_a_beat(tiny_llama):
    """The answer to Hello is Ready and then a beat at once, not a heartbeat period later: a
    frontend that calls the engine ready also has its stats (/metrics read executor_healthy 0 for
    a ready engine in that window)."""
    proc = EngineCoreProc(LLMWorkerConfig(model=tiny_llama, max_model_len=64, num_kv_blocks=16),
                          tcp(), heartbeat_s=30.0)
    loop = threading.Thread(target=proc.run, daemon=True)
    loop.start()
    ctx = zmq.Context()
    inbox = Receiver(ctx, tcp())
    to_engine = Sender(ctx, proc.receiver.addr)
    try:
        time.sleep(0.5)  # the beat thread's first beat went to nobody; the next is 30 s away
        to_engine.send(Hello(frontend_id="t", reply_to=inbox.addr))
        got = [inbox.recv(timeout_ms=5000) for _ in range(2)]
        assert all(g is not None for g in got), got
        ready, beat = got[0][0], got[1][0]
        assert isinstance(ready, Ready) and isinstance(beat, Heartbeat), (ready, beat)
        assert beat.stats.executor_healthy and beat.stats.num_total_blocks == ready.num_total_blocks > 0, beat.stats
    finally:
        to_engine.send(Shutdown())
        loop.join(10)
        inbox.close()
        to_engine.close()
        ctx.term()
        proc.core.shutdown()


def test_the_frontend_sees_a_long_step_as_busy_not_dead(tiny_llama):
    """/health (EngineClient.healthy) never flaps during a 3 s step, the client calls it "busy"
    (not dead) meanwhile, and the requests in it and one sent meanwhile all finish (the
    frontend's dead-after is 1 s). The step is slowed by the engine's own debug hook."""
    import asyncio

    from frontend.engine_client import EngineClient, EngineHealth

    proc = EngineCoreProc(LLMWorkerConfig(model=tiny_llama, max_model_len=64, num_kv_blocks=16),
                          tcp(), heartbeat_s=0.2, debug_slow_step_s=3 * STEP_S / 2)
    loop = threading.Thread(target=proc.run, daemon=True)
    loop.start()

    async def run() -> tuple[list[EngineHealth], list[list[int]]]:
        client = EngineClient(proc.receiver.addr)
        await client.start()
        try:
            await client.wait_ready(30)

            async def one(rid: str) -> list[int]:
                req = GenerateRequest(rid, [1, 2, 3], Sampling(max_tokens=3, ignore_eos=True), [],
                                      client.reply_to)
                return [t for out in [o async for o in client.generate(req)]
                        for t in out.new_token_ids]

            health: list[EngineHealth] = []

            async def watch() -> None:
                while True:
                    health.append(client.health())
                    await asyncio.sleep(0.05)

            watcher = asyncio.create_task(watch())
            first = asyncio.create_task(one("a"))
            await asyncio.sleep(0.5)  # inside the slow step now
            outs = await asyncio.gather(first, one("b"))
            await asyncio.sleep(0.5)  # beats after the step say idle again
            watcher.cancel()
            return health, outs
        finally:
            await client.close()

    try:
        health, outs = asyncio.run(run())
        assert len(health) > 30 and all(h.ok for h in health), [h.state for h in health]
        busy = [h.step_running_s for h in health if h.state == "busy"]
        assert len(busy) > 10 and max(busy) > 2.5 and min(busy) > 1.0, busy
        assert health[-1].state == "ready" and health[-1].step_running_s is None
        assert [len(o) for o in outs] == [3, 3]
        assert proc.debug_slow_step_s == 0  # it slowed the first step only
    finally:
        proc.running = False
        loop.join(10)
        proc.core.shutdown()
