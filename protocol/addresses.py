"""Where sockets live. Loopback unless the config names another host."""

from __future__ import annotations

import functools
import os
import socket
import tempfile

LOOPBACK = "127.0.0.1"
# Where an encoder's device ring keeps its guard (encoder_worker/device_ring.py), and its name.
RING_GUARD_DIR = "/dev/shm"
RING_GUARD_PREFIX = "mmserve-ring-"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tcp(host: str = LOOPBACK, port: int | None = None) -> str:
    return f"tcp://{host}:{port if port is not None else free_port(host)}"


@functools.cache
def host_id() -> str:
    """This machine's boot id ("" where the kernel has none): processes that report the same
    one share a kernel, hence Unix sockets, when their filesystems agree (`local_inbox_path`)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def gpu_uuid(device) -> str:
    """The UUID of a CUDA device: processes that name the same one share that GPU, whatever
    CUDA_VISIBLE_DEVICES numbers it in each (the device handoff's routing)."""
    import torch

    return str(torch.cuda.get_device_properties(device).uuid)


def private_ipc(name: str) -> tuple[str, str]:
    """(ipc:// address, folder) of a Unix socket in a new folder only this user can enter."""
    folder = tempfile.mkdtemp(prefix="mmserve-")  # mode 0700
    return f"ipc://{os.path.join(folder, name)}", folder


def local_inbox_path(addr: str) -> bool:
    """Whether ``addr`` (ipc://path) is a socket this process may connect to now: it exists
    and is writable here (a container with another filesystem, or another user, gets False)."""
    path = addr.removeprefix("ipc://")
    return addr.startswith("ipc://") and os.path.exists(path) and os.access(path, os.W_OK)
