"""Roles started one by one, as deploy/ does (registry, engine, encoders that join, frontends),
and an encoder's own counters read over its socket. Every process is taken down by ``close``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import zmq
from server_utils import get

from protocol.addresses import free_port, tcp
from protocol.messages import EncoderHeartbeat, EncoderStats, Hello
from protocol.sockets import Receiver, Sender


class Cluster:
    def __init__(self, model: str, env: dict[str, str] | None = None):
        self.model = model
        self.env = dict(os.environ, MMSERVE_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1",
                        **(env or {}))
        self.procs: list[subprocess.Popen] = []

    def start(self, *argv: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "frontend.cli", *argv], env=self.env,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def registry(self) -> str:
        addr = tcp()
        self.start("registry", "--addr", addr)
        return addr

    def engine(self, *extra: str) -> str:
        addr = tcp()
        self.start("llm-worker", "--model", self.model, "--input-addr", addr, *extra)
        return addr

    def encoder(self, registry: str, *extra: str) -> tuple[str, subprocess.Popen]:
        addr = tcp()
        return addr, self.start("encoder", "--model", self.model, "--input-addr", addr,
                                "--join", registry, *extra)

    def frontend(self, engine: str, registry: str, *extra: str) -> str:
        port = free_port()
        self.start("frontend", "--model", self.model, "--engine-addr", engine,
                   "--encoder-registry", registry, "--port", str(port), *extra)
        return f"http://127.0.0.1:{port}"

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def health(base: str) -> dict:
    status, body = get(base + "/health", 1.0)
    try:
        return {"http": status, **json.loads(body)}
    except ValueError:
        return {"http": status}


def wait_encoders(base: str, live: int, timeout: float, total: int | None = None) -> float:
    """Until /health reports ``live`` routable encoders (and ``total`` known ones)."""
    t0 = time.monotonic()
    while True:
        enc = health(base).get("encoders") or {}
        if enc.get("live") == live and (total is None or enc.get("total") == total):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"encoders never {live} live: {enc}"
        time.sleep(0.05)


def wait_healthy(base: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while health(base)["http"] != 200:
        assert time.monotonic() < deadline, f"{base} never became healthy: {health(base)}"
        time.sleep(0.2)


def encoder_stats(addr: str, timeout: float = 5.0) -> EncoderStats:
    """The encoder's counters, from the heartbeat it answers a Hello with."""
    ctx = zmq.Context()
    reply_to = tcp()
    inbox, out = Receiver(ctx, reply_to), Sender(ctx, addr)
    try:
        out.send(Hello(frontend_id="test", reply_to=reply_to))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = inbox.recv(timeout_ms=100)
            if got is not None and isinstance(got[0], EncoderHeartbeat):
                return got[0].stats
        raise AssertionError(f"no heartbeat from {addr}")
    finally:
        inbox.close()
        out.close()
        ctx.destroy(linger=0)


def tagged(run_dir: str) -> list[int]:
    """Live processes carrying a deploy/ run's tag: every one up.sh started, their children,
    and under `up.sh --ray` with a head of its own, every Ray process of that head."""
    tag = f"MMSERVE_DEPLOY_RUN={run_dir}".encode()
    out = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and tag in open(f"/proc/{entry}/environ", "rb").read().split(b"\0"):
                out.append(int(entry))
        except OSError:
            continue
    return [pid for pid in out if _alive(pid)]


def mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (a Ray session dir, say)."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and text.encode() in open(f"/proc/{entry}/cmdline", "rb").read():
                out.append(int(entry))
        except OSError:
            continue
    return [pid for pid in out if _alive(pid) and pid != os.getpid()]


def kill_all(pids: list[int]) -> None:
    """SIGKILL these processes, one by one (a test's last resort after down.sh)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
