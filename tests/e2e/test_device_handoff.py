"""The device handoff (CUDA IPC) on a GPU: an encoder's ring slot read by another process, the
guard catching a reused slot, and `mmserve serve` answering the same with and without it.
Skipped without a GPU."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import time
import urllib.request

import msgspec
import pytest
import torch
from llava_utils import image, png
from server_utils import Server, metric

from protocol.codec import ProtocolError
from protocol.messages import DeviceRef, TensorRef

pytestmark = pytest.mark.gpu

# The encoder's side, in a process of its own (CUDA IPC does not open in the process that made
# the handle): a ring of 8 KiB, one [4, 8] bfloat16 slot, then on "wrap" enough slots to reuse it.
PRODUCER = textwrap.dedent("""
    import sys, msgspec, torch
    from encoder_worker.device_ring import DeviceRing
    ring = DeviceRing(torch.device("cuda", 0), 8192, min_age_s=0.0)
    x = torch.arange(32, device="cuda").view(4, 8).to(torch.bfloat16)
    ref = ring.put(x)
    torch.cuda.synchronize()
    print(msgspec.json.encode(ref).decode(), flush=True)
    assert sys.stdin.readline().strip() == "wrap"
    for _ in range(40):
        assert ring.put(torch.zeros(4, 8, dtype=torch.bfloat16, device="cuda")) is not None
    torch.cuda.synchronize()
    print("wrapped", flush=True)
    sys.stdin.readline()
    ring.close()
""")


def test_a_slot_is_read_by_another_process_until_the_ring_reuses_it():
    from llm_worker.device_inbox import DeviceInbox, SlotLost

    child = subprocess.Popen([sys.executable, "-c", PRODUCER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        ref = msgspec.json.decode(child.stdout.readline(), type=DeviceRef)
        inbox = DeviceInbox(torch.device("cuda", 0))
        want = torch.arange(32, device="cuda").view(4, 8).to(torch.bfloat16)
        got = inbox.copy(ref, TensorRef("bfloat16", [4, 8], 0))
        assert got.device == want.device and torch.equal(got, want)
        with pytest.raises(ProtocolError):  # another GPU's slot
            inbox.copy(msgspec.structs.replace(ref, gpu="GPU-other"), TensorRef("bfloat16",
                                                                                [4, 8], 0))
        with pytest.raises(ProtocolError):  # not inside the ring
            inbox.copy(ref, TensorRef("bfloat16", [4096, 8], 0))
        child.stdin.write("wrap\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "wrapped"
        with pytest.raises(SlotLost):
            inbox.copy(ref, TensorRef("bfloat16", [4, 8], 0))
    finally:
        child.stdin.close()
        child.wait(30)
    assert child.returncode == 0


def _answers(server: Server, n: int) -> list[str]:
    """Greedy answers about n different images, over HTTP (urllib: the GPU machine has no
    openai client)."""
    out = []
    for seed in range(n):
        url = "data:image/png;base64," + base64.b64encode(png(image(seed, (64, 48)))).decode()
        body = {"model": server.proc.args[4], "max_tokens": 8, "temperature": 0.0, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is it?"}]}]}
        req = urllib.request.Request(server.base + "/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            out.append(json.loads(r.read())["choices"][0]["message"]["content"])
    return out


def _settled(server: Server, name: str) -> float:
    """``name`` once the encoder's stats (a heartbeat, every 0.2 s) count all 4 items encoded."""
    deadline = time.monotonic() + 10
    while metric(server.base, 'mmserve_encoder_num_encoded{encoder="0"}') < 4:
        assert time.monotonic() < deadline, "the encoder's stats never counted 4 items"
        time.sleep(0.1)
    return metric(server.base, name)


def test_serve_on_one_gpu_hands_embeddings_over_on_the_device(tiny_llava):
    """Encoder and engine on one GPU: every image's embedding goes through the ring, and the
    answers equal those of the byte path (--encoder-device-ring-mb 0); different images give
    different answers (so the embeddings reach the prompt)."""
    common = ["--device", "cuda", "--encoder-device", "cuda", "--dtype", "float32",
              "--encoder-dtype", "float32"]
    answers, handoffs = {}, {}
    for ring in ("64", "0"):
        server = Server(tiny_llava, *common, "--encoder-device-ring-mb", ring, timeout=240)
        try:
            answers[ring] = _answers(server, 4)
            handoffs[ring] = _settled(server, 'mmserve_encoder_num_device_handoffs{encoder="0"}')
        finally:
            server.stop()
    assert handoffs == {"64": 4, "0": 0}
    assert answers["64"] == answers["0"]
    assert len(set(answers["64"])) > 1
