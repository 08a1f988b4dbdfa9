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

Membership: the encoders given at start-up stay; with a registry (`EncoderRegistry.watch`),
encoders join and leave while serving (frontend/media/encoder_members.py). A leaving encoder
takes no new keys but finishes what it holds; once it is forgotten, anything left moves on.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import blake3
import zmq.asyncio

from frontend import env
from frontend.errors import EngineUnavailable, RequestError
from frontend.media.encoder_members import EncoderLink, apply_view, departed
from protocol import timeline
from protocol.addresses import LOOPBACK
from protocol.messages import EncodeDone, EncodeRequest, EncoderHeartbeat, EncoderStats, Hello
from protocol.registry import (
    EncoderRegistry,
    ItemFound,
    ItemLookup,
    RegistryView,
    connect_registry,
)
from protocol.sockets import Link

if TYPE_CHECKING:
    from frontend.config import FrontendConfig

log = logging.getLogger(__name__)

HELLO_EVERY_S = 0.5  # to an encoder that is not live (it may have restarted and forgotten us)
TICK_S = 0.05
LOOKUP_TIMEOUT_S = 5.0  # an encoder busy in a long CPU tower batch answers late


class _InFlight:
    def __init__(self, req: EncodeRequest, buffers: Sequence[Any]):
        self.req, self.buffers = req, buffers
        self.owner, self.epoch = "", -1
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()


def pool_for(config: FrontendConfig, ctx: zmq.asyncio.Context, reply_to: str,
             frontend_id: str) -> EncoderPool | None:
    """The pool a frontend's config asks for: fixed encoder addresses, a registry, or both
    (None: the server runs no encoders)."""
    if not config.encoder_addrs and config.encoder_registry is None:
        return None
    registry = connect_registry(config.encoder_registry) if config.encoder_registry else None
    return EncoderPool(ctx, config.encoder_addrs, reply_to, frontend_id, registry)


def rendezvous(key: str, addrs: Sequence[str]) -> str:
    """The address with the highest hash(key, address): stable, and minimal moves on change."""
    return max(addrs, key=lambda a: blake3.blake3(f"{a}|{key}".encode()).digest(8))


