"""Start `mmserve serve` as a real process tree for tests, and always take it down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from protocol.addresses import free_port


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; Linux only)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 (after the parenthesised command name) is the parent pid.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def metric(base: str, name: str) -> float:
    _, body = get(base + "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


class Server:
    def __init__(self, model: str, *extra: str, timeout: float = 120.0,
                 env: dict[str, str] | None = None, no_model: bool = False):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, MMSERVE_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "frontend.cli", "serve",
             *([] if no_model else [model]), "--port", str(self.port), *extra],
            env=env, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while get(self.base + "/health", 1.0)[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("mmserve serve did not become healthy")
            time.sleep(0.2)

    def child(self, role: str) -> int:
        pids = self.children(role)
        assert len(pids) == 1, (role, pids)
        return pids[0]

    def children(self, role: str) -> list[int]:
        return [p for p in children_of(self.proc.pid) if f" {role} " in cmdline(p)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
