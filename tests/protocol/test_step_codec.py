"""The step as the unit of transport: SchedulerOutput / ModelRunnerOutput through the codec, the
embeddings as extra zero-copy frames, and the fan-out that sends one encoding to every worker."""

from __future__ import annotations

import time

import msgspec
import pytest
import torch
import zmq

from protocol.addresses import tcp
from protocol.codec import ProtocolError, decode, encode, tensor_frames, tensor_from
from protocol.messages import MMItem, MsgType, Sampling, TokenLogprobs
from protocol.sockets import Fanout, Receiver
from protocol.step import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)


def _step() -> tuple[SchedulerOutput, list, dict[str, torch.Tensor]]:
    new = NewRequestData("b", [1, 2, 3], 3, Sampling(temperature=0.0, logprobs=2), [4, 5], 0,
                         [MMItem("blake3:aa", "image", 1, 2, {"grid_thw": [1, 2, 2]})], (2,))
    # "z" before "a": the batch order is the dict's order, not sorted.
    out = SchedulerOutput([new], [CachedRequestData("z", [9], 17)], {"z": 1, "b": 3}, 4,
                          finished_request_ids={"gone"}, freed_embeddings=["blake3:old"])
    tensors = {"blake3:aa": torch.randn(2, 8), "uuid:x": torch.randn(3, 8).bfloat16()}
    frames: list = []
    out.embeddings = tensor_frames(tensors, frames)
    return out, frames, tensors


def test_scheduler_output_round_trip_with_embedding_frames():
    out, frames, tensors = _step()
    wire = [bytes(f) for f in encode(out, frames)]
    assert wire[0] == bytes([MsgType.SCHEDULER_OUTPUT]) and len(wire) == 2 + len(tensors)
    got, extra = decode(wire)
    assert got == out
    assert list(got.num_scheduled_tokens) == ["z", "b"]
    for key, tensor in tensors.items():
        back = tensor_from(got.embeddings[key], extra)
        assert back.dtype == tensor.dtype and torch.equal(back, tensor)
    # The payload carries no tensor bytes: they are the extra frames only.
    assert len(wire[1]) < 300


def test_frames_view_the_tensors_without_copying():
    out, frames, tensors = _step()
    key = "blake3:aa"
    view = tensor_from(out.embeddings[key], frames)
    tensors[key][0, 0] = 123.0
    assert view[0, 0] == 123.0


def test_runner_output_round_trip():
    out = ModelRunnerOutput({"a": 5, "b": 7}, {"a": TokenLogprobs([5, 6], [-0.1, -2.0], [1])})
    got, extra = decode(encode(out))
    assert got == out and extra == []


def test_a_step_payload_of_another_shape_is_refused():
    bad = msgspec.msgpack.encode([[], [], {"a": "not a count"}, 1])
    with pytest.raises(ProtocolError, match="SCHEDULER_OUTPUT"):
        decode([bytes([MsgType.SCHEDULER_OUTPUT]), bad])


def test_fanout_sends_one_encoding_to_every_peer_and_never_blocks():
    ctx = zmq.Context()
    fan = Fanout(ctx, [tcp(), tcp()])
    try:
        # No peer yet: a plain PUSH would block here forever; the fan-out says so at once.
        assert fan.send(SchedulerOutput.empty()) is False
        peers = [Receiver(ctx, addr, bind=False) for addr in fan.addrs]
        probe = SchedulerOutput.empty()
        deadline = time.monotonic() + 5
        while not fan.send(probe):  # until both connections are up (earlier probes: skipped)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        out, frames, tensors = _step()
        assert fan.send(out, frames)
        for peer in peers:
            got, extra = peer.recv(timeout_ms=5000)
            while got == probe:
                got, extra = peer.recv(timeout_ms=5000)
            assert got == out and len(extra) == len(tensors)
        for p in peers:
            p.close()
    finally:
        fan.close()
        ctx.term()
