"""The encoder's busy loop, driven in-process with its sends recorded: coalescing of duplicate
keys, batching, user-supplied embeddings and error statuses."""

from __future__ import annotations

import time

import pytest
import torch

from encoder_worker.config import EncoderConfig
from encoder_worker.io_threads import UserEmbeds
from encoder_worker.server import INTERNAL_ERROR, EncoderProc
from protocol.addresses import tcp
from protocol.codec import tensor_from
from protocol.messages import Embedding, EncodeDone, EncodeRequest


@pytest.fixture
def proc(tiny_llava):
    p = EncoderProc(EncoderConfig(tiny_llava, device="cpu", max_wait_ms=1000, store_bytes=1 << 20),
                    tcp())
    p.sent = []
    p.io.send = lambda addr, msg, buffers=(): p.sent.append((addr, msg, list(buffers)))
    yield p
    p.close()


def request(key: str, data: bytes | None, rid: str = "r", deliver_to=("dec0",), **kw):
    return EncodeRequest(key=key, modality=kw.pop("modality", "image"), data=data, kwargs={},
                         deliver_to=list(deliver_to), reply_to="fe", request_id=rid, **kw)


def pump(p: EncoderProc, num_done: int, timeout: float = 10.0) -> list[EncodeDone]:
    """Run the loop until ``num_done`` EncodeDone messages were sent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [m for _, m, _ in p.sent if isinstance(m, EncodeDone)]
        if len(done) >= num_done:
            return done
        p._drain_inputs(p._wait_s())
        p._step()
    raise AssertionError(f"only {len(done)} of {num_done} EncodeDone")


def embeddings(p: EncoderProc) -> list[tuple[str, Embedding, torch.Tensor]]:
    return [(a, m, tensor_from(m.tensor, b)) for a, m, b in p.sent if isinstance(m, Embedding)]


def test_duplicate_keys_are_encoded_once(proc, make_image, to_png):
    data = to_png(make_image(0))
    proc._handle(request("k", data, "r1", ["dec0", "dec1"]))
    proc._handle(request("k", data, "r2", ["dec1"]))
    proc._handle(request("k", None, "r3", ["dec2"]))  # uuid-only, arriving while in flight
    assert proc.num_decoding == 1 and len(proc.waiters["k"]) == 3
    done = pump(proc, 3)
    assert sorted(d.request_id for d in done) == ["r1", "r2", "r3"]
    assert all(d.status == 200 and not d.cache_hit for d in done)
    assert [a for a, _, _ in embeddings(proc)] == ["dec0", "dec1", "dec2"]  # once per address
    assert proc.stats.num_encoded == 1 and "k" in proc.store and not proc.waiters
    st = proc.stats  # the item's time, by stage, and in all (which covers the stages)
    assert st.decode_seconds > 0 and st.tower_seconds > 0 and st.queue_seconds >= 0
    assert st.item_seconds >= st.decode_seconds + st.tower_seconds and not proc.arrived


def test_ready_items_share_one_tower_batch(proc, make_image, to_png):
    calls: list[int] = []
    encode = proc.model.encode
    proc.model.encode = lambda px: calls.append(px.shape[0]) or encode(px)
    for i in range(3):
        proc._handle(request(f"k{i}", to_png(make_image(i)), f"r{i}"))
    pump(proc, 3)
    assert calls == [3]
    out = {m.key: t for _, m, t in embeddings(proc)}
    assert out["k0"].shape == (16, 64) and out["k0"].dtype == torch.float32
    assert out["k0"].untyped_storage().nbytes() == out["k0"].nbytes  # owns its memory


def test_batches_are_capped(tiny_llava, make_image, to_png):
    p = EncoderProc(EncoderConfig(tiny_llava, device="cpu", max_batch_items=2, max_wait_ms=1000),
                    tcp())
    try:
        p.sent = []
        p.io.send = lambda addr, msg, buffers=(): p.sent.append((addr, msg, list(buffers)))
        calls: list[int] = []
        encode = p.model.encode
        p.model.encode = lambda px: calls.append(px.shape[0]) or encode(px)
        for i in range(3):
            p._handle(request(f"k{i}", to_png(make_image(i)), f"r{i}"))
        pump(p, 3)
        assert sorted(calls) == [1, 2]
    finally:
        p.close()


def test_error_statuses(proc, make_image, to_png):
    proc._handle(request("bad", b"garbage", "r1"))
    proc._handle(request("gone", None, "r2"))
    proc._handle(request("snd", b"x", "r3", modality="audio"))
    done = {d.request_id: d for d in pump(proc, 3)}
    assert done["r1"].status == 400 and "cannot decode image" in done["r1"].message
    assert done["r2"].status == 400 and "not in the embedding cache" in done["r2"].message
    assert done["r3"].status == 400 and "audio" in done["r3"].message
    assert proc.stats.num_errors == 3 and not embeddings(proc)


def test_tower_failure_is_a_500_without_internals(proc, make_image, to_png):
    def boom(px):
        raise RuntimeError("secret internal detail")

    proc.model.encode = boom
    proc._handle(request("k", to_png(make_image(0)), "r1"))
    (done,) = pump(proc, 1)
    assert (done.status, done.message) == (500, INTERNAL_ERROR)
    assert not proc.waiters and "k" not in proc.store


def test_user_embeddings_are_stored_and_published(proc):
    t = torch.randn(5, 64)
    proc._handle(UserEmbeds(request("u", None, "r1", embeds=None), t, ""))
    proc._handle(UserEmbeds(request("w", None, "r2"), torch.randn(5, 3), ""))
    proc._handle(UserEmbeds(request("x", None, "r3"), None, "bad image embeddings frame: x"))
    proc._handle(request("u", None, "r4"))  # later by uuid alone: a cache hit
    done = {d.request_id: d for d in pump(proc, 4)}
    assert done["r1"].status == 200 and done["r4"].cache_hit
    assert done["r2"].status == 400 and "[n, 64]" in done["r2"].message
    assert done["r3"].status == 400
    assert all(torch.equal(e, t) for _, _, e in embeddings(proc))
    beat = proc._heartbeat()
    assert beat.stats.num_requests == 4 and beat.stats.num_cache_hits == 1
    assert beat.stats.store_items == 1 and beat.stats.store_bytes == t.nbytes


@pytest.mark.gpu
def test_cuda_publishes_bf16(tiny_llava, hf_features, make_image, to_png):
    p = EncoderProc(EncoderConfig(tiny_llava, device="cuda"), tcp())  # dtype auto: bfloat16
    try:
        p.sent = []
        p.io.send = lambda addr, msg, buffers=(): p.sent.append((addr, msg, list(buffers)))
        images = [make_image(i) for i in range(3)]
        for i, img in enumerate(images):
            p._handle(request(f"k{i}", to_png(img), f"r{i}"))
        pump(p, 3)
        out = {m.key: (m, t) for _, m, t in embeddings(p)}
        for i, ref in enumerate(hf_features(images)):
            msg, t = out[f"k{i}"]
            assert msg.tensor.dtype == "bfloat16" and t.device.type == "cpu"
            torch.testing.assert_close(t.float(), ref, atol=0.1, rtol=0.05)
    finally:
        p.close()
