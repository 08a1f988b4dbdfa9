"""`mmserve registry`: the encoder pool's registry as a small ZeroMQ service.

One PULL socket takes beats and goodbyes from encoders and watch requests from frontends; a view
of the pool goes to every watcher at once on a change, and again every refresh period (so a
frontend that missed one, or a restarted registry's watchers, catch up). It runs in its own
process (`mmserve registry`, for deploy/) or on a thread of `mmserve serve`'s launcher. Under Ray
the same `RegistryTable` lives in a named actor instead (see protocol/registry.py).
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import zmq

from protocol.registry import (
    RegistryBeat,
    RegistryLeave,
    RegistryTable,
    RegistryView,
    RegistryWatch,
)
from protocol.sockets import Receiver, Sender

log = logging.getLogger(__name__)

EXPIRE_S = 2.0  # an encoder silent this long leaves the pool (frontends drop a dead one sooner)
REFRESH_S = 0.5  # every watcher gets the view at least this often
WATCHER_EXPIRE_S = 5.0  # a frontend that stopped asking (gone) gets no more views


class RegistryService:
    def __init__(self, addr: str, expire_s: float = EXPIRE_S):
        self.addr = addr
        self.table = RegistryTable(expire_s)
        self._ctx = zmq.Context()
        self._receiver = Receiver(self._ctx, addr, bind=True)
        self._watchers: dict[str, tuple[Sender, float]] = {}  # reply_to -> (sender, last ask)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def serve(self) -> None:
        """Blocks until ``stop``."""
        log.info("encoder registry %s at %s", self.table.registry_id, self.addr)
        last_push = 0.0
        while not self._stop.is_set():
            got = self._receiver.recv(timeout_ms=int(REFRESH_S * 1000 / 5))
            now = time.monotonic()
            changed = self._handle(got[0], now) if got is not None else False
            changed |= self.table.expire(now)
            if changed or now - last_push >= REFRESH_S:
                self._push(self.table.view(now), now)
                last_push = now
        self._close()

    def start(self) -> RegistryService:
        """Serve on a daemon thread (inside `mmserve serve`'s launcher)."""
        self._thread = threading.Thread(target=self.serve, name="encoder-registry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def _handle(self, msg: object, now: float) -> bool:
        if isinstance(msg, RegistryBeat):
            changed = self.table.beat(msg.entry, now)
            if changed:
                log.info("encoder %s joined at %s", msg.entry.encoder_id, msg.entry.addr)
            return changed
        if isinstance(msg, RegistryLeave):
            changed = self.table.leave(msg.entry)
            if changed:
                log.info("encoder %s at %s leaves", msg.entry.encoder_id, msg.entry.addr)
            return changed
        if isinstance(msg, RegistryWatch):
            known = self._watchers.get(msg.reply_to)
            try:
                sender = known[0] if known else Sender(self._ctx, msg.reply_to)
            except zmq.ZMQError as e:  # a malformed address from a peer: drop, keep serving
                log.warning("cannot watch for %r: %s", msg.reply_to, e)
                return False
            self._watchers[msg.reply_to] = (sender, now)
            if known is None:
                log.info("frontend %s watches the pool", msg.watcher_id)
                sender.try_send(self.table.view(now))  # its first view now, not at the refresh
            return False
        log.warning("unexpected %s on the registry", type(msg).__name__)
        return False

    def _push(self, view: RegistryView, now: float) -> None:
        for reply_to, (sender, asked) in list(self._watchers.items()):
            if now - asked > WATCHER_EXPIRE_S:
                sender.close()
                del self._watchers[reply_to]
            else:
                sender.try_send(view)  # a watcher that stopped reading must not stall the rest

    def _close(self) -> None:
        for sender, _ in self._watchers.values():
            sender.close()
        self._receiver.close()
        self._ctx.term()


def run_registry(addr: str, expire_s: float = EXPIRE_S) -> int:
    """`mmserve registry`: serve until SIGTERM/SIGINT."""
    service = RegistryService(addr, expire_s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.stop())
    service.serve()
    return 0
