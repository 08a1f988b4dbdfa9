"""Acceptance 6 (wire half): garbage frames on every socket leave every process serving, and a
pickle payload is never executed (nothing on the wire is ever unpickled)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time

import pytest
import zmq
from server_utils import get

from protocol.addresses import free_port, tcp
from protocol.messages import MsgType

pytestmark = pytest.mark.slow


class _Boom:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def garbage(marker: str) -> list[list[bytes]]:
    evil = pickle.dumps(_Boom(marker))
    return [
        [b""],
        [b"\x00" * 10],
        [evil],
        [bytes([MsgType.GENERATE]), evil],
        [bytes([MsgType.TOKEN_OUTPUTS]), evil, evil],
        [bytes([MsgType.HEARTBEAT]), b"\x93\xa1x"],
        [bytes([MsgType.GENERATE]), b"\x97" + b"\xff" * 50],
        [bytes([250]), b"{}"],
        [os.urandom(1), os.urandom(4096)],
        [b"\x04"] * 64,
    ]


def test_garbage_on_every_socket(tiny_llama, tmp_path):
    marker = str(tmp_path / "pwned")
    engine_addr, reply_addr, port = tcp(), tcp(), free_port()
    env = dict(os.environ, MMSERVE_LOG_LEVEL="ERROR")
    cli = [sys.executable, "-m", "frontend.cli"]
    procs = [
        subprocess.Popen([*cli, "llm-worker", "--model", tiny_llama, "--input-addr", engine_addr],
                         env=env),
        subprocess.Popen([*cli, "frontend", "--model", tiny_llama, "--engine-addr", engine_addr,
                          "--reply-addr", reply_addr, "--port", str(port)], env=env),
    ]
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while get(base + "/health")[0] != 200:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.2)
        ctx = zmq.Context()
        for addr in (engine_addr, reply_addr):
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(addr)
            for frames in garbage(marker) * 20:
                sock.send_multipart(frames)
            sock.close()
        ctx.term()
        time.sleep(1.0)
        assert all(p.poll() is None for p in procs), "a process died on garbage input"
        assert not os.path.exists(marker), "a pickle payload was executed"
        assert get(base + "/health")[0] == 200
        import json
        import urllib.request

        req = urllib.request.Request(
            base + "/v1/completions", method="POST",
            data=json.dumps({"model": tiny_llama, "prompt": "Hello", "max_tokens": 3}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] >= 1
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
