"""The encoder as a real process on real zmq sockets: embeddings reach the decoder inbox and
equal transformers' features, repeats hit the store, garbage frames don't kill it, and a peer
that stops reading doesn't stall the others."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch
import zmq

from encoder_worker.config import EncoderConfig
from encoder_worker.io_threads import EncoderIO
from encoder_worker.server import run_encoder
from protocol import sockets
from protocol.addresses import tcp
from protocol.codec import tensor_from
from protocol.messages import (
    Embedding,
    EncodeDone,
    EncodeRequest,
    EncoderHeartbeat,
    EncoderStats,
    Hello,
    MsgType,
    Shutdown,
)
from protocol.sockets import Receiver, Sender

pytestmark = pytest.mark.slow


class Peer:
    """The test plays both neighbours: a frontend (reply_to) and a decoder inbox."""

    def __init__(self, encoder_addr: str):
        self.ctx = zmq.Context()
        self.addr = encoder_addr
        self.to_encoder = Sender(self.ctx, encoder_addr)
        self.decoder = Receiver(self.ctx, tcp())
        self.frontend = Receiver(self.ctx, tcp())

    def encode(self, key: str, data: bytes | None, rid: str) -> None:
        self.to_encoder.send(EncodeRequest(key, "image", data, {}, [self.decoder.addr],
                                           self.frontend.addr, rid))

    def expect(self, receiver: Receiver, kind: type, timeout: float = 10.0, where=lambda m: True):
        """The next message of ``kind`` that passes ``where`` (others, e.g. beats, skipped)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = receiver.recv(timeout_ms=int(left * 1000) + 1)
            if got is not None and isinstance(got[0], kind) and where(got[0]):
                return got
        raise AssertionError(f"no {kind.__name__} within {timeout} s")

    def stats_after(self, t: float):
        beat, _ = self.expect(self.frontend, EncoderHeartbeat, where=lambda b: b.time > t)
        return beat.stats

    def close(self) -> None:
        for s in (self.to_encoder, self.decoder, self.frontend):
            s.close()
        self.ctx.term()


@pytest.fixture(scope="module")
def encoder(tiny_llava):
    addr = tcp()
    proc = mp.get_context("spawn").Process(
        target=run_encoder, args=(EncoderConfig(tiny_llava, device="cpu"), addr), daemon=True)
    proc.start()
    peer = Peer(addr)
    try:
        deadline = time.monotonic() + 60
        while True:  # Hello until the first heartbeat: the child is loading the model
            peer.to_encoder.send(Hello(frontend_id="test", reply_to=peer.frontend.addr))
            got = peer.frontend.recv(timeout_ms=500)
            if got is not None and isinstance(got[0], EncoderHeartbeat):
                assert got[0].addr == addr
                break
            assert proc.is_alive() and time.monotonic() < deadline, "encoder did not start"
        yield peer, proc
    finally:
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
        peer.close()


def test_encode_publish_and_cache_hit(encoder, hf_features, make_image, to_png):
    peer, _ = encoder
    images = [make_image(10), make_image(11, 64, 33)]
    for i, img in enumerate(images):
        peer.encode(f"blake3:img{i}", to_png(img), f"req{i}")
    got = {}
    for _ in images:
        msg, frames = peer.expect(peer.decoder, Embedding)
        assert len(frames) == 1  # the tensor rides as one extra frame
        got[msg.key] = tensor_from(msg.tensor, frames)
    dones = [peer.expect(peer.frontend, EncodeDone)[0] for _ in images]
    assert sorted(d.request_id for d in dones) == ["req0", "req1"]
    assert all(d.status == 200 and not d.cache_hit for d in dones)
    ref = hf_features(images)
    for i in range(2):
        assert got[f"blake3:img{i}"].shape == (16, 64)
        torch.testing.assert_close(got[f"blake3:img{i}"], ref[i], atol=1e-5, rtol=0)
    encoded = peer.stats_after(time.time()).num_encoded

    peer.encode("blake3:img0", None, "req2")  # again, by key alone
    msg, frames = peer.expect(peer.decoder, Embedding)
    torch.testing.assert_close(tensor_from(msg.tensor, frames), ref[0], atol=1e-5, rtol=0)
    done, _ = peer.expect(peer.frontend, EncodeDone)
    assert (done.request_id, done.status, done.cache_hit) == ("req2", 200, True)
    stats = peer.stats_after(time.time())
    assert stats.num_encoded == encoded and stats.num_cache_hits >= 1
    assert stats.store_items >= 2 and stats.store_bytes >= 2 * 16 * 64 * 4


def test_uuid_miss_and_bad_image_are_400(encoder):
    peer, _ = encoder
    peer.encode("uuid:never-seen", None, "req-miss")
    done, _ = peer.expect(peer.frontend, EncodeDone)
    assert done.status == 400 and "uuid:never-seen" in done.message
    assert "not in the embedding cache" in done.message
    peer.encode("blake3:junk", b"\x89PNG but not really", "req-bad")
    done, _ = peer.expect(peer.frontend, EncodeDone)
    assert (done.request_id, done.status) == ("req-bad", 400)


def test_survives_garbage_frames(encoder, make_image, to_png):
    peer, proc = encoder
    for frames in ([b"\xff", b"x"], [b"only one frame"], [bytes([MsgType.ENCODE]), b"\xc1junk"],
                   [bytes([MsgType.ENCODE]), b"\x93\x01\x02\x03"], [b"", b"", b""]):
        peer.to_encoder.sock.send_multipart(frames)
    peer.encode("blake3:after", to_png(make_image(12)), "req-after")
    done, _ = peer.expect(peer.frontend, EncodeDone, where=lambda d: d.request_id == "req-after")
    assert done.status == 200 and proc.is_alive()


def test_shutdown_message_stops_it(encoder):
    """Runs last in this module: the fixture's process exits cleanly on Shutdown."""
    peer, proc = encoder
    peer.to_encoder.send(Shutdown(reason="test"))
    proc.join(10)
    assert proc.exitcode == 0


def test_a_peer_that_stops_reading_does_not_stall_the_others(monkeypatch):
    monkeypatch.setattr(sockets, "HWM", 8)  # full after 8 queued messages, not 100k
    io = EncoderIO(tcp(), lambda: EncoderHeartbeat("t", 0.0, EncoderStats()), heartbeat_s=60)
    ctx = zmq.Context()
    frontend = Receiver(ctx, tcp())
    try:
        stuck = tcp()  # nobody ever binds it: messages queue on our side until the HWM
        for i in range(50):
            io.send(stuck, Shutdown(reason=str(i)))
        io.send(frontend.addr, Shutdown(reason="after"))
        got = frontend.recv(timeout_ms=5000)
        assert got is not None and got[0].reason == "after"
        assert 50 - 2 * 8 <= io.dropped[stuck] < 50
    finally:
        io.close()
        frontend.close()
        ctx.term()
