"""The frontend's view of the encoder pool: who is alive, which encoder owns a key, and the
EncodeRequests in flight.

Keys are routed by rendezvous hashing over the live encoders, so an image always lands on the
encoder whose store already holds it, and losing an encoder only moves that encoder's keys.
An encoder is live while its connection is up and its heartbeats arrive. Two signals end that:
the socket monitor reports the connection down (a dead process at once, since its kernel closes
the TCP connection; a hung or unreachable host within ZMTP's 0.3 s heartbeat timeout), and
heartbeat silence past MMSERVE_ENCODER_TIMEOUT (a stuck process whose socket still answers).
Either moves its in-flight items to the new owner at once (the frontend keeps their bytes until
EncodeDone). A connection that comes back up plus a heartbeat makes it live again, and it takes
its keys back. A request fails with 503 only after no encoder at all has been live for
the grace period, so a blip on every link (a reconnect, a stalled event loop) fails nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import blake3
import zmq.asyncio

from frontend import env
from frontend.errors import EngineUnavailable, RequestError
from protocol.messages import EncodeDone, EncodeRequest, EncoderHeartbeat, EncoderStats, Hello
from protocol.sockets import AsyncSender, Link

log = logging.getLogger(__name__)

LINK_HEARTBEAT_MS = 100  # ZMTP ping period to each encoder; no answer for 3x this drops the link
HELLO_EVERY_S = 0.5  # to an encoder that is not live (it may have restarted and forgotten us)
TICK_S = 0.05


class _Encoder:
    def __init__(self, ctx: zmq.asyncio.Context, addr: str):
        self.addr = addr
        self.sender = AsyncSender(ctx, addr, bind=False, heartbeat_ms=LINK_HEARTBEAT_MS,
                                  watch=True)
        self.connected = False  # per the socket monitor
        self.epoch = 0  # +1 per disconnect: what was sent before may have died in a TCP buffer
        self.last_beat = float("-inf")
        self.last_hello = float("-inf")
        self.encoder_id = ""
        self.stats = EncoderStats()

    def live(self, now: float, dead_after: float) -> bool:
        return self.connected and now - self.last_beat < dead_after


class _InFlight:
    def __init__(self, req: EncodeRequest, buffers: Sequence[Any]):
        self.req, self.buffers = req, buffers
        self.owner, self.epoch = "", -1
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
        # How long no encoder may be live before requests fail: outlasts a reconnect + a beat.
        self.grace_s = max(1.0, self.dead_after)
        self.inflight: dict[tuple[str, str], _InFlight] = {}  # (request_id, key)
        # Answered items of requests still running, by (request_id, key): an EncodeDone can
        # overtake its embedding (two connections), so a SIGKILL right after it may lose the
        # embedding in the dead process's buffers while the request waits in the decoder.
        self.delivered: dict[tuple[str, str], _InFlight] = {}
        self._none_live_since: float | None = None  # set by our own ticks, so a stalled loop
        self._ever_live = False  # (beats unread in the socket) does not eat the grace
        self._tasks: list[asyncio.Task] = []
        # Each beat's stats, by (address, encoder id): folded into the frontend's metrics.
        self.on_stats: Callable[[str, str, EncoderStats], None] | None = None

    def live(self) -> list[str]:
        now = time.monotonic()
        return [a for a, e in self.encoders.items() if e.live(now, self.dead_after)]

    @property
    def state(self) -> str:
        """"ready" while an encoder is live (or the last one went less than the grace ago),
        "starting" until the first one is, "dead" once none has been live for the grace."""
        if not self.encoders or self.live():
            return "ready"
        if not self._ever_live:
            return "starting"
        return "dead" if self._out_of_grace() else "ready"

    @property
    def healthy(self) -> bool:
        return self.state == "ready"

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._liveness_loop(), name="encoder-liveness")]
        self._tasks += [asyncio.create_task(self._watch(e), name=f"encoder-link {e.addr}")
                        for e in self.encoders.values()]

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
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
            if self.on_stats is not None:
                self.on_stats(msg.addr, msg.encoder_id, msg.stats)
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
        while not live:  # every link may be blipping at once: wait out the grace, then 503
            if self._out_of_grace():
                raise EngineUnavailable("no encoder is available")
            await asyncio.sleep(TICK_S)
            live = self.live()
        item = _InFlight(req, buffers)
        self.inflight[(req.request_id, req.key)] = item
        try:
            await self._send_to(item, rendezvous(req.key, live))
            done = await item.future
            self.delivered[(req.request_id, req.key)] = item
            return done
        finally:
            self.inflight.pop((req.request_id, req.key), None)

    def settle(self, request_id: str) -> None:
        """The request is over: its items need no re-delivery any more."""
        for k in [k for k in self.delivered if k[0] == request_id]:
            del self.delivered[k]

    async def _redeliver(self, addr: str) -> None:
        """``addr``'s link dropped: send what it answered for running requests again, to the
        items' new owners (fire and forget: the decoder takes a duplicate embedding as a
        replacement, and nobody waits on these EncodeDones)."""
        live = self.live()
        for item in list(self.delivered.values()):
            if item.owner == addr and live:
                log.warning("%s: re-delivering %s (answered by %s, which died)",
                            item.req.request_id, item.req.key, addr)
                await self._send_to(item, rendezvous(item.req.key, live))

    def _out_of_grace(self) -> bool:
        since = self._none_live_since
        return since is not None and time.monotonic() - since > self.grace_s

    async def _send_to(self, item: _InFlight, addr: str) -> None:
        enc = self.encoders[addr]
        item.owner, item.epoch = addr, enc.epoch  # taken before the await a disconnect may cut
        await enc.sender.send(item.req, item.buffers)

    async def _watch(self, enc: _Encoder) -> None:
        """Follow one encoder's connection; a drop moves its items now."""
        async for link in enc.sender.links():
            if link is Link.UP:
                enc.connected = True
                enc.last_hello = time.monotonic()  # a restarted encoder must learn our address
                await enc.sender.send(Hello(frontend_id=self.frontend_id,
                                            reply_to=self.reply_to))
            else:
                enc.connected = False
                enc.epoch += 1
                n = sum(1 for it in self.inflight.values() if it.owner == enc.addr)
                log.warning("encoder %s at %s disconnected; moving %d in-flight items",
                            enc.encoder_id or "?", enc.addr, n)
                await self._move_orphans()
                await self._redeliver(enc.addr)

    async def _liveness_loop(self) -> None:
        while True:
            now = time.monotonic()
            live = self.live()
            if live:
                self._none_live_since, self._ever_live = None, True
            elif self._none_live_since is None:
                self._none_live_since = now
            for addr, enc in self.encoders.items():
                if addr not in live and now - enc.last_hello > HELLO_EVERY_S:
                    enc.last_hello = now
                    await enc.sender.send(Hello(frontend_id=self.frontend_id,
                                                reply_to=self.reply_to))
            await self._move_orphans()
            await asyncio.sleep(TICK_S)

    async def _move_orphans(self) -> None:
        """Re-send every item whose owner is not live or whose link dropped since it was sent."""
        now = time.monotonic()
        live = self.live()
        for item in list(self.inflight.values()):
            enc = self.encoders[item.owner] if item.owner else None
            if item.future.done() or enc is None or (enc.live(now, self.dead_after)
                                                     and enc.epoch == item.epoch):
                continue
            if not live:
                if self._out_of_grace():
                    item.future.set_exception(EngineUnavailable("no encoder is available"))
                continue  # wait for one to come back
            owner = rendezvous(item.req.key, live)
            log.warning("%s: encoder %s lost; re-sending %s to %s", item.req.request_id,
                        item.owner, item.req.key, owner)
            await self._send_to(item, owner)
