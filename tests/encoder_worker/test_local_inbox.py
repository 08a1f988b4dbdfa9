"""Embeddings to an engine on the same machine go over its Unix-socket twin of the TCP inbox."""

from __future__ import annotations

import shutil

import pytest
import zmq

from encoder_worker.server import _route
from protocol.addresses import host_id, local_inbox_path, private_ipc, tcp
from protocol.messages import EncodeRequest, Hello
from protocol.sockets import Receiver, Sender


@pytest.fixture
def inbox():
    """A PULL socket bound on TCP and on a private Unix socket, as the engine's inbox is."""
    ctx = zmq.Context()
    addr = tcp()
    local, folder = private_ipc("embeds")
    receiver = Receiver(ctx, addr, bind=True)
    receiver.sock.bind(local)
    yield ctx, receiver, addr, local
    receiver.close()
    ctx.destroy(linger=0)
    shutil.rmtree(folder, ignore_errors=True)


def _request(addr: str, local: str, host: str) -> EncodeRequest:
    return EncodeRequest(key="k", modality="image", data=b"", kwargs={}, deliver_to=[addr],
                         reply_to="tcp://127.0.0.1:1", deliver_local={addr: local},
                         deliver_host=host)


@pytest.mark.skipif(not host_id(), reason="no boot id on this kernel")
def test_same_machine_takes_the_unix_socket_and_it_delivers(inbox):
    ctx, receiver, addr, local = inbox
    assert local_inbox_path(local)
    route = _route(_request(addr, local, host_id()), addr)
    assert route == local
    sender = Sender(ctx, route)
    sender.send(Hello("f", "tcp://127.0.0.1:1"))
    got = receiver.recv(timeout_ms=5000)
    assert got is not None and isinstance(got[0], Hello)
    sender.close()


def test_other_machine_or_unreachable_socket_keeps_tcp(inbox, tmp_path):
    _, _, addr, local = inbox
    assert _route(_request(addr, local, "another-boot-id"), addr) == addr
    assert _route(_request(addr, local, ""), addr) == addr
    gone = f"ipc://{tmp_path}/no-such-socket"
    assert not local_inbox_path(gone)
    assert _route(_request(addr, gone, host_id()), addr) == addr
    # An older frontend names no twin: TCP as before.
    plain = EncodeRequest(key="k", modality="image", data=b"", kwargs={}, deliver_to=[addr],
                          reply_to="tcp://127.0.0.1:1")
    assert _route(plain, addr) == addr
