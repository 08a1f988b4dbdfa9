"""The engine's side of the device handoff: copy an encoder's ring slot to our own tensor.

An encoder on our GPU sends an Embedding whose ``device`` names a slot of its device ring
(`encoder_worker/device_ring.py`). The embedding receive thread opens the ring once (CUDA IPC),
copies the slot device to device on a stream of its own, then reads the ring's guard to check the
slot was not overwritten during the copy. Only the Unix-socket inbox takes these (its folder is
this user's alone), and only an in-process runner, which can use a device tensor as it is.
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict

import torch

from protocol import timeline
from protocol.addresses import RING_GUARD_DIR, RING_GUARD_PREFIX, gpu_uuid
from protocol.codec import ProtocolError, check_tensor_ref
from protocol.messages import DeviceRef, TensorRef

MAX_RINGS = 8  # rings kept open (one per encoder on this GPU; the oldest is closed beyond)


class SlotLost(Exception):
    """The slot was overwritten before the copy was done (the encoder wrapped its ring)."""


def intact(reserved: int, start: int, ring_bytes: int) -> bool:
    """Whether ring bytes from absolute position ``start`` still hold what was written there,
    given the bytes ``reserved`` so far: a write reuses position p only once it reserves past
    p + ring_bytes."""
    return reserved <= start + ring_bytes


class DeviceInbox:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.gpu = gpu_uuid(self.device)
        self.stream = torch.cuda.Stream(self.device)
        self._rings: OrderedDict[bytes, tuple[torch.Tensor, memoryview]] = OrderedDict()

    def copy(self, ref: DeviceRef, tensor: TensorRef, key: str = "") -> torch.Tensor:
        """A new tensor on our device holding the slot's bytes as ``tensor`` describes them.
        ProtocolError for a ref that cannot be ours; SlotLost if the slot was overwritten."""
        dtype, numel = check_tensor_ref(tensor)
        nbytes = numel * dtype.itemsize
        if ref.gpu != self.gpu:
            raise ProtocolError(f"device embedding is on GPU {ref.gpu}, this engine on {self.gpu}")
        size, off = ref.storage_bytes, ref.start % max(ref.storage_bytes, 1)
        if ref.start < 0 or off + nbytes > size or off % 256:
            raise ProtocolError(f"slot at {ref.start} ({nbytes} bytes) is not in a ring of {size}")
        ring, reserved = self._open(ref)
        with torch.cuda.stream(self.stream):  # allocated and written in our stream's order
            out = torch.empty(tensor.shape, dtype=dtype, device=self.device)
            out.view(-1).view(torch.uint8).copy_(ring[off:off + nbytes])
        self.stream.synchronize()
        timeline.mark("slot_copied", key)
        # Made on our stream, read on the runner's: the allocator must not hand its memory to
        # our next copy while the runner's work on it is still queued.
        out.record_stream(torch.cuda.default_stream(self.device))
        if not intact(reserved[0], ref.start, size):
            raise SlotLost(f"ring slot at {ref.start} was reused before it was copied")
        return out

    def _open(self, ref: DeviceRef) -> tuple[torch.Tensor, memoryview]:
        if ref.handle in self._rings:
            self._rings.move_to_end(ref.handle)
            return self._rings[ref.handle]
        name = os.path.basename(ref.guard)
        if os.path.dirname(ref.guard) != RING_GUARD_DIR or not name.startswith(RING_GUARD_PREFIX):
            raise ProtocolError(f"ring guard {ref.guard!r} is not an mmserve ring guard")
        try:
            fd = os.open(ref.guard, os.O_RDONLY)
        except OSError as e:
            raise ProtocolError(f"ring guard {ref.guard!r}: {e.strerror}") from None
        try:
            guard = mmap.mmap(fd, 8, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            with torch.cuda.device(self.device):
                storage = torch.UntypedStorage._new_shared_cuda(
                    self.device.index or 0, ref.handle, ref.storage_bytes, ref.storage_offset,
                    ref.ref_counter, ref.ref_counter_offset, ref.event, ref.event_sync)
        except RuntimeError as e:  # not a handle this process can open
            guard.close()
            raise ProtocolError(f"cannot open the ring's CUDA IPC handle: {e}") from None
        ring = torch.empty(0, dtype=torch.uint8, device=self.device).set_(
            storage, 0, (ref.storage_bytes,), (1,))
        self._rings[ref.handle] = ring, memoryview(guard).cast("q")
        while len(self._rings) > MAX_RINGS:  # the encoder of the oldest is likely gone
            self._rings.popitem(last=False)
        return self._rings[ref.handle]


def make_device_inbox(device: torch.device) -> DeviceInbox | None:
    """The inbox for an in-process runner on ``device``: None unless that is a CUDA device (a
    CPU model takes bytes)."""
    device = torch.device(device)
    if device.type != "cuda" or not os.path.isdir(RING_GUARD_DIR):
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return DeviceInbox(device)
