"""msgspec + zmq round trip over loopback tcp: a GenerateRequest, and a 4 MB tensor frame.

    python bench/protocol_roundtrip.py [--out bench/results/protocol_roundtrip.json]

A PUSH/PULL pair each way (the shape of frontend<->engine traffic); the echo side decodes and
re-encodes every message, so the figure includes both codecs on both ends.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import torch
import zmq

from protocol.addresses import tcp
from protocol.codec import tensor_from, tensor_ref
from protocol.messages import GenerateRequest, Sampling, TokenOutputs
from protocol.sockets import Receiver, Sender


def echo(ctx, in_addr, out_addr, n):
    rx, tx = Receiver(ctx, in_addr, bind=True), Sender(ctx, out_addr, bind=False)
    for _ in range(n):
        msg, frames = rx.recv()
        tx.send(msg, frames)
    rx.close()
    tx.close()


def run(n: int, make_msg) -> list[float]:
    ctx = zmq.Context()
    a, b = tcp(), tcp()
    t = threading.Thread(target=echo, args=(ctx, a, b, n), daemon=True)
    t.start()
    rx, tx = Receiver(ctx, b, bind=True), Sender(ctx, a, bind=False)
    times = []
    for _ in range(n):
        msg, bufs, check = make_msg()
        t0 = time.perf_counter()
        tx.send(msg, bufs)
        got, frames = rx.recv()
        check(got, frames)
        times.append(time.perf_counter() - t0)
    t.join()
    rx.close()
    tx.close()
    ctx.term()
    return times[n // 10:]  # drop warm-up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--out", default="bench/results/protocol_roundtrip.json")
    args = ap.parse_args()

    req = GenerateRequest("cmpl-0123456789abcdef-0", list(range(1000)), Sampling(max_tokens=128),
                          [2], "tcp://127.0.0.1:5555")
    gen = run(args.n, lambda: (req, (), lambda m, f: None))

    tensor = torch.randn(1024, 1024)  # 4 MiB of float32, like a few images' embeddings
    ref, buf = tensor_ref(tensor, frame=2)

    def check(msg, frames):
        assert tensor_from(ref, frames).shape == tensor.shape

    big = run(max(50, args.n // 10), lambda: (TokenOutputs([]), (buf,), check))
    mb = tensor.numel() * 4 / 1e6
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "generate_request_1k_tokens_rtt_us": {"median": statistics.median(gen) * 1e6,
                                               "p99": sorted(gen)[int(len(gen) * 0.99)] * 1e6},
        "tensor_4MB_rtt_ms": {"median": statistics.median(big) * 1e3},
        "tensor_4MB_throughput_MB_s": 2 * mb / statistics.median(big),  # bytes moved both ways
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
