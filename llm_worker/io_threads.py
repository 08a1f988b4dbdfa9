"""The engine core's sockets and the threads that own them; the busy loop only touches queues.

Requests, aborts and handshakes arrive on the input socket, embeddings on their own inbox (so
megabytes of tensors never queue ahead of requests), bound on TCP and, for encoders on this
machine, on a Unix-socket twin. Both receive threads decode frames into one ``inbox`` queue
(an embedding becomes `Arrived`, its tensor viewing the zmq frame). An encoder on the GPU of an
in-process runner sends a slot of its device ring first (Unix socket only), which the thread
copies to our device (`llm_worker/device_inbox.py`), then the bytes as usual, the host copy the
cache keeps. One send thread drains ``outbox``: ``(address, message)`` pairs, a PUSH
socket per address.

Each socket is closed by the thread that uses it (zmq sockets are not thread-safe), and `close`
terminates the context once they have. A context left to the garbage collector could hang it:
a collected cycle's weak references are cleared first, so pyzmq's `__del__` sees no sockets to
close and `term()` waits forever on the ones still open (that hung CI once).
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
from typing import Any, NamedTuple

import zmq

from llm_worker.device_inbox import DeviceInbox, SlotLost
from protocol import timeline
from protocol.addresses import private_ipc, tcp
from protocol.codec import ProtocolError, tensor_from
from protocol.messages import Embedding, GenerateRequest, TokenOutputs
from protocol.sockets import Receiver, Sender

log = logging.getLogger(__name__)


class Arrived(NamedTuple):
    """An embedding for the cache: a view of its zmq frame, or our device copy of a ring slot
    (then the same embedding's bytes arrive next)."""

    key: str
    tensor: Any


class Lost(NamedTuple):
    """An embedding whose bytes cannot be read: the requests waiting on it fail."""

    key: str
    reason: str


class EngineIO:
    def __init__(self, input_addr: str, embed_addr: str | None,
                 device_inbox: DeviceInbox | None = None):
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()  # (address, message); None stops the sender
        self._stop = threading.Event()
        self.ctx = zmq.Context()
        # Bound before the engine announces readiness, so no early message is lost.
        self.receiver = Receiver(self.ctx, input_addr, bind=True)
        self.embed_addr = embed_addr or tcp(input_addr.split("//")[1].rsplit(":", 1)[0])
        self.embed_receiver = Receiver(self.ctx, self.embed_addr, bind=True)
        # The Unix-socket twin: loopback TCP moves a 4.7 MB image embedding at ~2 GB/s. Only
        # the twin takes device slots: its folder is this user's alone.
        self.embed_local, self._ipc_dir = private_ipc("embeds")
        self.local_receiver: Receiver | None = None
        try:
            self.local_receiver = Receiver(self.ctx, self.embed_local, bind=True)
        except zmq.ZMQError as e:
            log.warning("no Unix-socket embedding inbox (%s): encoders here use TCP", e)
            self.embed_local = ""
        self.device_inbox = device_inbox if self.local_receiver is not None else None
        loops = [(self._recv_loop, (self.receiver,), "engine-in"),
                 (self._recv_loop, (self.embed_receiver,), "engine-embeds"),
                 (self._send_loop, (), "engine-out")]
        if self.local_receiver is not None:
            loops.append((self._recv_loop, (self.local_receiver,), "engine-embeds-local"))
        self._threads = [threading.Thread(target=target, args=args, name=name, daemon=True)
                         for target, args, name in loops]
        for t in self._threads:
            t.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the threads (what is still queued for sending is dropped), then the context.
        The socket folder of the Unix-socket twin goes too."""
        self._stop.set()
        self.outbox.put(None)
        for t in self._threads:
            t.join(timeout_s)
        if not any(t.is_alive() for t in self._threads):
            self.ctx.term()  # every socket is closed: returns at once
        shutil.rmtree(self._ipc_dir, ignore_errors=True)

    def _recv_loop(self, receiver: Receiver) -> None:
        while not self._stop.is_set():
            got = receiver.recv(timeout_ms=100)
            if got is None:
                continue
            msg, frames = got
            if isinstance(msg, Embedding):
                self._on_embedding(msg, frames, receiver)
                continue
            if isinstance(msg, GenerateRequest):
                timeline.mark("request_received", msg.request_id)
            self.inbox.put(msg)
        receiver.close()

    def _on_embedding(self, msg: Embedding, frames: list, receiver: Receiver) -> None:
        """Decode the tensor here, off the busy loop: a view of its zmq frame, or our copy of
        the device slot it names. The encoder sends the bytes right behind a slot (the cache's
        host copy), so a slot that cannot be read is dropped; bytes that cannot be are `Lost`."""
        timeline.mark("embedding_in", msg.key)
        try:
            if msg.device is None:
                tensor = tensor_from(msg.tensor, frames)
            elif self.device_inbox is None or receiver is not self.local_receiver:
                log.warning("dropped device embedding %s: this inbox takes none", msg.key)
                return
            else:
                tensor = self.device_inbox.copy(msg.device, msg.tensor, msg.key)
        except (SlotLost, ProtocolError) as e:
            if msg.device is not None:  # its bytes follow
                log.warning("device embedding %s not taken: %s", msg.key, e)
                return
            log.warning("lost embedding %s: %s", msg.key, e)
            self.inbox.put(Lost(msg.key, str(e)))
            return
        except Exception:
            if msg.device is None:
                raise
            log.exception("device embedding %s not taken", msg.key)  # a CUDA error; bytes follow
            return
        timeline.mark("embedding_received", msg.key)
        self.inbox.put(Arrived(msg.key, tensor))

    def _send_loop(self) -> None:
        senders: dict[str, Sender] = {}
        while (item := self.outbox.get()) is not None:
            addr, msg = item
            if addr not in senders:
                senders[addr] = Sender(self.ctx, addr, bind=False)
            senders[addr].send(msg)
            if isinstance(msg, TokenOutputs) and timeline.enabled():
                for o in msg.outputs:
                    if o.queue_seconds is not None:  # the request's first output
                        timeline.mark("first_output_sent", o.request_id)
        for s in senders.values():
            s.close()
