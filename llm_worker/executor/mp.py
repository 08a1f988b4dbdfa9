"""`mp`: the TP group as local worker processes, each running `llm_worker/worker_loop.py`.

The engine binds one PUSH per worker (a `Fanout`: each step is encoded once, its embedding
frames sent zero-copy) and one PULL for the replies. Every wait on a reply also watches the
worker processes: one that exits, or reports a failure, fails the group at once
(`ExecutorError`), so the engine fails its requests instead of waiting on a dead peer.

A worker is a fresh interpreter (`python -m llm_worker.worker_loop SPEC`, the spec as JSON):
unlike multiprocessing's spawn it never re-runs the caller's main module, so a script calling
`LLM(tensor_parallel_size=2)` needs no `__main__` guard, and nothing is pickled. Devices come
from the launch, not the rank: worker i sees only the i-th GPU visible to the engine
(CUDA_VISIBLE_DEVICES), as its cuda:0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import weakref
from collections.abc import Sequence
from typing import Any, NoReturn

import msgspec
import zmq

from llm_worker.config import LLMWorkerConfig
from llm_worker.executor import Executor, ExecutorError
from protocol.addresses import tcp
from protocol.messages import Shutdown
from protocol.sockets import Fanout, Receiver
from protocol.step import InitKVCache, ModelRunnerOutput, SchedulerOutput, WorkerAck, WorkerInfo

log = logging.getLogger(__name__)

POLL_MS = 50  # how often a wait for the workers checks that they are alive
SHUTDOWN_GRACE_S = 5.0


class MPExecutor(Executor):
    def __init__(self, config: LLMWorkerConfig):
        super().__init__(config)
        self.tp = tp = config.tensor_parallel_size
        self.error: str | None = None  # set once the group has failed or shut down
        self.ctx = zmq.Context()
        self.replies = Receiver(self.ctx, tcp(), bind=True)
        self.steps = Fanout(self.ctx, [tcp() for _ in range(tp)])
        rendezvous = tcp() if tp > 1 else None  # torch.distributed's store, served by rank 0
        gpus = _gpus_per_worker(config, tp)
        spec = {"config": dataclasses.asdict(config), "rendezvous": rendezvous,
                "reply_addr": self.replies.addr,
                "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel())}
        self.procs = [_start_worker({**spec, "rank": rank, "step_addr": self.steps.addrs[rank]},
                                    gpus[rank]) for rank in range(tp)]
        # The workers never outlive this executor: stopped at shutdown, at a failure, when it
        # is collected, and at interpreter exit (they also watch this process: exit_with_parent).
        self._stop = weakref.finalize(self, _stop_processes, self.procs, 0.0)
        infos = sorted(self._wait(WorkerInfo, tp), key=lambda i: i.rank)
        self.info = infos[0]
        self._num_blocks = min(i.num_available_blocks for i in infos)
        log.info("TP group of %d up (pids %s)", tp, ",".join(str(p.pid) for p in self.procs))

    # -- Executor ---------------------------------------------------------------------------

    def num_available_blocks(self) -> int:
        return self._num_blocks

    def init_kv_cache(self, num_blocks: int) -> None:
        self._send(InitKVCache(num_blocks=num_blocks))
        self._wait(WorkerAck, self.tp)

    def execute(self, out: SchedulerOutput, frames: Sequence[Any] = ()) -> ModelRunnerOutput:
        self._send(out, frames)
        (result,) = self._wait(ModelRunnerOutput, 1)
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

    def shutdown(self) -> None:
        if self.error is None:
            self.error = "the TP group was shut down"
            self.steps.send(Shutdown(reason="engine shutdown"))
            _stop_processes(self.procs, SHUTDOWN_GRACE_S)
        self._close()

    # -- talking to the group ---------------------------------------------------------------

    def _send(self, msg: msgspec.Struct, frames: Sequence[Any] = ()) -> None:
        if self.error is not None:
            raise ExecutorError(self.error)
        if not self.steps.send(msg, frames):
            self._check_alive()
            self._fail("a TP worker stopped taking messages")

    def _wait(self, kind: type, n: int) -> list[Any]:
        """The next ``n`` replies, each a ``kind``; fails the group as soon as a worker dies."""
        got: list[Any] = []
        while len(got) < n:
            item = self.replies.recv(timeout_ms=POLL_MS)
            if item is None:
                self._check_alive()
                continue
            msg = item[0]
            if isinstance(msg, WorkerAck) and msg.error:
                self._fail(f"TP worker {msg.rank} failed: {msg.error}")
            if not isinstance(msg, kind):
                self._fail(f"expected {kind.__name__} from the TP workers, got "
                           f"{type(msg).__name__}")
            got.append(msg)
        return got

    def _check_alive(self) -> None:
        for rank, p in enumerate(self.procs):
            if p.poll() is not None:
                self._fail(f"TP worker {rank} (pid {p.pid}) exited with code {p.returncode}")

    def _fail(self, why: str) -> NoReturn:
        if self.error is None:
            self.error = why
            log.error("TP group failed: %s; stopping its workers", why)
            self._close()
        raise ExecutorError(self.error)

    def _close(self) -> None:
        self._stop()  # kills what is still running (a no-op after the first call)
        if not self.ctx.closed:
            self.steps.close()
            self.replies.close()
            self.ctx.term()


def _gpus_per_worker(config: LLMWorkerConfig, tp: int) -> list[str | None]:
    """Each worker's CUDA_VISIBLE_DEVICES: the i-th GPU this process sees (None on CPU)."""
    if not config.resolved_device().startswith("cuda"):
        return [None] * tp
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())]
    if len(ids) < tp:
        raise ValueError(f"tensor_parallel_size {tp} needs {tp} GPUs, {len(ids)} visible")
    return ids[:tp]


def _start_worker(spec: dict, gpu: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    # Its own session: a Ctrl-C in the terminal reaches the engine, which stops the workers.
    return subprocess.Popen([sys.executable, "-m", "llm_worker.worker_loop", json.dumps(spec)],
                            env=env, start_new_session=True)


def _stop_processes(procs: list[subprocess.Popen], grace_s: float) -> None:
    """Wait up to ``grace_s`` for each to exit, then SIGTERM, then SIGKILL."""
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.wait(2.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
