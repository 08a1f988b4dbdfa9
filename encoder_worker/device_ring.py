"""Embeddings handed to an engine on the same GPU by CUDA IPC: one device ring, exported once.

A tower output headed for such an engine is copied into a slot of the ring (device to device),
and its Embedding carries the slot's place (`protocol.messages.DeviceRef`) instead of its bytes.
The engine copies the slot out device to device as well (`llm_worker/device_inbox.py`): no
download here, no frame through the socket, no upload there.

Slots are reused when the ring wraps, so the engine checks after its copy that the slot was not
overwritten meanwhile: the ring's guard, one int64 in a /dev/shm file, counts the bytes reserved
so far and is written here before each copy into the ring. Bytes ``[start, start + n)`` are
intact while that count is at most ``start + size``. This side also never reuses a slot younger
than ``min_age_s`` (that item goes as bytes instead), so the check fails only for an engine that
took longer than that to copy a slot it was sent.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections import deque

import torch

from protocol.addresses import RING_GUARD_DIR, RING_GUARD_PREFIX, gpu_uuid
from protocol.messages import DeviceRef

log = logging.getLogger(__name__)

ALIGN = 256  # slot starts: any dtype's view of the ring stays aligned


class RingSpace:
    """Where the next slot goes, in absolute byte positions (slot = position % size); no torch.
    A slot never straddles the end: it starts again at 0 instead."""

    def __init__(self, size: int, min_age_s: float):
        self.size = size
        self.min_age_s = min_age_s
        self.pos = 0  # absolute end of the last slot
        self.slots: deque[tuple[int, float]] = deque()  # (start, when written), oldest first

    def reserve(self, nbytes: int, now: float) -> int | None:
        """Absolute start of a new slot of ``nbytes``, or None: it cannot fit, or it would
        overwrite a slot written less than ``min_age_s`` ago."""
        n = -(-max(nbytes, 1) // ALIGN) * ALIGN
        if n > self.size:
            return None
        start = self.pos
        if start % self.size + n > self.size:
            start += self.size - start % self.size
        end = start + n
        # This write reuses the ring's bytes of absolute positions [start - size, end - size):
        # every slot that starts before end - size loses its data.
        reused = [t for s, t in self.slots if s < end - self.size]
        if reused and now - reused[-1] < self.min_age_s:
            return None
        for _ in reused:
            self.slots.popleft()
        self.slots.append((start, now))
        self.pos = end
        return start


def remove_stale_guards(directory: str = RING_GUARD_DIR) -> list[str]:
    """Unlink the guards of encoders that died without closing their ring (SIGKILL): the pid in
    their name is gone. Returns the names removed. (An encoder in another pid namespace that
    shares this /dev/shm looks dead too: engines that open its ring later take its bytes.)"""
    removed = []
    for name in os.listdir(directory):
        if not name.startswith(RING_GUARD_PREFIX):
            continue
        pid = name.removeprefix(RING_GUARD_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or os.path.exists(f"/proc/{pid}"):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except OSError:  # another user's, or gone already
            pass
    return removed


class DeviceRing:
    """The ring on ``device``, its IPC handle and its guard file."""

    def __init__(self, device: torch.device, nbytes: int, min_age_s: float = 1.0):
        remove_stale_guards()
        self.device = torch.device(device)
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.space = RingSpace(nbytes, min_age_s)
        self.gpu = gpu_uuid(self.device)
        (dev, handle, size, offset, ref_counter, ref_offset, event,
         event_sync) = self.buf.untyped_storage()._share_cuda_()
        self._share = dict(device=dev, handle=handle, storage_bytes=size, storage_offset=offset,
                           ref_counter=ref_counter, ref_counter_offset=ref_offset,
                           event=event or b"", event_sync=bool(event_sync), gpu=self.gpu)
        self.guard_path = os.path.join(RING_GUARD_DIR, f"{RING_GUARD_PREFIX}{os.getpid()}-{id(self):x}")
        fd = os.open(self.guard_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, 8)
            self._guard = mmap.mmap(fd, 8)
        finally:
            os.close(fd)
        self._reserved = memoryview(self._guard).cast("q")  # aligned int64: stores are atomic

    def put(self, tensor: torch.Tensor) -> DeviceRef | None:
        """Copy ``tensor`` (on this device) into a new slot, on the current stream: the caller
        syncs that stream before sending the ref. None: no slot now (send the bytes)."""
        start = self.space.reserve(tensor.nbytes, time.monotonic())
        if start is None:
            return None
        self._reserved[0] = start + tensor.nbytes  # before the write: the reader's check
        off = start % self.space.size
        slot = self.buf[off:off + tensor.nbytes]
        slot.view(tensor.dtype).view(tensor.shape).copy_(tensor)
        return DeviceRef(**self._share, start=start, guard=self.guard_path)

    def close(self) -> None:
        self._reserved.release()
        self._guard.close()
        try:
            os.unlink(self.guard_path)
        except FileNotFoundError:
            pass


def make_ring(device: torch.device, nbytes: int) -> DeviceRing | None:
    """The encoder's ring, or None where there is none to make (no CUDA, size 0, no /dev/shm,
    or a GPU that cannot share memory by CUDA IPC: then every engine gets bytes)."""
    if nbytes <= 0 or torch.device(device).type != "cuda" or not os.path.isdir(RING_GUARD_DIR):
        return None
    try:
        return DeviceRing(device, nbytes)
    except (RuntimeError, OSError) as e:
        log.warning("no device ring (%s): embeddings go as bytes", e)
        return None
