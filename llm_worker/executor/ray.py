"""`ray`: the TP group as Ray actors, one per GPU (or CPU slot), in a placement group.

Ray places, starts and watches the workers; it never carries a step. Each actor runs the same
`serve_worker` loop as an `mp` worker process, over ZeroMQ to the engine's sockets. Those bind to
loopback when the whole group landed on the engine's node, else to this node's IP. Bundles are
STRICT_PACK by default (one node: NVLink, no cross-host collectives); `ray_placement` SPREAD
lets a group span nodes. A GPU comes from Ray (it sets each actor's CUDA_VISIBLE_DEVICES), never
from the rank. A dead actor shows as its serve() call ending in an error, which
`_dead_worker` polls.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import ray
from ray.util.placement_group import (
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from llm_worker.config import LLMWorkerConfig
from llm_worker.executor.group import WorkerGroupExecutor
from protocol.addresses import LOOPBACK, tcp

log = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 60.0  # a group that cannot be placed by then will not be soon


class RayWorker:
    """One TP worker as a Ray actor (`ray.remote` is applied with its resources at launch)."""

    def free_address(self, local: bool) -> str:
        """A free tcp address on this actor's node: rank 0's serves torch's rendezvous."""
        return tcp(LOOPBACK if local else ray.util.get_node_ip_address())

    def serve(self, spec: dict[str, Any]) -> None:
        """Blocks until Shutdown: the actor is busy serving for the group's whole life."""
        from llm_worker.worker_loop import run_spec

        run_spec(spec)


class RayExecutor(WorkerGroupExecutor):
    def __init__(self, config: LLMWorkerConfig):
        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS (a cluster that deploy/ started) or a local instance
        self.actors: list[Any] = []
        self.serving: list[Any] = []  # each actor's serve() call: it ends when the actor dies
        self.gpu = config.resolved_device().startswith("cuda")
        self.pg = _place(config, self.gpu)
        self._finalizer = weakref.finalize(self, _remove, self.pg)
        here = ray.get_runtime_context().get_node_id()
        self.local = set(placement_group_table(self.pg)["bundles_to_node_id"].values()) == {here}
        super().__init__(config, host=LOOPBACK if self.local else ray.util.get_node_ip_address())
        log.info("TP group of %d up as Ray actors (placement group %s)", self.tp, self.pg.id)

    def _start_workers(self, specs: list[dict[str, Any]]) -> None:
        actor = ray.remote(num_cpus=1, num_gpus=1 if self.gpu else 0)(RayWorker)
        self.actors = [
            actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=rank)).remote()
            for rank in range(len(specs))
        ]
        rendezvous = None
        if len(specs) > 1:
            rendezvous = ray.get(self.actors[0].free_address.remote(self.local))
        self.serving = [a.serve.remote({**spec, "rendezvous": rendezvous})
                        for a, spec in zip(self.actors, specs)]

    def _dead_worker(self) -> str | None:
        done, _ = ray.wait(self.serving, num_returns=1, timeout=0)
        if not done:
            return None
        rank = self.serving.index(done[0])
        try:
            ray.get(done[0])
            why = "its loop returned"
        except Exception as e:  # RayActorError (killed, node lost) or the worker's own error
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return f"TP worker {rank} (Ray actor) ended: {why}"

    def _stop_workers(self, grace_s: float) -> None:
        if self.serving and grace_s > 0:
            ray.wait(self.serving, num_returns=len(self.serving), timeout=grace_s)
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        self._finalizer()  # the placement group's resources go back to the cluster


def _place(config: LLMWorkerConfig, gpu: bool):
    """A ready placement group with one bundle per rank (a GPU each on CUDA)."""
    tp = config.tensor_parallel_size
    bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
    pg = placement_group([bundle] * tp, strategy=config.ray_placement)
    try:
        ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise RuntimeError(f"Ray could not place {tp} bundles of {bundle} "
                           f"({config.ray_placement}) within {PLACEMENT_TIMEOUT_S:.0f} s; "
                           "`ray status` shows what the cluster has") from None
    return pg


def _remove(pg) -> None:
    try:
        remove_placement_group(pg)
    except Exception:  # Ray already shut down (interpreter exit): nothing left to free
        pass
