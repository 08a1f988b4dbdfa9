"""The frontend's connection to one engine core: send requests, stream their TokenOutputs back.

Liveness comes from the engine's heartbeats, which its IO thread sends even while a step runs:
silence for `engine_dead_after_s` marks the engine dead, fails every in-flight stream with
EngineUnavailable (-> 503) and flips /health to 503. Beats that report a step running for more
than BUSY_AFTER_S make it "busy": still healthy, and nothing in flight fails. Beats that report
its TP group down (a worker died; the engine fails that group's requests and starts a new one)
make it "group_down": /health answers 503 and new requests are refused until the group is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import zmq.asyncio

from frontend import env
from frontend.errors import EngineUnavailable, RequestError
from protocol import timeline
from protocol.addresses import LOOPBACK, tcp
from protocol.messages import (
    Abort,
    EngineStats,
    ErrorMsg,
    GenerateRequest,
    Heartbeat,
    Hello,
    Ready,
    TokenOutput,
    TokenOutputs,
)
from protocol.sockets import AsyncReceiver, AsyncSender

if TYPE_CHECKING:
    from frontend.metrics import FrontendMetrics

log = logging.getLogger(__name__)

BUSY_AFTER_S = 1.0  # a step running longer than this (a first compile, a huge prefill) is "busy"


class EngineHealth(NamedTuple):
    # "starting" (no Ready yet) | "ready" | "busy" | "dead" (heartbeats stopped) |
    # "group_down" (beating, but its TP group is being restarted)
    state: str
    step_running_s: float | None  # how long the step in flight has run; None when idle/unknown
    silent_s: float | None  # seconds since the last heartbeat; None before the first

    @property
    def ok(self) -> bool:
        return self.state in ("ready", "busy")


class EngineClient:
    def __init__(self, engine_addr: str, reply_addr: str | None = None):
        self.frontend_id = f"frontend-{uuid.uuid4().hex[:8]}"
        self.ctx = zmq.asyncio.Context()
        self.reply_to = reply_addr or tcp(LOOPBACK)
        self.receiver = AsyncReceiver(self.ctx, self.reply_to, bind=True)
        self.sender = AsyncSender(self.ctx, engine_addr, bind=False)
        self.dead_after = env.engine_dead_after_s()
        self.ready: Ready | None = None
        self.stats = EngineStats()
        self.last_beat = 0.0
        self.step_running_s: float | None = None  # as of the latest beat, received at beat_at
        self.beat_at = 0.0
        self.streams: dict[str, asyncio.Queue] = {}
        self.timers: dict[str, Any] = {}  # request id -> its metrics timer, while it streams
        self.ready_event = asyncio.Event()
        # Other peers (encoders) push to the same inbox; their messages go to this callback.
        self.other_messages: Callable[[Any], None] | None = None
        # Metrics (frontend.metrics): a timer per request streamed, and each beat's stats.
        self.request_metrics: FrontendMetrics | None = None
        self.on_stats: Callable[[str, EngineStats], None] | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._recv_loop(), name="engine-recv"),
            asyncio.create_task(self._liveness_loop(), name="engine-liveness"),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.receiver.close()
        self.sender.close()
        self.ctx.term()

    def health(self) -> EngineHealth:
        if self.ready is None:
            return EngineHealth("starting", None, None)
        now = time.monotonic()
        silent = now - self.last_beat
        if silent >= self.dead_after:
            return EngineHealth("dead", None, silent)
        if not self.stats.executor_healthy:
            return EngineHealth("group_down", None, silent)
        running = self.step_running_s
        if running is None:
            return EngineHealth("ready", None, silent)
        running += now - self.beat_at  # the step has gone on since that beat left
        return EngineHealth("busy" if running > BUSY_AFTER_S else "ready", running, silent)

    @property
    def healthy(self) -> bool:
        return self.health().ok

    async def wait_ready(self, timeout: float | None = None) -> Ready:
        await asyncio.wait_for(self.ready_event.wait(), timeout)
        assert self.ready is not None
        return self.ready

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenOutput]:
        """Yields the request's outputs until one has a finish_reason. Leaving early (client gone,
        stop string hit) aborts the request in the engine, which frees its KV blocks."""
        if not self.healthy:
            raise EngineUnavailable("engine is not available")
        q: asyncio.Queue = asyncio.Queue()
        self.streams[req.request_id] = q
        finished = False
        timer = self.request_metrics.start(req) if self.request_metrics is not None else None
        if timer is not None:
            self.timers[req.request_id] = timer
        try:
            await self.sender.send(req)
            timeline.mark("engine_sent", req.request_id)
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    if timer is not None:
                        timer.end("error")
                    raise item
                if timer is not None:
                    timer.output(item)
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self.streams.pop(req.request_id, None)
            self.timers.pop(req.request_id, None)
            if not finished:
                if timer is not None:
                    timer.end("abort")
                await self.abort([req.request_id])

    def finish_early(self, request_id: str, reason: str) -> None:
        """The consumer ends a stream itself for ``reason`` (a stop string: "stop"), so the
        metrics count that reason, not the "abort" that closing the stream would record."""
        timer = self.timers.get(request_id)
        if timer is not None:
            timer.end(reason)

    async def abort(self, request_ids: list[str]) -> None:
        if request_ids and self.ready is not None:
            await self.sender.send(Abort(request_ids))

    # -- background tasks -------------------------------------------------------------------

    async def _recv_loop(self) -> None:
        while True:
            msg, _ = await self.receiver.recv()
            if isinstance(msg, TokenOutputs):
                # Outputs leave when their step has ended: not busy any more, whatever the last
                # beat (sent during that step) said; the next beat reports the next step.
                self.step_running_s = None
                for out in msg.outputs:
                    if out.queue_seconds is not None:  # set on a request's first output only
                        timeline.mark("first_output", out.request_id)
                    q = self.streams.get(out.request_id)
                    if q is not None:
                        q.put_nowait(out)
            elif isinstance(msg, Heartbeat):
                self.last_beat = self.beat_at = time.monotonic()
                self.stats = msg.stats
                self.step_running_s = msg.step_running_s
                if self.on_stats is not None:
                    self.on_stats(msg.engine_id, msg.stats)
            elif isinstance(msg, ErrorMsg):
                q = self.streams.get(msg.request_id)
                if q is not None:
                    err = (RequestError(msg.message) if 400 <= msg.status < 500
                           else EngineUnavailable(msg.message))
                    q.put_nowait(err)
            elif isinstance(msg, Ready):
                if self.ready is None or self.ready.engine_id != msg.engine_id:
                    # Hello repeats until the first Ready lands: log each engine once.
                    log.info("engine %s ready (%s, max_model_len=%d)", msg.engine_id, msg.model,
                             msg.max_model_len)
                self.ready = msg
                self.last_beat = time.monotonic()
                self.step_running_s = None  # a new (or restarted) engine: idle until it beats
                self.ready_event.set()
            elif self.other_messages is not None:
                self.other_messages(msg)

    async def _liveness_loop(self) -> None:
        """Say Hello until the engine answers (and again if it goes silent); fail streams on death."""
        step = min(0.1, self.dead_after / 4)
        last_hello = last_tick = 0.0
        while True:
            now = time.monotonic()
            if now - last_tick > self.dead_after / 2:
                # This loop itself stalled (a starved host, a long callback): beats that arrived
                # meanwhile may still be unread in the socket, so judge silence next tick.
                self.last_beat = max(self.last_beat, now - self.dead_after / 2)
            last_tick = now
            alive = now - self.last_beat < self.dead_after
            if (self.ready is None or not alive) and now - last_hello > 0.5:
                await self.sender.send(Hello(frontend_id=self.frontend_id, reply_to=self.reply_to))
                last_hello = now
            if self.ready is not None and not alive and self.streams:
                log.error("engine silent for %.1fs: failing %d requests", now - self.last_beat,
                          len(self.streams))
                for q in self.streams.values():
                    q.put_nowait(EngineUnavailable("engine stopped responding"))
            await asyncio.sleep(step)
