"""Who is in the encoder pool, and what an encoder holds: the registry's messages, its table, the
`EncoderRegistry` interface both roles use, and its ZeroMQ client.

Encoders beat into the registry (the first beat registers) and say goodbye on a clean exit;
frontends watch it and route by rendezvous hashing over the live members. The registry only
says who exists: a frontend still decides liveness from its own link and heartbeats per
encoder, so a killed encoder is dropped from routing at once, before the registry expires it.
A frontend also asks an encoder for an item it never saw (`ItemLookup`): a uuid that another
frontend resolved is found in the shared store, with the geometry it was sized by.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from protocol.messages import MsgType, _Data, _Handshake

WATCH_EVERY_S = 1.0  # a watcher repeats RegistryWatch (a restarted registry must learn it)


class EncoderEntry(_Handshake):
    encoder_id: str
    addr: str  # the encoder's input address, as frontends reach it


class RegistryBeat(_Handshake):
    """Encoder -> registry, every period: 'I am serving at entry.addr' (the first one joins)."""

    entry: EncoderEntry


class RegistryLeave(_Handshake):
    """Encoder -> registry: 'route nothing new to me' (it drains what it has, then exits)."""

    entry: EncoderEntry


class RegistryWatch(_Handshake):
    """Frontend -> registry: 'push views of the pool to reply_to'."""

    watcher_id: str
    reply_to: str


class RegistryView(_Handshake):
    """Registry -> watchers, on every change and every refresh period. ``complete`` is False
    while a fresh registry may not have heard from every live encoder yet (its first expiry
    period): then a watcher adds what it sees and removes nothing."""

    registry_id: str
    version: int
    encoders: list[EncoderEntry]
    complete: bool = True


class ItemLookup(_Data):
    """Frontend -> an encoder (the one that owns ``key``, or after a miss there every other live
    one): do you hold it, and sized how?"""

    lookup_id: str
    key: str
    reply_to: str


class ItemFound(_Data):
    """Encoder -> frontend: whether the item is in its store (``held``) and the ``geometry`` it
    was encoded with (`ItemGeometry.to_meta()`; None for a model whose items have none)."""

    lookup_id: str
    key: str
    geometry: dict[str, Any] | None = None
    held: bool = False


REGISTRY_MESSAGE_TYPES: dict[MsgType, type[msgspec.Struct]] = {
    MsgType.REGISTRY_BEAT: RegistryBeat,
    MsgType.REGISTRY_LEAVE: RegistryLeave,
    MsgType.REGISTRY_WATCH: RegistryWatch,
    MsgType.REGISTRY_VIEW: RegistryView,
    MsgType.ITEM_LOOKUP: ItemLookup,
    MsgType.ITEM_FOUND: ItemFound,
}


class RegistryTable:
    """The registry's state, by address (a restarted encoder keeps its address and gets a new
    id). Pure: the ZeroMQ service (frontend/registry.py) or a Ray actor wraps it."""

    def __init__(self, expire_s: float):
        self.expire_s = expire_s
        self.registry_id = f"registry-{uuid.uuid4().hex[:8]}"
        self.started = time.monotonic()
        self.version = 0
        self._seen: dict[str, tuple[str, float]] = {}  # addr -> (encoder_id, last beat)

    def beat(self, entry: EncoderEntry, now: float) -> bool:
        """True when the membership changed (a new address, or a new process at one)."""
        old = self._seen.get(entry.addr)
        self._seen[entry.addr] = (entry.encoder_id, now)
        return self._bump(old is None or old[0] != entry.encoder_id)

    def leave(self, entry: EncoderEntry) -> bool:
        # Only the process that registered: a late goodbye must not remove its successor.
        old = self._seen.get(entry.addr)
        if old is None or old[0] != entry.encoder_id:
            return False
        del self._seen[entry.addr]
        return self._bump(True)

    def expire(self, now: float) -> bool:
        gone = [a for a, (_, t) in self._seen.items() if now - t > self.expire_s]
        for addr in gone:
            del self._seen[addr]
        return self._bump(bool(gone))

    def view(self, now: float) -> RegistryView:
        return RegistryView(self.registry_id, self.version,
                            [EncoderEntry(i, a) for a, (i, _) in self._seen.items()],
                            complete=now - self.started >= self.expire_s)

    def _bump(self, changed: bool) -> bool:
        self.version += changed
        return changed


class EncoderRegistry(ABC):
    """The pool's membership, as each role sees it. Encoders call ``register`` once, then
    ``heartbeat`` every period (from an IO thread) and ``leave`` on a clean exit; frontends
    iterate ``watch``. Implementations are picked by the address's scheme (`connect_registry`)."""

    @abstractmethod
    def register(self, entry: EncoderEntry) -> None: ...

    @abstractmethod
    def heartbeat(self, entry: EncoderEntry) -> None: ...

    @abstractmethod
    def leave(self, entry: EncoderEntry) -> None: ...

    @abstractmethod
    def watch(self, watcher_id: str, reply_host: str) -> AsyncIterator[RegistryView]:
        """Views of the pool as they change (asyncio), until the caller stops iterating.
        ``reply_host``: an address of this process that the registry can reach."""

    @abstractmethod
    def close(self) -> None:
        """Release sockets (after ``leave``, once its goodbye has gone out)."""


