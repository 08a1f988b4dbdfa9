"""The encoders one frontend knows: each one's link and liveness, and the membership that the
registry's views change (`frontend.media.encoder_pool.EncoderPool` routes over them).

The encoders given at start-up (``static``) always stay. One the registry lists joins; one it
no longer lists leaves: it takes no new keys but keeps what it holds while it answers, since it
drains before it exits. It is forgotten once its link is down, or when it outstays
FORGET_AFTER_S (stuck draining).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import zmq.asyncio

from protocol.messages import EncoderStats
from protocol.registry import RegistryView
from protocol.sockets import AsyncSender

log = logging.getLogger(__name__)

LINK_HEARTBEAT_MS = 100  # ZMTP ping period to each encoder; no answer for 3x this drops the link
FORGET_AFTER_S = 60.0  # a left encoder still connected by then is stuck draining


class EncoderLink:
    def __init__(self, ctx: zmq.asyncio.Context, addr: str, static: bool):
        self.addr = addr
        self.static = static  # given at start-up: in the pool whatever the registry says
        self.member = True  # False once the registry dropped it: no new keys
        self.left_at = float("inf")
        self.task: asyncio.Task | None = None  # follows the link (`EncoderPool._watch`)
        self.sender = AsyncSender(ctx, addr, bind=False, heartbeat_ms=LINK_HEARTBEAT_MS,
                                  watch=True)
        self.connected = False  # per the socket monitor
        self.epoch = 0  # +1 per disconnect: what was sent before may have died in a TCP buffer
        self.last_beat = float("-inf")
        self.last_hello = float("-inf")
        self.encoder_id = ""
        self.stats = EncoderStats()

    def live(self, now: float, dead_after: float) -> bool:
        """It answers (link up, beats arrive); a leaving one still finishes its items."""
        return self.connected and now - self.last_beat < dead_after

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.sender.close()


def apply_view(links: dict[str, EncoderLink], view: RegistryView,
               new_link: Callable[[str], EncoderLink]) -> None:
    """Join what ``view`` lists and we lack (``new_link`` makes and starts its link); mark
    what it no longer lists as leaving, unless a fresh registry may not know everyone yet."""
    listed = {e.addr: e.encoder_id for e in view.encoders}
    for addr, encoder_id in listed.items():
        link = links.get(addr)
        if link is None:
            log.info("encoder %s at %s joins the pool", encoder_id, addr)
            links[addr] = new_link(addr)
        elif not link.member:
            log.info("encoder %s at %s is back in the pool", encoder_id, addr)
            link.member, link.left_at = True, float("inf")
    if not view.complete:
        return
    for link in links.values():
        if link.member and not link.static and link.addr not in listed:
            log.info("encoder %s at %s leaves the pool (what it holds finishes there)",
                     link.encoder_id or "?", link.addr)
            link.member, link.left_at = False, time.monotonic()


def departed(links: dict[str, EncoderLink], now: float) -> list[EncoderLink]:
    """Take out (and close) the encoders that left and are gone or stuck."""
    gone = [link for link in links.values()
            if not link.member and (not link.connected or now - link.left_at >= FORGET_AFTER_S)]
    for link in gone:
        del links[link.addr]
        link.close()
    return gone
