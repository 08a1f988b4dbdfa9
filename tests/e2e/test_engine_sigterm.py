"""`mmserve llm-worker` on SIGTERM: it stops serving and exits, and leaves nothing behind (its
Unix-socket inbox lives in a folder of its own under the temp dir)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import zmq

from protocol.addresses import tcp
from protocol.messages import Hello, Ready
from protocol.sockets import Receiver, Sender

pytestmark = pytest.mark.slow


def test_sigterm_ends_the_engine_and_removes_its_socket_folder(tiny_llama):
    addr = tcp()
    proc = subprocess.Popen([sys.executable, "-m", "frontend.cli", "llm-worker", "--model",
                             tiny_llama, "--input-addr", addr],
                            env=dict(os.environ, MMSERVE_LOG_LEVEL="ERROR"))
    ctx = zmq.Context()
    inbox, to_engine = Receiver(ctx, tcp()), Sender(ctx, addr)
    try:
        ready = None
        for _ in range(600):  # the engine loads and warms up first (up to 60 s)
            to_engine.send(Hello(frontend_id="t", reply_to=inbox.addr))
            got = inbox.recv(timeout_ms=100)
            if got is not None and isinstance(got[0], Ready):
                ready = got[0]
                break
            assert proc.poll() is None
        assert ready is not None and ready.embed_local.startswith("ipc://")
        folder = os.path.dirname(ready.embed_local.removeprefix("ipc://"))
        assert os.path.isdir(folder)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not os.path.exists(folder)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        to_engine.close()
        inbox.close()
        ctx.term()
