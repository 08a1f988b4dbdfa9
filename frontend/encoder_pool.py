"""The frontend's view of the encoder pool: who is alive, which encoder owns a key, and the
EncodeRequests in flight.

Keys are routed by rendezvous hashing over the live encoders, so an image always lands on the
encoder whose store already holds it, and losing an encoder only moves that encoder's keys.
An in-flight item whose encoder dies is re-sent to the new owner (the frontend keeps its bytes
until EncodeDone); with no encoder left it fails with 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import blake3
import zmq.asyncio

from frontend import env
from frontend.errors import EngineUnavailable, RequestError
from protocol.messages import EncodeDone, EncodeRequest, EncoderHeartbeat, EncoderStats, Hello
from protocol.sockets import AsyncSender

log = logging.getLogger(__name__)


class _Encoder:
    def __init__(self, ctx: zmq.asyncio.Context, addr: str):
        self.addr = addr
        self.sender = AsyncSender(ctx, addr, bind=False)
        self.last_beat = 0.0
        self.encoder_id = ""
        self.stats = EncoderStats()


class _InFlight:
    def __init__(self, req: EncodeRequest, buffers: Sequence[Any], owner: str):
        self.req, self.buffers, self.owner = req, buffers, owner
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()


def rendezvous(key: str, addrs: Sequence[str]) -> str:
    """The address with the highest hash(key, address): stable, and minimal moves on change."""
    return max(addrs, key=lambda a: blake3.blake3(f"{a}|{key}".encode()).digest(8))


class EncoderPool:
    def __init__(self, ctx: zmq.asyncio.Context, addrs: Sequence[str], reply_to: str,
                 frontend_id: str):
        self.encoders = {a: _Encoder(ctx, a) for a in addrs}
        self.reply_to = reply_to
        self.frontend_id = frontend_id
        self.dead_after = env.encoder_dead_after_s()
        self.inflight: dict[tuple[str, str], _InFlight] = {}  # (request_id, key)
        self._task: asyncio.Task | None = None

    def live(self) -> list[str]:
        now = time.monotonic()
        return [a for a, e in self.encoders.items() if now - e.last_beat < self.dead_after]

    @property
    def healthy(self) -> bool:
        return not self.encoders or bool(self.live())

    async def start(self) -> None:
        self._task = asyncio.create_task(self._liveness_loop(), name="encoder-liveness")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for e in self.encoders.values():
            e.sender.close()

    def on_message(self, msg: Any) -> None:
        """Called by the frontend's inbox for encoder traffic."""
        if isinstance(msg, EncoderHeartbeat):
            enc = self.encoders.get(msg.addr)
            if enc is None:
                return
            if enc.encoder_id != msg.encoder_id:
                log.info("encoder %s at %s is alive", msg.encoder_id, msg.addr)
                enc.encoder_id = msg.encoder_id
            enc.last_beat = time.monotonic()
            enc.stats = msg.stats
        elif isinstance(msg, EncodeDone):
            item = self.inflight.pop((msg.request_id, msg.key), None)
            if item is None or item.future.done():
                return
            if msg.status == 200:
                item.future.set_result(msg)
            elif 400 <= msg.status < 500:
                item.future.set_exception(RequestError(msg.message, "messages"))
            else:
                item.future.set_exception(EngineUnavailable(msg.message))

    async def encode(self, req: EncodeRequest, buffers: Sequence[Any] = ()) -> EncodeDone:
        """Send one item to its owner and wait for EncodeDone (re-sent if the owner dies)."""
        live = self.live()
        if not live:
            raise EngineUnavailable("no encoder is available")
        owner = rendezvous(req.key, live)
        item = _InFlight(req, buffers, owner)
        self.inflight[(req.request_id, req.key)] = item
        try:
            await self.encoders[owner].sender.send(req, buffers)
            return await item.future
        finally:
            self.inflight.pop((req.request_id, req.key), None)

    async def _liveness_loop(self) -> None:
        step = min(0.1, self.dead_after / 4)
        last_hello: dict[str, float] = {}
        while True:
            now = time.monotonic()
            live = set(self.live())
            for addr, enc in self.encoders.items():
                if addr not in live and now - last_hello.get(addr, 0.0) > 0.5:
                    await enc.sender.send(Hello(frontend_id=self.frontend_id,
                                                reply_to=self.reply_to))
                    last_hello[addr] = now
            await self._resend_orphans(live)
            await asyncio.sleep(step)

    async def _resend_orphans(self, live: set[str]) -> None:
        for item in list(self.inflight.values()):
            if item.owner in live or item.future.done():
                continue
            if not live:
                item.future.set_exception(EngineUnavailable("no encoder is available"))
                continue
            item.owner = rendezvous(item.req.key, sorted(live))
            log.warning("%s: encoder lost; re-sending %s to %s", item.req.request_id,
                        item.req.key, item.owner)
            await self.encoders[item.owner].sender.send(item.req, item.buffers)
