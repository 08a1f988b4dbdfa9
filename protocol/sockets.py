"""The one place that opens zmq sockets: typed PUSH/PULL wrappers (and a PUSH fan-out), sync
and asyncio.

Every socket gets the same limits: high-water marks (back-pressure instead of unbounded queues),
a max message size (a peer can't make us allocate gigabytes), linger 0 (close never hangs) and
ZMTP heartbeats on tcp (a dead peer is noticed by the transport too). A watched AsyncSender also
reports its connection going up and down (zmq's socket monitor), so a peer whose process dies is
noticed the moment its kernel closes the TCP connection.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from enum import IntEnum
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from protocol.codec import ProtocolError, decode, encode

log = logging.getLogger(__name__)

HWM = 100_000
MAX_MSG_BYTES = 1 << 30  # embeddings of a long video fit; anything larger is an attack or a bug
HEARTBEAT_MS = 1000




class Link(IntEnum):
    """A watched socket's connection to its peer (from zmq's socket monitor)."""

    UP = 1  # ZMTP handshake done: messages flow
    DOWN = 2  # the connection closed (peer died, heartbeat timeout, network); zmq reconnects


_LINK_EVENTS = {zmq.EVENT_HANDSHAKE_SUCCEEDED: Link.UP, zmq.EVENT_DISCONNECTED: Link.DOWN}


def _configure(sock: zmq.Socket, max_msg_bytes: int, heartbeat_ms: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * heartbeat_ms)


def open_socket(
    ctx: zmq.Context, kind: int, addr: str, bind: bool, max_msg_bytes: int = MAX_MSG_BYTES,
    heartbeat_ms: int = HEARTBEAT_MS, watch: bool = False,
) -> zmq.Socket:
    """A configured socket; ``watch`` attaches a monitor (``sock.get_monitor_socket()`` returns
    it) before connecting, so the first handshake is not missed."""
    sock = ctx.socket(kind)
    _configure(sock, max_msg_bytes, heartbeat_ms)
    if watch:
        mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        mon.setsockopt(zmq.LINGER, 0)
    try:
        if bind:
            sock.bind(addr)
        else:
            sock.connect(addr)
    except zmq.ZMQError:
        sock.close(linger=0)  # a socket left open would hang the context's term()
        raise
    return sock


def _decode_or_none(frames: Sequence[Any], where: str) -> tuple[msgspec.Struct, list[Any]] | None:
    try:
        return decode(frames)
    except ProtocolError as e:
        log.warning("dropped bad message on %s: %s", where, e)
        return None


class Sender:
    """PUSH socket that sends typed messages (blocking only when the peer's queue is full)."""

    def __init__(self, ctx: zmq.Context, addr: str, bind: bool = False):
        self.addr = addr
        self.sock = open_socket(ctx, zmq.PUSH, addr, bind)

    def send(self, msg: msgspec.Struct, buffers: Sequence[Any] = ()) -> None:
        self.sock.send_multipart(encode(msg, buffers), copy=not buffers)

    def try_send(self, msg: msgspec.Struct, buffers: Sequence[Any] = ()) -> bool:
        """Send unless the peer's queue is full (False): a peer that stopped reading must not
        stall a thread that also serves other peers. A message is atomic: all frames or none."""
        try:
            self.sock.send_multipart(encode(msg, buffers), flags=zmq.NOBLOCK, copy=not buffers)
        except zmq.Again:
            return False
        return True

    def close(self, linger_ms: int = 0) -> None:
        """``linger_ms``: how long queued messages may still go out (a last word before exit)."""
        self.sock.close(linger=linger_ms)


class Fanout:
    """One PUSH socket per peer (the engine's step to each of its TP workers): a message is
    encoded once and the same frames go to every peer, zero-copy. Sends never block: a peer
    that is gone makes ``send`` return False instead of stalling the caller."""

    def __init__(self, ctx: zmq.Context, addrs: Sequence[str], bind: bool = True):
        self.addrs = list(addrs)
        self.socks = [open_socket(ctx, zmq.PUSH, addr, bind) for addr in self.addrs]

    def send(self, msg: msgspec.Struct, buffers: Sequence[Any] = ()) -> bool:
        """True when every peer took the message (False: one had no connection or a full
        queue; earlier peers may have it)."""
        frames = encode(msg, buffers)
        for sock in self.socks:
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=not buffers)
            except zmq.Again:
                return False
        return True

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)


class Receiver:
    """PULL socket that yields decoded messages and drops (and logs) anything malformed."""

    def __init__(self, ctx: zmq.Context, addr: str, bind: bool = True):
        self.addr = addr
        self.sock = open_socket(ctx, zmq.PULL, addr, bind)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)

    def recv(self, timeout_ms: int | None = None) -> tuple[msgspec.Struct, list[Any]] | None:
        """Next valid message, or None when ``timeout_ms`` passes without one."""
        while self.poller.poll(timeout_ms):
            frames = self.sock.recv_multipart(copy=False)
            out = _decode_or_none([f.buffer for f in frames], self.addr)
            if out is not None:
                return out
        return None

    def close(self) -> None:
        self.sock.close(linger=0)


class AsyncSender:
    """PUSH socket for asyncio; ``watch=True`` makes ``links()`` report its connection."""

    def __init__(self, ctx: zmq.asyncio.Context, addr: str, bind: bool = False,
                 heartbeat_ms: int = HEARTBEAT_MS, watch: bool = False):
        self.addr = addr
        self.sock = open_socket(ctx, zmq.PUSH, addr, bind, heartbeat_ms=heartbeat_ms,
                                watch=watch)
        self._monitor = self.sock.get_monitor_socket() if watch else None

    async def send(self, msg: msgspec.Struct, buffers: Sequence[Any] = ()) -> None:
        await self.sock.send_multipart(encode(msg, buffers), copy=not buffers)

    async def links(self) -> AsyncIterator[Link]:
        """Link.UP / Link.DOWN as the connection changes, until the socket is closed."""
        assert self._monitor is not None, "links() needs AsyncSender(..., watch=True)"
        while not self._monitor.closed:
            try:
                event = await recv_monitor_message(self._monitor)  # type: ignore[misc]
            except (zmq.ZMQError, RuntimeError):  # closed under us
                return
            link = _LINK_EVENTS.get(event["event"])
            if link is not None:
                yield link

    def close(self) -> None:
        if self._monitor is not None:
            self.sock.disable_monitor()
            self._monitor.close(linger=0)
        self.sock.close(linger=0)


class AsyncReceiver:
    def __init__(self, ctx: zmq.asyncio.Context, addr: str, bind: bool = True):
        self.addr = addr
        self.sock = open_socket(ctx, zmq.PULL, addr, bind)

    async def recv(self) -> tuple[msgspec.Struct, list[Any]]:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            out = _decode_or_none([f.buffer for f in frames], self.addr)
            if out is not None:
                return out

    def close(self) -> None:
        self.sock.close(linger=0)
