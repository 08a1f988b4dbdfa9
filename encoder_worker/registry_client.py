"""An encoder's membership of the pool (`mmserve encoder --join ADDR`) and its clean exit.

The announcer beats into the registry from its own thread, like the frontend heartbeats, so a
long tower batch never makes the encoder look gone. On SIGTERM the encoder leaves first (the
registry pushes the new view, frontends stop routing new keys here), drains what it holds,
then exits; whatever still reaches it after that is re-sent by the frontends when its link drops.
"""

from __future__ import annotations

import logging
import threading
import time

from encoder_worker.config import EncoderConfig
from protocol.registry import EncoderEntry, EncoderRegistry, connect_registry

log = logging.getLogger(__name__)

# After the goodbye, how long a frontend may still send here (the view is pushed at once, so
# this covers items already on the wire).
QUIET_S = 0.5
FLUSH_S = 0.2  # zmq writes on its IO thread: the last EncodeDones must leave before the close


class Announcer:
    def __init__(self, registry_addr: str, encoder_id: str, addr: str, period_s: float):
        self.registry: EncoderRegistry = connect_registry(registry_addr)
        self.entry = EncoderEntry(encoder_id, addr)
        self.period_s = period_s
        self._stop = threading.Event()
        self.registry.register(self.entry)
        self._thread = threading.Thread(target=self._beat, name="encoder-registry", daemon=True)
        self._thread.start()
        log.info("%s joined the pool at %s (registry %s)", encoder_id, addr, registry_addr)

    def _beat(self) -> None:
        while not self._stop.wait(self.period_s):
            self.registry.heartbeat(self.entry)

    def leave(self) -> None:
        """Stop beating and say goodbye (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.registry.leave(self.entry)
        log.info("%s leaves the pool", self.entry.encoder_id)

    def close(self) -> None:
        self.leave()
        self.registry.close()


class Membership:
    """This encoder's place in the pool: joined through ``config.join`` (or a fixed address
    that frontends were given), and when a leaving encoder may exit: nothing in flight, and no
    arrival for QUIET_S since the goodbye; or the drain deadline passed (frontends re-send the
    rest when its link drops)."""

    def __init__(self, config: EncoderConfig, encoder_id: str, addr: str):
        self.announcer = (Announcer(config.join, encoder_id, addr, config.heartbeat_s)
                          if config.join else None)
        self.timeout_s = config.drain_timeout_s
        # Without a registry nobody learns of the goodbye: wait only for the work in hand.
        self.quiet_s = QUIET_S if config.join else 0.0
        self.since: float | None = None
        self.last_arrival = float("-inf")

    def arrived(self) -> None:
        self.last_arrival = time.monotonic()

    def drained(self, busy: bool) -> bool:
        """Called by the leaving encoder's loop: the first call says goodbye."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
            if self.announcer is not None:
                self.announcer.leave()
        if now - self.since > self.timeout_s:
            log.warning("drain timed out after %.1f s with work in flight", self.timeout_s)
            return True
        return not busy and now - max(self.since, self.last_arrival) >= self.quiet_s

    def close(self) -> None:
        if self.announcer is not None:
            self.announcer.close()

