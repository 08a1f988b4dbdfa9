"""An opt-in request timeline: each process appends timestamped events of a request's life.

Every `mmserve` role calls `init(role, directory)` once at start-up (frontend/cli.py, with
`MMSERVE_TIMELINE` from frontend/env.py); from then on `mark(event, key)` appends one JSON line
``{"t", "pid", "role", "event", "key"}`` to ``<directory>/<role>-<pid>.jsonl``. ``t`` is
``time.monotonic_ns()``: CLOCK_MONOTONIC is system-wide on Linux, so the files of every process
on one host compare directly. ``key`` is the request id where it is known, the media key
("blake3:...", "uuid:...") where only that is, and ``"<request id>|<media key>"`` where both are.
`load` reads a directory back; bench/ttft.py --timeline joins the events per request.
Without a directory (the default) `mark` is one bool test.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import msgspec

_on = False
_role = ""
_pid = 0
_path = ""
_fd: int | None = None  # opened at the first mark: a role that marks nothing leaves no file
_lock = threading.Lock()


def init(role: str, directory: str | None) -> None:
    """Record this process's events as ``role`` into ``directory``; None turns recording off."""
    global _on, _role, _pid, _path, _fd
    with _lock:
        if _fd is not None:
            os.close(_fd)
        _fd = None
        _on, _role, _pid = bool(directory), role, os.getpid()
        if directory:
            os.makedirs(directory, exist_ok=True)
            _path = os.path.join(directory, f"{role}-{_pid}.jsonl")


def enabled() -> bool:
    """For callers that must loop to find what to mark: skip the loop when off."""
    return _on


def mark(event: str, key: str, t_ns: int | None = None) -> None:
    """One event of ``key`` now (or at ``t_ns``, a monotonic_ns() time taken earlier, for a
    caller that learns the key only later). Thread-safe: one O_APPEND write() per line."""
    if not _on:
        return
    t = time.monotonic_ns() if t_ns is None else t_ns
    line = msgspec.json.encode({"t": t, "pid": _pid, "role": _role, "event": event, "key": key})
    os.write(_fd if _fd is not None else _open(), line + b"\n")


def _open() -> int:
    global _fd
    with _lock:
        if _fd is None:
            _fd = os.open(_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return _fd


def load(directory: str | Path) -> list[dict]:
    """Every event recorded in ``directory``, in time order (a torn last line is skipped)."""
    events = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            try:
                events.append(msgspec.json.decode(line))
            except msgspec.DecodeError:
                continue
    return sorted(events, key=lambda e: e["t"])
