"""The engine's side of a TP group whose workers run `serve_worker` in other processes.

The engine binds one PUSH per worker (a `Fanout`: each step is encoded once, its embedding
frames sent zero-copy) and one PULL for the replies; rank 0's `ModelRunnerOutput` is the step's
answer. Every wait on a reply also asks the subclass whether a worker is gone: one that died, or
reported a failure, fails the group at once (`ExecutorError`), so the engine fails its requests
instead of waiting on a dead peer. Subclasses only launch, watch and stop workers: `mp` as local
processes, `ray` as actors.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, NoReturn

import msgspec
import zmq

from llm_worker.config import LLMWorkerConfig
from llm_worker.executor import Executor, ExecutorError
from protocol.addresses import LOOPBACK, tcp
from protocol.messages import Shutdown
from protocol.sockets import Fanout, Receiver
from protocol.step import (
    InitKVCache,
    ModelRunnerOutput,
    SchedulerOutput,
    WorkerAck,
    WorkerBeat,
    WorkerInfo,
)

log = logging.getLogger(__name__)

POLL_MS = 50  # how often a wait for the workers checks that they are alive
SHUTDOWN_GRACE_S = 5.0


class WorkerGroupExecutor(Executor):
    def __init__(self, config: LLMWorkerConfig, host: str = LOOPBACK):
        """``host``: where the engine's sockets bind, an address every worker can reach."""
        super().__init__(config)
        self.tp = tp = config.tensor_parallel_size
        self.error: str | None = None  # set once the group has failed or shut down
        self.ctx = zmq.Context()
        self.replies = Receiver(self.ctx, tcp(host), bind=True)
        self.steps = Fanout(self.ctx, [tcp(host) for _ in range(tp)])
        try:
            self._start_workers([self.worker_spec(rank) for rank in range(tp)])
            infos = sorted(self._wait(WorkerInfo, tp), key=lambda i: i.rank)
        except BaseException:
            self._close()
            raise
        self.info = infos[0]
        self._num_blocks = min(i.num_available_blocks for i in infos)

    def worker_spec(self, rank: int) -> dict[str, Any]:
        """`serve_worker`'s arguments for ``rank`` as JSON-able values (no rendezvous yet: it
        is on rank 0's host, which only the launch knows)."""
        return {"config": dataclasses.asdict(self.config), "rank": rank,
                "step_addr": self.steps.addrs[rank], "reply_addr": self.replies.addr,
                "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel())}

    # -- what a subclass provides -------------------------------------------------------------

    @abstractmethod
    def _start_workers(self, specs: list[dict[str, Any]]) -> None:
        """Start one worker per spec (rank order), adding the spec's "rendezvous"."""

    @abstractmethod
    def _dead_worker(self) -> str | None:
        """Why a worker is gone (e.g. "TP worker 1 exited with code -9"); None if all live."""

    @abstractmethod
    def _stop_workers(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for the workers to leave (they got Shutdown), then end them."""

    # -- Executor -----------------------------------------------------------------------------

    def num_available_blocks(self) -> int:
        return self._num_blocks

    def init_kv_cache(self, num_blocks: int) -> None:
        self._send(InitKVCache(num_blocks=num_blocks))
        self._wait(WorkerAck, self.tp)

    def execute(self, out: SchedulerOutput, frames: Sequence[Any] = ()) -> ModelRunnerOutput:
        self._send(out, frames)
        (result,) = self._wait(ModelRunnerOutput, 1, self.config.tp_worker_timeout_s)
        return result

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def hidden_size(self) -> int:
        return self.info.hidden_size

    def check(self) -> None:
        if self.error is not None:
            raise ExecutorError(self.error)
        dead = self._dead_worker()
        if dead is not None:
            self._fail(dead)

    def shutdown(self) -> None:
        if self.error is None:
            self.error = "the TP group was shut down"
            self.steps.send(Shutdown(reason="engine shutdown"))
            self._stop_workers(SHUTDOWN_GRACE_S)
        self._close()

    # -- talking to the group -----------------------------------------------------------------

    def _send(self, msg: msgspec.Struct, frames: Sequence[Any] = ()) -> None:
        if self.error is not None:
            raise ExecutorError(self.error)
        if not self.steps.send(msg, frames):
            self._fail(self._dead_worker() or "a TP worker stopped taking messages")

    def _wait(self, kind: type, n: int, silent_s: float = 0.0) -> list[Any]:
        """The next ``n`` replies, each a ``kind``; fails the group as soon as a worker dies,
        or, with ``silent_s``, sends no `WorkerBeat` for that long (stopped or wedged, where a
        rank waiting on it in a collective would wait for the collective timeout). Loading and
        warm-up wait without it: an import or a compile may hold a worker's GIL for seconds."""
        got: list[Any] = []
        timeout = silent_s
        heard = dict.fromkeys(range(self.tp), time.monotonic())  # rank -> last sign of life
        while len(got) < n:
            item = self.replies.recv(timeout_ms=POLL_MS)
            now = time.monotonic()
            if item is None or isinstance(item[0], WorkerBeat):
                if item is not None:
                    heard[item[0].rank] = now
                dead = self._dead_worker()
                if dead is not None:
                    self._fail(dead)
                silent = [r for r, t in heard.items() if now - t > timeout]
                if timeout > 0 and silent:
                    self._fail(f"TP worker {silent[0]} sent no heartbeat for "
                               f"{now - heard[silent[0]]:.0f} s: hung")
                continue
            msg = item[0]
            heard[getattr(msg, "rank", 0)] = now
            if isinstance(msg, WorkerAck) and msg.error:
                self._fail(f"TP worker {msg.rank} failed: {msg.error}")
            if not isinstance(msg, kind):
                self._fail(f"expected {kind.__name__} from the TP workers, got "
                           f"{type(msg).__name__}")
            got.append(msg)
        return got

    def _fail(self, why: str) -> NoReturn:
        if self.error is None:
            self.error = why
            log.error("TP group failed: %s; stopping its workers", why)
            self._close()
        raise ExecutorError(self.error)

    def _close(self) -> None:
        self._stop_workers(0.0)  # ends what still runs (a no-op once they are gone)
        if not self.ctx.closed:
            self.steps.close()
            self.replies.close()
            self.ctx.term()
