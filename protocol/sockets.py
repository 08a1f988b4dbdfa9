"""The one place that opens zmq sockets: typed PUSH/PULL wrappers, sync and asyncio.

Every socket gets the same limits: high-water marks (back-pressure instead of unbounded queues),
a max message size (a peer can't make us allocate gigabytes), linger 0 (close never hangs) and
ZMTP heartbeats on tcp (a dead peer is noticed by the transport too).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from protocol.codec import ProtocolError, decode, encode

log = logging.getLogger(__name__)

HWM = 100_000
MAX_MSG_BYTES = 1 << 30  # embeddings of a long video fit; anything larger is an attack or a bug
HEARTBEAT_MS = 1000


def _configure(sock: zmq.Socket, max_msg_bytes: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * HEARTBEAT_MS)


def open_socket(
    ctx: zmq.Context, kind: int, addr: str, bind: bool, max_msg_bytes: int = MAX_MSG_BYTES
) -> zmq.Socket:
    sock = ctx.socket(kind)
    _configure(sock, max_msg_bytes)
    if bind:
        sock.bind(addr)
    else:
        sock.connect(addr)
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

    def close(self) -> None:
        self.sock.close(linger=0)


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
    def __init__(self, ctx: zmq.asyncio.Context, addr: str, bind: bool = False):
        self.addr = addr
        self.sock = open_socket(ctx, zmq.PUSH, addr, bind)

    async def send(self, msg: msgspec.Struct, buffers: Sequence[Any] = ()) -> None:
        await self.sock.send_multipart(encode(msg, buffers), copy=not buffers)

    def close(self) -> None:
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
