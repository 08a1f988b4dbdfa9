"""Where sockets live. Loopback unless the config names another host."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tcp(host: str = LOOPBACK, port: int | None = None) -> str:
    return f"tcp://{host}:{port if port is not None else free_port(host)}"