class EncoderPool:
    def __init__(self, ctx: zmq.asyncio.Context, addrs: Sequence[str], reply_to: str,
                 frontend_id: str, registry: EncoderRegistry | None = None):
        self.ctx = ctx
        self.encoders = {a: EncoderLink(ctx, a, static=True) for a in addrs}
        self.registry = registry
        self.lookups: dict[str, asyncio.Future] = {}  # ItemLookup id -> its ItemFound
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
        """The encoders keys are routed over: members that answer."""
        now = time.monotonic()
        return [a for a, e in self.encoders.items() if e.member and e.live(now, self.dead_after)]

    @property
    def state(self) -> str:
        """"ready" while an encoder is live (or the last one went less than the grace ago),
        "starting" until the first one is, "dead" once none has been live for the grace."""
        if (not self.encoders and self.registry is None) or self.live():
            return "ready"
        if not self._ever_live:
            return "starting"
        return "dead" if self._out_of_grace() else "ready"

    @property
    def healthy(self) -> bool:
        return self.state == "ready"

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._liveness_loop(), name="encoder-liveness")]
        if self.registry is not None:
            self._tasks.append(asyncio.create_task(self._follow(), name="encoder-registry"))
        for enc in self.encoders.values():
            enc.task = asyncio.create_task(self._watch(enc), name=f"encoder-link {enc.addr}")

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for e in self.encoders.values():
            e.close()

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
        elif isinstance(msg, ItemFound):
            fut = self.lookups.get(msg.lookup_id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
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

    async def encode(self, req: EncodeRequest, buffers: Sequence[Any] = (),
                     on_sent: Callable[[], None] | None = None) -> EncodeDone:
        """Send one item to its owner and wait for EncodeDone (re-sent if the owner dies);
        ``on_sent`` is called once the first send is out.

        A uuid named alone that its owner does not hold is looked for on the other live
        encoders before the 400 stands: a pool change moves keys, not stores, so the encoder
        that had the key when the item was sent still holds it."""
        live = self.live()
        while not live:  # every link may be blipping at once: wait out the grace, then 503
            if self._out_of_grace():
                raise EngineUnavailable("no encoder is available")
            await asyncio.sleep(TICK_S)
            live = self.live()
        owner = rendezvous(req.key, live)
        try:
            return await self._encode_at(req, buffers, owner, on_sent)
        except RequestError:
            if req.data is not None or req.embeds is not None:
                raise
            found = await self._find(req.key, [a for a in self.live() if a != owner])
            if found is None:
                raise
            log.info("%s: %s is not at its owner %s; %s holds it", req.request_id, req.key,
                     owner, found[0])
            return await self._encode_at(req, buffers, found[0])

    async def _encode_at(self, req: EncodeRequest, buffers: Sequence[Any], addr: str,
                         on_sent: Callable[[], None] | None = None) -> EncodeDone:
        item = _InFlight(req, buffers)
        self.inflight[(req.request_id, req.key)] = item
        try:
            await self._send_to(item, addr)
            timeline.mark("encode_sent", f"{req.request_id}|{req.key}")
            if on_sent is not None:
                on_sent()
            done = await item.future
            timeline.mark("encode_done", f"{req.request_id}|{req.key}")
            self.delivered[(req.request_id, req.key)] = item
            return done
        finally:
            self.inflight.pop((req.request_id, req.key), None)

    async def lookup(self, key: str) -> dict[str, Any] | None:
        """The geometry of an item in a live encoder's store (a uuid another frontend resolved):
        its owner is asked first, then, on a miss, every other live encoder. None when nobody
        holds it or nobody answers in time."""
        live = self.live()
        if not live:
            return None
        owner = rendezvous(key, live)
        found = await self._find(key, [owner])
        if found is None:
            found = await self._find(key, [a for a in live if a != owner])
        return None if found is None else found[1]

    async def _find(self, key: str, addrs: Sequence[str]
                    ) -> tuple[str, dict[str, Any] | None] | None:
        """(address, geometry) of the first of ``addrs`` to say it holds ``key``, asked all at
        once; None when none does or none answers within LOOKUP_TIMEOUT_S."""
        asked: dict[str, str] = {}  # lookup id -> address
        loop = asyncio.get_running_loop()
        try:
            for addr in addrs:
                enc = self.encoders.get(addr)
                if enc is None:
                    continue
                lookup_id = uuid.uuid4().hex
                asked[lookup_id] = addr
                self.lookups[lookup_id] = loop.create_future()
                await enc.sender.send(ItemLookup(lookup_id, key, self.reply_to))
            pending = {self.lookups[i] for i in asked}
            deadline = loop.time() + LOOKUP_TIMEOUT_S
            while pending:
                done, pending = await asyncio.wait(pending, timeout=deadline - loop.time(),
                                                   return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    log.warning("no answer to the lookup of %s in %.0f s", key,
                                LOOKUP_TIMEOUT_S)
                    return None
                for fut in done:
                    found: ItemFound = fut.result()
                    if found.held:
                        return asked[found.lookup_id], found.geometry
            return None
        finally:
            for lookup_id in asked:
                self.lookups.pop(lookup_id, None)

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
        enc = self.encoders.get(addr)
        if enc is None:  # forgotten during the caller's awaits: the next tick picks another
            item.owner, item.epoch = addr, -1
            return
        item.owner, item.epoch = addr, enc.epoch  # taken before the await a disconnect may cut
        await enc.sender.send(item.req, item.buffers)

    async def _watch(self, enc: EncoderLink) -> None:
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
            for addr, enc in list(self.encoders.items()):  # a view may add some meanwhile
                if enc.member and addr not in live and now - enc.last_hello > HELLO_EVERY_S:
                    enc.last_hello = now
                    await enc.sender.send(Hello(frontend_id=self.frontend_id,
                                                reply_to=self.reply_to))
            await self._move_orphans()
            await self._forget_departed(now)
            await asyncio.sleep(TICK_S)

    async def _move_orphans(self) -> None:
        """Re-send every item whose owner is not live or whose link dropped since it was sent."""
        now = time.monotonic()
        live = self.live()
        for item in list(self.inflight.values()):
            if item.future.done() or not item.owner:  # answered, or not sent yet
                continue
            enc = self.encoders.get(item.owner)  # None: forgotten since (it left the pool)
            if enc is not None and enc.live(now, self.dead_after) and enc.epoch == item.epoch:
                continue
            if not live:
                if self._out_of_grace():
                    item.future.set_exception(EngineUnavailable("no encoder is available"))
                continue  # wait for one to come back
            owner = rendezvous(item.req.key, live)
            log.warning("%s: encoder %s lost; re-sending %s to %s", item.req.request_id,
                        item.owner, item.req.key, owner)
            await self._send_to(item, owner)

    # -- membership (the registry) --------------------------------------------------------------

    async def _follow(self) -> None:
        assert self.registry is not None
        # Views come back to this frontend's host (the one its reply address is on).
        scheme, rest = self.reply_to.split("://", 1)
        host = rest.rsplit(":", 1)[0] if scheme == "tcp" else LOOPBACK
        while True:
            try:
                async for view in self.registry.watch(self.frontend_id, host):
                    self._apply(view)
            except Exception:  # the pool keeps its last view; a fresh watch catches up
                log.exception("watching the encoder registry failed; retrying")
                await asyncio.sleep(1.0)

    def _apply(self, view: RegistryView) -> None:
        def new_link(addr: str) -> EncoderLink:
            link = EncoderLink(self.ctx, addr, static=False)
            link.task = asyncio.create_task(self._watch(link), name=f"encoder-link {addr}")
            return link

        apply_view(self.encoders, view, new_link)

    async def _forget_departed(self, now: float) -> None:
        """The next tick moves whatever the forgotten ones still held."""
        for link in departed(self.encoders, now):
            if link.connected:  # stuck, never disconnected: what it answered may be lost
                await self._redeliver(link.addr)
