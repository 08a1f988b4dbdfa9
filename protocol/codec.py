"""Encode messages to zmq frames and back.

Frame 0 is one byte, the MsgType; frame 1 is the msgspec payload; frames 2.. are raw tensor
bytes referenced by ``TensorRef.frame``. The receiver decodes frame 1 with a decoder typed to the
announced message, so bytes that are not that message raise ``ProtocolError`` (never execute).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from protocol.messages import MESSAGE_TYPES, MsgType, TensorRef
from protocol.registry import REGISTRY_MESSAGE_TYPES
from protocol.step import STEP_MESSAGE_TYPES


class ProtocolError(ValueError):
    """Frames that are not a valid message."""


_ENCODER = msgspec.msgpack.Encoder()
# The inter-role messages, the engine <-> TP worker step messages and the encoder registry's
# share one type space.
_TYPES = {**MESSAGE_TYPES, **STEP_MESSAGE_TYPES, **REGISTRY_MESSAGE_TYPES}
_TYPE_OF = {cls: t for t, cls in _TYPES.items()}
_DECODERS = {t: msgspec.msgpack.Decoder(cls) for t, cls in _TYPES.items()}
_TYPE_BYTES = {t: bytes([t]) for t in MsgType}


def encode(msg: msgspec.Struct, buffers: Sequence[Any] = ()) -> list[Any]:
    """Frames for ``msg``; ``buffers`` (bytes-like, sent zero-copy) follow as frames 2, 3, ..."""
    return [_TYPE_BYTES[_TYPE_OF[type(msg)]], _ENCODER.encode(msg), *buffers]


def decode(frames: Sequence[Any]) -> tuple[msgspec.Struct, list[Any]]:
    """Returns the message and its extra frames (buffers referenced by TensorRef.frame - 2)."""
    if len(frames) < 2:
        raise ProtocolError(f"expected at least 2 frames, got {len(frames)}")
    head = memoryview(frames[0]).tobytes()
    if len(head) != 1 or head[0] not in _DECODERS:
        raise ProtocolError(f"unknown message type {head[:8]!r}")
    try:
        msg = _DECODERS[MsgType(head[0])].decode(frames[1])
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"bad {MsgType(head[0]).name} payload: {e}") from None
    return msg, list(frames[2:])


# -- tensors -------------------------------------------------------------------------------------

_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


def tensor_ref(tensor: Any, frame: int) -> tuple[TensorRef, memoryview]:
    """Describe a (CPU) torch tensor as frame ``frame`` and return the buffer to send zero-copy."""
    import torch

    tensor = tensor.detach().contiguous()
    ref = describe(tensor, frame)
    # bfloat16 has no buffer-protocol format: ship the raw bytes as uint8.
    raw = tensor.view(torch.uint8) if tensor.dtype == torch.bfloat16 else tensor
    buf = memoryview(raw.numpy()).cast("B") if raw.numel() else memoryview(b"")
    return ref, buf


def describe(tensor: Any, frame: int) -> TensorRef:
    """The ref of a torch tensor (any device) as frame ``frame``, without its bytes."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ProtocolError(f"unsupported tensor dtype {dtype}")
    return TensorRef(dtype=dtype, shape=list(tensor.shape), frame=frame)


def tensor_frames(tensors: Mapping[str, Any], frames: list[Any],
                  device: bool = False) -> dict[str, TensorRef]:
    """Refs for several (CPU) tensors whose buffers are appended to ``frames``, the extra frames
    of one message (so the first is frame 2 when ``frames`` starts empty). The buffers view the
    tensors (zero-copy): keep the tensors alive until the message is sent. With ``device`` (the
    frames stay in this process), a device tensor is its own frame."""
    refs = {}
    for key, tensor in tensors.items():
        if device and tensor.device.type != "cpu":
            refs[key] = describe(tensor, 2 + len(frames))
            frames.append(tensor)
            continue
        refs[key], buf = tensor_ref(tensor, 2 + len(frames))
        frames.append(buf)
    return refs


def check_tensor_ref(ref: TensorRef) -> tuple[Any, int]:
    """(torch dtype, element count) of ``ref``; ProtocolError for a dtype or shape that is not."""
    import torch

    if ref.dtype not in _DTYPES:
        raise ProtocolError(f"unsupported tensor dtype {ref.dtype!r}")
    if any(d < 0 for d in ref.shape):
        raise ProtocolError(f"negative dimension in {ref.shape}")
    numel = 1
    for d in ref.shape:
        numel *= d
    return getattr(torch, ref.dtype), numel


def tensor_from(ref: TensorRef, frames: Sequence[Any]) -> Any:
    """The torch tensor described by ``ref`` (``frames`` are the message's extra frames).

    Validates dtype, shape and byte count; the tensor shares memory with the frame. A frame
    may be a device tensor itself, handed over in-process (`tensor_frames` with ``device``).
    """
    import torch

    dtype, numel = check_tensor_ref(ref)
    idx = ref.frame - 2
    if not 0 <= idx < len(frames):
        raise ProtocolError(f"tensor frame {ref.frame} missing")
    if isinstance(frames[idx], torch.Tensor):
        t = frames[idx]
        if t.dtype != dtype or list(t.shape) != list(ref.shape):
            raise ProtocolError(f"tensor frame is {t.dtype} {list(t.shape)}, expected "
                                f"{ref.dtype} {ref.shape}")
        return t
    buf = memoryview(frames[idx]).cast("B")
    if buf.nbytes != numel * dtype.itemsize:
        raise ProtocolError(f"tensor frame has {buf.nbytes} bytes, expected {numel * dtype.itemsize}")
    if numel == 0:
        return torch.empty(ref.shape, dtype=dtype)
    flat = torch.frombuffer(buf, dtype=torch.uint8)
    return flat.view(dtype).view(ref.shape)
