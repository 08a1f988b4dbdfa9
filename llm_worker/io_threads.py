"""The engine core's sockets and the threads that own them; the busy loop only touches queues.

Requests, aborts and handshakes arrive on the input socket, embeddings on their own inbox (so
megabytes of tensors never queue ahead of requests), bound on TCP and, for encoders on this
machine, on a Unix-socket twin. Both receive threads decode frames into one ``inbox`` queue
(an embedding becomes ``(key, tensor)`` viewing its zmq frame). One send thread drains
``outbox``: ``(address, message)`` pairs, a PUSH socket per address.

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

import zmq

from protocol import timeline
from protocol.addresses import private_ipc, tcp
from protocol.codec import ProtocolError, tensor_from
from protocol.messages import Embedding, GenerateRequest, TokenOutputs
from protocol.sockets import Receiver, Sender

log = logging.getLogger(__name__)


class EngineIO:
    def __init__(self, input_addr: str, embed_addr: str | None):
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()  # (address, message); None stops the sender
        self._stop = threading.Event()
        self.ctx = zmq.Context()
        # Bound before the engine announces readiness, so no early message is lost.
        self.receiver = Receiver(self.ctx, input_addr, bind=True)
        self.embed_addr = embed_addr or tcp(input_addr.split("//")[1].rsplit(":", 1)[0])
        self.embed_receiver = Receiver(self.ctx, self.embed_addr, bind=True)
        # The Unix-socket twin: loopback TCP moves a 4.7 MB image embedding at ~2 GB/s.
        self.embed_local, self._ipc_dir = private_ipc("embeds")
        try:
            self.embed_receiver.sock.bind(self.embed_local)
        except zmq.ZMQError as e:
            log.warning("no Unix-socket embedding inbox (%s): encoders here use TCP", e)
            self.embed_local = ""
        self._threads = [
            threading.Thread(target=target, args=args, name=name, daemon=True)
            for target, args, name in ((self._recv_loop, (self.receiver,), "engine-in"),
                                       (self._recv_loop, (self.embed_receiver,), "engine-embeds"),
                                       (self._send_loop, (), "engine-out"))]
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
                try:  # decode the tensor here, off the busy loop; it views the zmq frame
                    msg = (msg.key, tensor_from(msg.tensor, frames))
                except ProtocolError as e:
                    log.warning("dropped embedding %s: %s", msg.key, e)
                    continue
                timeline.mark("embedding_received", msg[0])
            elif isinstance(msg, GenerateRequest):
                timeline.mark("request_received", msg.request_id)
            self.inbox.put(msg)
        receiver.close()

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
