"""The engine's IO threads close their own sockets, and `EngineIO.close` then terminates the
context: nothing is left for the garbage collector, whose pyzmq `__del__` could hang on them.
Embeddings arrive decoded; a device slot only where one is taken."""

from __future__ import annotations

import os
import time

import torch
import zmq

from llm_worker.io_threads import Arrived, EngineIO, Lost
from protocol.addresses import tcp
from protocol.codec import tensor_ref
from protocol.messages import DeviceRef, Embedding, Hello, TensorRef
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



def _device_ref() -> DeviceRef:
    return DeviceRef(device=0, handle=b"h" * 64, storage_bytes=1 << 20, storage_offset=0,
                     ref_counter=b"rc", ref_counter_offset=0, event=b"", event_sync=False,
                     gpu="GPU-x", start=0, guard="/dev/shm/mmserve-ring-test")


def test_embeddings_arrive_and_device_slots_are_dropped_where_not_taken():
    """Bytes arrive on either inbox; a device slot is dropped on TCP (whoever can reach it) and
    on the Unix socket of an engine whose runner takes no device tensors (this one), since its
    bytes follow; bytes that are not what their ref says are `Lost` (their requests fail)."""
    io = EngineIO(tcp(), None)
    ctx = zmq.Context()
    senders = [Sender(ctx, io.embed_addr)] + ([Sender(ctx, io.embed_local)] if io.embed_local
                                              else [])
    try:
        for s in senders:
            tensor = torch.arange(6, dtype=torch.float32).view(2, 3)
            ref, buf = tensor_ref(tensor, frame=2)
            s.send(Embedding("blake3:slot", TensorRef("float32", [2, 3], 0), device=_device_ref()))
            s.send(Embedding("blake3:bytes", ref), [buf])
            got = io.inbox.get(timeout=5)
            assert isinstance(got, Arrived) and got.key == "blake3:bytes"
            assert torch.equal(got.tensor, tensor)
            s.send(Embedding("blake3:short", ref), [bytes(buf)[:-4]])
            got = io.inbox.get(timeout=5)
            assert isinstance(got, Lost) and got.key == "blake3:short" and "bytes" in got.reason
    finally:
        for s in senders:
            s.close()
        ctx.term()
        io.close()
