"""The engine's IO threads close their own sockets, and `EngineIO.close` then terminates the
context: nothing is left for the garbage collector, whose pyzmq `__del__` could hang on them."""

from __future__ import annotations

import os
import time

import zmq

from llm_worker.io_threads import EngineIO
from protocol.addresses import tcp
from protocol.messages import Hello
from protocol.sockets import Receiver, Sender


def test_messages_flow_and_close_ends_threads_sockets_and_context():
    io = EngineIO(tcp(), None)
    ctx = zmq.Context()
    inbox = Receiver(ctx, tcp())
    to_engine = Sender(ctx, io.receiver.addr)
    try:
        to_engine.send(Hello(frontend_id="t", reply_to=inbox.addr))
        got = io.inbox.get(timeout=5)
        assert isinstance(got, Hello) and got.reply_to == inbox.addr
        io.outbox.put((inbox.addr, Hello(frontend_id="engine", reply_to="")))
        back = inbox.recv(timeout_ms=5000)
        assert back is not None and back[0].frontend_id == "engine"
    finally:
        to_engine.close()
        inbox.close()
        ctx.term()
    folder = os.path.dirname(io.embed_local.removeprefix("ipc://")) if io.embed_local else None
    started = time.monotonic()
    io.close()
    assert time.monotonic() - started < 2
    assert io.ctx.closed
    assert not [t.name for t in io._threads if t.is_alive()]  # (other tests' engines may run)
    assert folder is None or not os.path.exists(folder)

