"""`mp`: the TP group as local worker processes, each running `llm_worker/worker_loop.py`.

A worker is a fresh interpreter (`python -m llm_worker.worker_loop SPEC`, the spec as JSON):
unlike multiprocessing's spawn it never re-runs the caller's main module, so a script calling
`LLM(tensor_parallel_size=2)` needs no `__main__` guard, and nothing is pickled. A worker that
exits is seen by polling its process. Devices come from the launch, not the rank: worker i sees
only the i-th GPU visible to the engine (CUDA_VISIBLE_DEVICES), as its cuda:0.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import weakref
from typing import Any

from llm_worker.config import LLMWorkerConfig
from llm_worker.executor.group import WorkerGroupExecutor
from protocol.addresses import tcp

log = logging.getLogger(__name__)


class MPExecutor(WorkerGroupExecutor):
    def __init__(self, config: LLMWorkerConfig):
        self.procs: list[subprocess.Popen] = []
        super().__init__(config)
        log.info("TP group of %d up (pids %s)", self.tp, ",".join(str(p.pid) for p in self.procs))

    def _start_workers(self, specs: list[dict[str, Any]]) -> None:
        rendezvous = tcp() if len(specs) > 1 else None  # torch.distributed's store (rank 0's)
        gpus = _gpus_per_worker(self.config, len(specs))
        self.procs = [_start_worker({**spec, "rendezvous": rendezvous}, gpu)
                      for spec, gpu in zip(specs, gpus)]
        # The workers never outlive this executor: stopped at shutdown, at a failure, when it
        # is collected, and at interpreter exit (they also watch this process: exit_with_parent).
        self._finalizer = weakref.finalize(self, _stop_processes, self.procs, 0.0)

    def _dead_worker(self) -> str | None:
        for rank, p in enumerate(self.procs):
            if p.poll() is not None:
                return f"TP worker {rank} (pid {p.pid}) exited with code {p.returncode}"
        return None

    def _stop_workers(self, grace_s: float) -> None:
        _stop_processes(self.procs, grace_s)


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