class ZmqRegistry(EncoderRegistry):
    """The client of the ZeroMQ registry service at ``addr`` (`mmserve registry`)."""

    def __init__(self, addr: str):
        self.addr = addr
        self._sender: Any = None  # sync PUSH, made on first use by the encoder's beat thread

    def register(self, entry: EncoderEntry) -> None:
        self.heartbeat(entry)

    def heartbeat(self, entry: EncoderEntry) -> None:
        self._send(RegistryBeat(entry))

    def leave(self, entry: EncoderEntry) -> None:
        self._send(RegistryLeave(entry))

    def _send(self, msg: msgspec.Struct) -> None:
        if self._sender is None:
            import zmq

            from protocol.sockets import Sender

            self._sender = Sender(zmq.Context.instance(), self.addr)
        self._sender.try_send(msg)  # a registry that is down must not stall the beat thread

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close(linger_ms=500)  # the goodbye still goes out
            self._sender = None

    async def watch(self, watcher_id: str, reply_host: str) -> AsyncIterator[RegistryView]:
        import asyncio

        import zmq.asyncio

        from protocol.addresses import tcp
        from protocol.sockets import AsyncReceiver, AsyncSender

        ctx = zmq.asyncio.Context()
        reply_to = tcp(reply_host)
        inbox = AsyncReceiver(ctx, reply_to, bind=True)
        out = AsyncSender(ctx, self.addr, bind=False)
        hello = RegistryWatch(watcher_id, reply_to)

        async def keep_asking() -> None:
            while True:
                await out.send(hello)
                await asyncio.sleep(WATCH_EVERY_S)

        asker = asyncio.create_task(keep_asking(), name="registry-watch")
        try:
            while True:
                msg, _ = await inbox.recv()
                if isinstance(msg, RegistryView):
                    yield msg
        finally:
            asker.cancel()
            inbox.close()
            out.close()
            ctx.term()


def _ray_registry(addr: str) -> EncoderRegistry:
    from protocol.ray_registry import RayRegistry  # imports ray: only when asked for

    return RayRegistry(addr)


# By the address's scheme: the ZeroMQ service (`mmserve registry`), or a named Ray actor.
REGISTRIES = {"tcp": ZmqRegistry, "ipc": ZmqRegistry, "ray": _ray_registry}


def check_registry_addr(addr: str, name: str) -> None:
    if addr.split(":", 1)[0] not in REGISTRIES or addr.endswith(":"):
        raise ValueError(f"{name} must be a registry address (tcp://host:port, ipc://path or "
                         f"ray:<actor name>), got {addr!r}")


def connect_registry(addr: str) -> EncoderRegistry:
    """The registry client for ``addr``."""
    check_registry_addr(addr, "registry address")
    return REGISTRIES[addr.split(":", 1)[0]](addr)
