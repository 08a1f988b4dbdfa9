from __future__ import annotations

import msgspec
import pytest
import torch

from protocol.codec import ProtocolError, decode, encode, tensor_frames, tensor_from, tensor_ref
from protocol.hashing import content_key, hash_ints, uuid_key
from protocol.messages import (
    Abort,
    GenerateRequest,
    Hello,
    MMItem,
    MsgType,
    Sampling,
    TokenLogprobs,
    TokenOutput,
    TokenOutputs,
)


def test_round_trip_every_data_message():
    req = GenerateRequest(
        "r1", [1, 2, 3], Sampling(max_tokens=4, temperature=0.0, stop_token_ids=[7]), [2],
        "tcp://127.0.0.1:5555", mm_items=[MMItem("blake3:ab", "image", 3, 10, {"h": 2})],
    )
    outs = TokenOutputs([TokenOutput("r1", [5], "stop", 7, [TokenLogprobs([5, 6], [-0.1, -2.0])])])
    for msg in (req, outs, Abort(["a", "b"]), Hello(frontend_id="f", reply_to="tcp://x")):
        frames = encode(msg)
        assert frames[0] == bytes([{GenerateRequest: MsgType.GENERATE, TokenOutputs:
                                    MsgType.TOKEN_OUTPUTS, Abort: MsgType.ABORT,
                                    Hello: MsgType.HELLO}[type(msg)]])
        got, extra = decode(frames)
        assert got == msg and extra == []


def test_fields_are_append_only_compatible():
    """A peer one version ahead (an extra trailing field) or behind (a missing trailing field
    with a default) still decodes: that is what 'fields are append-only' buys."""

    current = Sampling(max_tokens=5, temperature=0.5)
    newer = msgspec.msgpack.encode([*msgspec.structs.astuple(current), 99])
    assert msgspec.msgpack.decode(newer, type=Sampling) == current
    older = msgspec.msgpack.encode([5])
    assert msgspec.msgpack.decode(older, type=Sampling) == Sampling(max_tokens=5)


@pytest.mark.parametrize(
    "frames",
    [
        [b"\x04"],
        [b"", b""],
        [b"\xff", b"\x90"],
        [b"\x04\x04", b"\x90"],
        [bytes([MsgType.GENERATE]), b"not msgpack at all"],
        [bytes([MsgType.GENERATE]), msgspec.msgpack.encode(["r", "not a list"])],
        [bytes([MsgType.ABORT]), msgspec.msgpack.encode([[1, 2]])],
        # a pickle payload is just bytes of the wrong shape: it must fail to decode, not execute
        [bytes([MsgType.GENERATE]), b"\x80\x04\x95\x1d\x00cos\nsystem\n\x94."],
    ],
)
def test_garbage_raises_protocol_error(frames):
    with pytest.raises(ProtocolError):
        decode(frames)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_tensor_frames_round_trip_zero_copy(dtype):
    t = (torch.randn(3, 5) * 10).to(dtype)
    ref, buf = tensor_ref(t, frame=2)
    frames = encode(TokenOutputs([]), [buf])
    _, extra = decode(frames)
    got = tensor_from(ref, extra)
    assert got.dtype == dtype and torch.equal(got, t)
    # zero-copy: the decoded tensor views the frame's memory
    assert got.untyped_storage().data_ptr() == torch.frombuffer(extra[0], dtype=torch.uint8).data_ptr()


def test_tensor_frame_validation():
    t = torch.ones(4, dtype=torch.float32)
    ref, buf = tensor_ref(t, frame=2)
    with pytest.raises(ProtocolError):
        tensor_from(ref, [])  # frame missing
    with pytest.raises(ProtocolError):
        tensor_from(ref, [bytes(buf)[:-1]])  # wrong byte count
    bad = msgspec.structs.replace(ref, dtype="object")
    with pytest.raises(ProtocolError):
        tensor_from(bad, [buf])


def test_in_process_frames_keep_device_tensors_as_they_are():
    """For a runner in the engine's process a device tensor is its own frame ('meta' stands in
    for CUDA); host tensors still become zero-copy buffers, and without ``device`` everything
    must be host memory."""
    dev, host = torch.empty(2, 3, device="meta"), torch.ones(4)
    frames: list = []
    refs = tensor_frames({"d": dev, "h": host}, frames, device=True)
    assert frames[0] is dev and isinstance(frames[1], memoryview)
    assert tensor_from(refs["d"], frames) is dev and torch.equal(tensor_from(refs["h"], frames), host)
    with pytest.raises(ProtocolError):
        tensor_from(msgspec.structs.replace(refs["d"], shape=[3, 2]), frames)
    with pytest.raises((TypeError, RuntimeError, NotImplementedError)):
        tensor_frames({"d": dev}, [])


def test_keys():
    assert uuid_key("abc") == "uuid:abc"
    a = content_key(b"img", {"rgba_background_color": [0, 0, 0]})
    assert a.startswith("blake3:") and len(a) == 7 + 64
    assert a == content_key(b"img", {"rgba_background_color": [0, 0, 0]})
    assert a != content_key(b"img", {"rgba_background_color": [255, 255, 255]})
    assert a != content_key(b"img2", {"rgba_background_color": [0, 0, 0]})
    assert hash_ints(None, (1, 2)) != hash_ints(None, (1, 2), (("k", 0),))
    assert hash_ints(b"p", (1, 2)) != hash_ints(b"q", (1, 2))
