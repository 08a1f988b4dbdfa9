"""The encoder registry on Ray: a named, detached actor holds the `RegistryTable`, so every
process of the cluster finds it by name (``ray:<name>``, in the "mmserve" namespace) and it
outlives whoever created it. Ray carries only these small control calls, never embeddings.

The cluster is the one this process joined already (a Ray actor, or ``ray.init`` done by the
caller), else RAY_ADDRESS / a local instance through ``ray.init()``. Ray is imported lazily:
protocol/ stays light for the roles that never use it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from protocol.registry import EncoderEntry, EncoderRegistry, RegistryTable, RegistryView

NAMESPACE = "mmserve"
POLL_S = 0.5  # how often a watcher reads the table (a Ray call each; the zmq service pushes)
CALL_TIMEOUT_S = 5.0


class _TableActor:
    """The actor's body: the table, expired on every read (the actor's clock, one for all)."""

    def __init__(self, expire_s: float):
        self.table = RegistryTable(expire_s)

    def beat(self, entry: dict[str, str]) -> None:
        self.table.beat(EncoderEntry(**entry), time.monotonic())

    def leave(self, entry: dict[str, str]) -> None:
        self.table.leave(EncoderEntry(**entry))

    def view(self) -> dict[str, Any]:
        now = time.monotonic()
        self.table.expire(now)
        return msgspec.to_builtins(self.table.view(now))


class RayRegistry(EncoderRegistry):
    def __init__(self, addr: str, expire_s: float = 2.0):
        import ray

        self.name = addr.removeprefix("ray:")
        if not self.name:
            raise ValueError(f"a Ray registry address is ray:<actor name>, got {addr!r}")
        if not ray.is_initialized():
            ray.init(namespace=NAMESPACE, log_to_driver=False)
        # get_if_exists: the first process creates it, every later one finds the same actor.
        self.actor = ray.remote(num_cpus=0)(_TableActor).options(
            name=self.name, namespace=NAMESPACE, lifetime="detached",
            get_if_exists=True).remote(expire_s)

    @staticmethod
    def _entry(entry: EncoderEntry) -> dict[str, str]:
        return {"encoder_id": entry.encoder_id, "addr": entry.addr}

    def register(self, entry: EncoderEntry) -> None:
        import ray

        ray.get(self.actor.beat.remote(self._entry(entry)), timeout=CALL_TIMEOUT_S)

    def heartbeat(self, entry: EncoderEntry) -> None:
        self.actor.beat.remote(self._entry(entry))  # fire and forget: the beat thread moves on

    def leave(self, entry: EncoderEntry) -> None:
        import ray

        ray.get(self.actor.leave.remote(self._entry(entry)), timeout=CALL_TIMEOUT_S)

    async def watch(self, watcher_id: str, reply_host: str) -> AsyncIterator[RegistryView]:
        decode = msgspec.convert
        while True:
            yield decode(await self.actor.view.remote(), RegistryView)
            await asyncio.sleep(POLL_S)

    def close(self) -> None:
        """Nothing to release: the actor outlives this process, the Ray connection is shared."""


def remove(name: str) -> None:
    """Kill the named registry actor (tests; a cluster's teardown)."""
    import ray

    ray.kill(ray.get_actor(name, namespace=NAMESPACE))


def create_table(addr: str, scheduling_strategy: Any = None, expire_s: float = 2.0,
                 max_restarts: int = -1) -> Any:
    """Create the named table actor up front (deploy/), restarted by Ray when it dies: a new
    table is empty, and the encoders' next beats fill it again within a beat."""
    import ray

    name = addr.removeprefix("ray:")
    return ray.remote(num_cpus=0)(_TableActor).options(
        name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=max_restarts, scheduling_strategy=scheduling_strategy).remote(expire_s)
