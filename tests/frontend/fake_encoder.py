"""A stand-in encoder process for pool tests: real sockets, no model."""

from __future__ import annotations

import asyncio
import threading
import time

import zmq

from protocol.addresses import tcp
from protocol.messages import EncodeDone, EncodeRequest, EncoderHeartbeat, EncoderStats, Hello
from protocol.registry import ItemFound, ItemLookup
from protocol.sockets import Receiver, Sender


class FakeEncoder:
    """Beats to every frontend that said Hello; answers each EncodeRequest after ``delay_s``
    (a uuid sent alone: 200 only if ``held`` has it, else 400, as a real store miss) and
    ItemLookup from ``held``, recording the keys it was sent."""

    def __init__(self, delay_s: float = 0.0, held: dict | None = None):
        self.addr, self.id, self.delay_s = tcp(), f"fake-{time.monotonic_ns()}", delay_s
        self.held = held or {}
        self.keys: list[str] = []
        self.ctx = zmq.Context()
        self.inbox = Receiver(self.ctx, self.addr, bind=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        out: dict[str, Sender] = {}
        pending: list[tuple[float, EncodeRequest]] = []
        last_beat = 0.0
        while not self.stop.is_set():
            got = self.inbox.recv(timeout_ms=10)
            msg = got[0] if got else None
            if isinstance(msg, Hello):
                out.setdefault(msg.reply_to, Sender(self.ctx, msg.reply_to))
            elif isinstance(msg, EncodeRequest):
                self.keys.append(msg.key)
                pending.append((time.monotonic() + self.delay_s, msg))
            elif isinstance(msg, ItemLookup):
                out.setdefault(msg.reply_to, Sender(self.ctx, msg.reply_to)).send(
                    ItemFound(msg.lookup_id, msg.key, self.held.get(msg.key),
                              msg.key in self.held))
            now = time.monotonic()
            for due, req in [p for p in pending if p[0] <= now]:
                pending.remove((due, req))
                alone = req.data is None and req.embeds is None
                if alone and req.key not in self.held:
                    out[req.reply_to].send(EncodeDone(req.key, req.request_id, 400,
                                                      "not in this store"))
                else:
                    out[req.reply_to].send(EncodeDone(req.key, req.request_id, 200))
            if now - last_beat > 0.05:
                for s in out.values():
                    s.send(EncoderHeartbeat(self.id, time.time(), EncoderStats(), self.addr))
                last_beat = now
        self.inbox.close()
        self.ctx.destroy(linger=0)  # a killed process: its connections drop at once

    def kill(self) -> None:
        self.stop.set()
        self.thread.join()


async def until(cond, timeout: float = 3.0) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0
