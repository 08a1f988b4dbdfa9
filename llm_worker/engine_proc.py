"""The engine process: the busy loop that serves one `EngineCore` over ZeroMQ.

`EngineCoreProc` wraps the core (`llm_worker/engine.py`) in the three-step loop: drain inputs,
step, emit. Sockets live on the IO threads of `llm_worker/io_threads.py`, so the loop never
blocks on the network and the forward pass never waits on it. Heartbeats come from a thread of
their own. A TP group that fails is rebuilt by a `GroupSupervisor` while the loop goes on
answering.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
import uuid

import msgspec

from llm_worker.config import LLMWorkerConfig
from llm_worker.device_inbox import make_device_inbox
from llm_worker.engine import EngineCore
from llm_worker.executor import ExecutorError
from llm_worker.executor.supervisor import GroupSupervisor
from llm_worker.io_threads import Arrived, EngineIO, Lost
from protocol.addresses import host_id
from protocol.messages import (
    Abort,
    EngineStats,
    ErrorMsg,
    GenerateRequest,
    Heartbeat,
    Hello,
    Ready,
    Shutdown,
    TokenOutput,
    TokenOutputs,
)

log = logging.getLogger(__name__)


class EngineCoreProc:
    """Serves one EngineCore: GenerateRequest/Abort/Hello in, TokenOutputs/Heartbeat out."""

    def __init__(self, config: LLMWorkerConfig, input_addr: str, heartbeat_s: float = 0.2,
                 embed_addr: str | None = None, debug_slow_step_s: float = 0.0):
        self.engine_id = f"engine-{uuid.uuid4().hex[:8]}"
        self.core = EngineCore(config)
        # Brings the TP group back after a failure, with the KV cache the engine is sized to.
        self.supervisor = GroupSupervisor(config, self.core.kv.num_total_blocks)
        self.model_name = config.model
        self.heartbeat_s = heartbeat_s
        self.frontends: set[str] = set()  # reply_to addresses that said Hello
        self.owner: dict[str, str] = {}  # request_id -> reply_to
        self.running = True
        device = self.core.executor.local_device
        self.io = EngineIO(input_addr, embed_addr,
                           make_device_inbox(device) if device is not None else None)
        self.inbox, self.outbox, self.receiver = self.io.inbox, self.io.outbox, self.io.receiver
        # Heartbeats come from their own thread: a long step (a big prefill, a first compile) is
        # "busy", not "dead". They carry the busy loop's latest stats (num_steps shows progress)
        # and how long the step in flight has run, from when the loop began it (None: idle).
        self._stats = self._snapshot()
        self._step_started: float | None = None
        # Fault injection for tests (MMSERVE_DEBUG_SLOW_STEP_S): the first step with work sleeps
        # this long, as a first compile would on a GPU. 0 (the default) does nothing.
        self.debug_slow_step_s = debug_slow_step_s
        threading.Thread(target=self._beat_loop, name="engine-beat", daemon=True).start()

    # -- busy loop --------------------------------------------------------------------------

    def _beat(self) -> Heartbeat:
        started = self._step_started  # read once: the busy loop may clear it meanwhile
        running = None if started is None else time.monotonic() - started
        return Heartbeat(self.engine_id, time.time(), self._stats, running)

    def _beat_loop(self) -> None:
        while self.running:
            beat = self._beat()
            for dest in tuple(self.frontends):
                self.outbox.put((dest, beat))
            time.sleep(self.heartbeat_s)

    def run(self) -> None:
        log.info("%s serving %s", self.engine_id, self.model_name)
        next_stats = 0.0
        stalled = False
        try:
            while self.running:
                # Block on the inbox when idle, and when the last step found nothing to run
                # (every request waits for an embedding): only an input can change that, and
                # spinning would burn a core the encoders may be sharing.
                self._drain_inputs(block=stalled or not self.core.has_work())
                self._watch_group()
                progress = self.core.scheduler.num_steps, self.core.num_applied
                self._emit(self._step())
                stalled = (self.core.scheduler.num_steps, self.core.num_applied) == progress
                now = time.monotonic()
                if now >= next_stats:  # a snapshot for the beat thread (never reads live state)
                    self._stats = self._snapshot()
                    next_stats = now + self.heartbeat_s
        finally:
            self.supervisor.close()
            self.io.close()

    def _snapshot(self) -> EngineStats:
        return msgspec.structs.replace(self.core.stats(), executor_healthy=not self.supervisor.down,
                                       executor_restarts=self.supervisor.restarts)

    def _watch_group(self) -> None:
        """Swap in a rebuilt group once it is ready; while idle, notice a worker that died
        (so /health says so before a request finds out)."""
        if self.supervisor.down:
            group = self.supervisor.take()
            if group is not None:
                self.core.replace_executor(group)
                self._stats = self._snapshot()
                log.warning("%s: TP group back (restart %d)", self.engine_id,
                            self.supervisor.restarts)
        elif not self.core.has_work():
            try:
                self.core.executor.check()
            except ExecutorError as e:
                self._group_failed(e)

    def _group_failed(self, e: ExecutorError) -> None:
        log.error("%s: TP group down (%s); starting a new one", self.engine_id, e)
        self.supervisor.failed(self.core.executor)
        self._stats = self._snapshot()  # the beats say so from now on, not at the next snapshot

    def _step(self) -> list[TokenOutput]:
        if not self.core.has_work():
            return []
        self._step_started = time.monotonic()
        try:
            if self.debug_slow_step_s:
                time.sleep(self.debug_slow_step_s)
                self.debug_slow_step_s = 0.0
            return self.core.step()
        except Exception as e:
            # A bug or a device fault: fail what is in flight (5xx, no internals to clients)
            # and keep serving; a broken device (or a failed TP group) fails the next step the
            # same way.
            ids = list(self.core.scheduler.requests)
            self.core.in_flight.clear()  # their results are lost with the failed step
            if isinstance(e, ExecutorError):  # the executor logged the cause when it failed
                log.error("engine step failed (%s); failing %d requests", e, len(ids))
                self._group_failed(e)
            else:
                log.exception("engine step failed; failing %d requests", len(ids))
            self.core.abort(ids)
            for rid in ids:
                dest = self.owner.pop(rid, None)
                if dest is not None:
                    self.outbox.put((dest, ErrorMsg(rid, 500, "engine step failed")))
            return []
        finally:
            self._step_started = None

    def _drain_inputs(self, block: bool) -> None:
        try:
            if block:
                self._handle(self.inbox.get(timeout=self.heartbeat_s))
            while True:
                self._handle(self.inbox.get_nowait())
        except queue.Empty:
            pass

    def _handle(self, msg) -> None:
        if isinstance(msg, Arrived):
            err = self.core.add_embedding(*msg)
            if err is not None:
                log.warning("dropped embedding: %s", err)
        elif isinstance(msg, Lost):
            self.core.embedding_lost(*msg)
        elif isinstance(msg, GenerateRequest):
            if self.supervisor.down:  # fail fast: nothing could run it until the group is back
                self.outbox.put((msg.reply_to, ErrorMsg(
                    msg.request_id, 503, "the decoder group is restarting; retry later")))
                return
            if msg.request_id in self.owner:
                err = f"duplicate request id {msg.request_id}"
            else:
                err = self.core.add_request(msg)
            if err is not None:
                log.info("rejected %s: %s", msg.request_id, err)
                self.outbox.put((msg.reply_to, ErrorMsg(msg.request_id, 400, err)))
            else:
                self.owner[msg.request_id] = msg.reply_to
        elif isinstance(msg, Abort):
            ids = [r for r in msg.request_ids if r in self.owner]
            self.core.abort(ids)
            for r in ids:
                del self.owner[r]
            if ids:
                log.info("aborted %s", ",".join(ids))
        elif isinstance(msg, Hello):
            self.frontends.add(msg.reply_to)
            self.outbox.put((msg.reply_to, self._ready()))
            # A beat right behind Ready (same socket, so in order): a frontend that calls the
            # engine ready has its stats too, and /metrics never shows a ready engine as 0s.
            self.outbox.put((msg.reply_to, self._beat()))
        elif isinstance(msg, Shutdown):
            self.running = False
        else:
            log.warning("unexpected %s on the engine input", type(msg).__name__)

    def _ready(self) -> Ready:
        return Ready(
            engine_id=self.engine_id,
            model=self.model_name,
            max_model_len=self.core.max_model_len,
            vocab_size=self.core.vocab_size,
            num_total_blocks=self.core.kv.num_total_blocks,
            block_size=self.core.config.block_size,
            embed_addr=self.io.embed_addr,
            hidden_size=self.core.hidden_size,
            embed_local=self.io.embed_local,
            host=host_id() if self.io.embed_local else "",
            gpus=[self.io.device_inbox.gpu] if self.io.device_inbox is not None else [],
        )

    def _emit(self, outputs: list[TokenOutput]) -> None:
        for rid, status, message in self.core.errors:
            dest = self.owner.pop(rid, None)
            if dest is not None:
                self.outbox.put((dest, ErrorMsg(rid, status, message)))
        self.core.errors.clear()
        by_dest: dict[str, list[TokenOutput]] = {}
        for o in outputs:
            dest = self.owner.get(o.request_id)
            if dest is None:
                continue
            by_dest.setdefault(dest, []).append(o)
            if o.finish_reason is not None:
                del self.owner[o.request_id]
        for dest, outs in by_dest.items():
            self.outbox.put((dest, TokenOutputs(outs)))


def run_engine_core(config: LLMWorkerConfig, input_addr: str, embed_addr: str | None = None,
                    debug_slow_step_s: float = 0.0,
                    metrics_addr: tuple[str, int] | None = None) -> None:
    """Serve until Shutdown; with ``metrics_addr`` (host, port), also serve this engine's
    Prometheus metrics there (read from the snapshot the heartbeats carry)."""
    proc = EngineCoreProc(config, input_addr, embed_addr=embed_addr,
                          debug_slow_step_s=debug_slow_step_s)
    # SIGTERM ends the loop (within a heartbeat period, or when the step in hand is done), so
    # the finally blocks run: the TP workers stop and the Unix socket's folder goes.
    signal.signal(signal.SIGTERM, lambda *_: setattr(proc, "running", False))
    if metrics_addr is not None:
        # The names live with the frontend's, so a scrape of any role reads alike.
        from frontend.role_metrics import RoleCollector, serve_role_metrics

        serve_role_metrics(metrics_addr, RoleCollector(config.model, engine=lambda: proc._stats))
    try:
        proc.run()
    finally:
        proc.core.shutdown()
