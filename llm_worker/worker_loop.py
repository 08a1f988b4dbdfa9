"""A TP worker's side of the engine <-> worker protocol, the same under every executor.

`WorkerLoop` holds no socket: it turns one decoded message (and its frames) into the reply to
send, if any. `serve_worker` pumps it over ZeroMQ, a PULL from the engine's fan-out and a PUSH
back, in whatever process the executor started (an `mp` child, a Ray actor): what differs
between executors is only how the process is launched and given its device.

The exchange: the worker loads its shard and sends `WorkerInfo`; `InitKVCache` -> `WorkerAck`;
then each `SchedulerOutput` -> rank 0's `ModelRunnerOutput` (the other ranks answer nothing);
`Shutdown` ends the loop. A worker that fails sends `WorkerAck(error=...)` and exits. A thread
beside the loop sends `WorkerBeat` all along, so the engine tells a hung worker from a busy one.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Sequence
from typing import Any

import msgspec
import zmq

from llm_worker.config import LLMWorkerConfig
from llm_worker.worker import Worker
from protocol.codec import ProtocolError
from protocol.messages import Shutdown
from protocol.models import register_config
from protocol.procs import exit_with_parent, setup_logging
from protocol.sockets import Receiver, Sender
from protocol.step import (
    WORKER_BEAT_S,
    InitKVCache,
    SchedulerOutput,
    WorkerAck,
    WorkerBeat,
    WorkerInfo,
)

log = logging.getLogger(__name__)


class WorkerLoop:
    def __init__(self, worker: Worker):
        self.worker = worker
        self.rank = worker.rank
        self.done = False

    def info(self) -> WorkerInfo:
        w = self.worker
        return WorkerInfo(rank=self.rank, vocab_size=w.vocab_size, max_model_len=w.max_model_len,
                          hidden_size=w.runner.model.hidden_size,
                          num_available_blocks=w.num_available_blocks())

    def handle(self, msg: msgspec.Struct, frames: Sequence[Any]) -> msgspec.Struct | None:
        """Apply one message; returns what to send back (None: nothing)."""
        if isinstance(msg, SchedulerOutput):
            out = self.worker.execute(msg, frames)
            return out if self.rank == 0 else None  # rank 0's output is the group's
        if isinstance(msg, InitKVCache):
            self.worker.init_kv_cache(msg.num_blocks)
            return WorkerAck(rank=self.rank)
        if isinstance(msg, Shutdown):
            self.done = True
            return None
        raise ProtocolError(f"a worker does not take {type(msg).__name__}")


def _beat(ctx: zmq.Context, reply_addr: str, rank: int, stop: threading.Event) -> None:
    """The heartbeat thread: its own socket (ZeroMQ sockets stay on one thread)."""
    beats = Sender(ctx, reply_addr, bind=False)
    try:
        while not stop.wait(WORKER_BEAT_S):
            beats.send(WorkerBeat(rank=rank))
    finally:
        beats.close(linger_ms=0)


def serve_worker(config: LLMWorkerConfig, rank: int, dist_init_method: str | None,
                 step_addr: str, reply_addr: str) -> None:
    """Run one worker until Shutdown: connect to the engine's step fan-out (``step_addr``) and
    reply socket (``reply_addr``), load the shard, then serve steps, beating from a thread."""
    ctx = zmq.Context()
    steps = Receiver(ctx, step_addr, bind=False)
    replies = Sender(ctx, reply_addr, bind=False)
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(ctx, reply_addr, rank, stop), daemon=True,
                            name=f"tp{rank}-beat")
    beat.start()
    worker = None
    try:
        worker = Worker(config, rank, dist_init_method)
        loop = WorkerLoop(worker)
        replies.send(loop.info())
        while not loop.done:
            got = steps.recv()  # blocks: an idle engine sends nothing
            if got is not None:
                reply = loop.handle(*got)
                if reply is not None:
                    replies.send(reply)
    except Exception as e:
        # The engine logs this and fails the group: a rank that stops mid-step leaves the
        # others inside a collective, so no rank can go on alone.
        log.exception("TP worker %d failed", rank)
        replies.send(WorkerAck(rank=rank, error=f"{type(e).__name__}: {e}"))
        raise
    finally:
        stop.set()
        beat.join()
        if worker is not None:
            worker.shutdown()
        steps.close()
        replies.close(linger_ms=1000)  # the error above must reach the engine
        ctx.term()


def run_spec(spec: dict) -> None:
    """Serve one worker from its JSON spec: config (LLMWorkerConfig's fields), rank,
    rendezvous, step_addr, reply_addr, log_level. The launcher (an `mp` parent, a Ray actor)
    has already given this process its GPU, if any, as CUDA_VISIBLE_DEVICES."""
    setup_logging(f"tp{spec['rank']}", spec.get("log_level", "INFO"))
    register_config(spec["config"]["model"])  # a fresh process: e.g. Ultravox's config class
    serve_worker(LLMWorkerConfig(**spec["config"]), spec["rank"], spec["rendezvous"],
                 spec["step_addr"], spec["reply_addr"])


def main(argv: list[str]) -> None:
    """``python -m llm_worker.worker_loop SPEC``: the process the `mp` executor starts."""
    exit_with_parent()  # a SIGKILLed engine leaves no worker behind
    run_spec(json.loads(argv[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
