"""The encoder's sockets, each owned by one thread; the busy loop only sees two queues.

- ``encoder-in``: the PULL socket at the encoder's input address; Receiver drops malformed
  frames. Hello is answered right here, and heartbeats come from their own thread, because the
  busy loop can sit inside a tower batch for seconds on a CPU and must not look dead meanwhile.
- ``encoder-out``: one PUSH socket per destination (decoder inboxes, frontends), made lazily.
  Sends never block: a destination that stopped reading until its queue is full loses messages
  (counted, logged) instead of stalling every other destination and the heartbeats.
- ``encoder-beat``: an EncoderHeartbeat to every frontend that said Hello, every period.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import msgspec
import torch
import zmq

from protocol import timeline
from protocol.codec import ProtocolError, tensor_from
from protocol.messages import Embedding, EncodeDone, EncodeRequest, EncoderHeartbeat, Hello
from protocol.sockets import Receiver, Sender

log = logging.getLogger(__name__)


class UserEmbeds(NamedTuple):
    """An EncodeRequest that carries its own embeddings (image_embeds), already decoded."""

    msg: EncodeRequest
    tensor: torch.Tensor | None  # [n, hidden], an owned copy; None when the frame was bad
    error: str


class EncoderIO:
    def __init__(self, input_addr: str, make_beat: Callable[[], EncoderHeartbeat],
                 heartbeat_s: float):
        self.inbox: queue.Queue = queue.Queue()  # messages for the busy loop
        self._outbox: queue.Queue = queue.Queue()  # (address, message, buffers) | None to stop
        self._make_beat = make_beat
        self._heartbeat_s = heartbeat_s
        self._frontends: set[str] = set()  # reply_to addresses that said Hello
        self.dropped: dict[str, int] = {}  # destination -> messages lost to a full queue
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._ctx = zmq.Context()
        # Bound before run_encoder serves, so nothing sent after start-up is lost.
        self._receiver = Receiver(self._ctx, input_addr, bind=True)
        self._threads = [
            threading.Thread(target=self._recv_loop, name="encoder-in", daemon=True),
            threading.Thread(target=self._send_loop, name="encoder-out", daemon=True),
            threading.Thread(target=self._beat_loop, name="encoder-beat", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def send(self, addr: str, msg: msgspec.Struct, buffers: Sequence[Any] = ()) -> None:
        """Queue ``msg`` (+ zero-copy ``buffers``) for ``addr``; never blocks."""
        self._outbox.put((addr, msg, buffers))

    def close(self) -> None:
        self._stopped.set()
        self._outbox.put(None)
        for t in self._threads:
            t.join(timeout=2.0)
        if not any(t.is_alive() for t in self._threads):
            self._ctx.destroy(linger=0)  # also closes a socket whose connect() raised

    def _recv_loop(self) -> None:
        while not self._stopped.is_set():
            got = self._receiver.recv(timeout_ms=100)
            if got is None:
                continue
            msg, frames = got
            if isinstance(msg, Hello):
                with self._lock:
                    new = msg.reply_to not in self._frontends
                    self._frontends.add(msg.reply_to)
                if new:  # a frontend repeats Hello until it hears back: log it once
                    log.info("frontend %s says hello (replies to %s)", msg.frontend_id,
                             msg.reply_to)
                self.send(msg.reply_to, self._make_beat())
                continue
            if isinstance(msg, EncodeRequest):
                timeline.mark("encode_received", f"{msg.request_id}|{msg.key}")
                if msg.embeds is not None:
                    try:  # copied out of the zmq frame: the store keeps it for a long time
                        msg = UserEmbeds(msg, tensor_from(msg.embeds, frames).clone(), "")
                    except ProtocolError as e:
                        msg = UserEmbeds(msg, None, f"bad image embeddings frame: {e}")
            self.inbox.put(msg)
        self._receiver.close()

    def _send_loop(self) -> None:
        senders: dict[str, Sender] = {}
        while (item := self._outbox.get()) is not None:
            addr, msg, buffers = item
            try:
                if addr not in senders:
                    senders[addr] = Sender(self._ctx, addr, bind=False)
                if not senders[addr].try_send(msg, buffers):
                    self._on_full(addr, msg)
                elif isinstance(msg, Embedding):  # handed to zmq, which sends it in the background
                    timeline.mark("embedding_sent", msg.key)
                elif isinstance(msg, EncodeDone):
                    timeline.mark("encode_done_sent", f"{msg.request_id}|{msg.key}")
            except zmq.ZMQError as e:  # e.g. a malformed address from a peer: drop, keep serving
                log.warning("cannot send %s to %r: %s", type(msg).__name__, addr, e)
        for s in senders.values():
            s.close()

    def _on_full(self, addr: str, msg: msgspec.Struct) -> None:
        n = self.dropped.get(addr, 0) + 1
        self.dropped[addr] = n
        if n & (n - 1) == 0:  # 1, 2, 4, 8, ...: a dead peer must not flood the log
            log.warning("%s is not reading (queue full): dropped %s, %d so far", addr,
                        type(msg).__name__, n)

    def _beat_loop(self) -> None:
        while not self._stopped.wait(self._heartbeat_s):
            with self._lock:
                dests = list(self._frontends)
            beat = self._make_beat()
            for dest in dests:
                self.send(dest, beat)
