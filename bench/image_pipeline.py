"""Images through the disaggregated pipeline on this machine (CPU, tiny LLaVA):

  1. images/s through 1 and 2 encoder processes (real processes and zmq; 640x480 JPEGs, all
     distinct so every one is decoded, preprocessed and run through the tower)
  2. frontend work per image request (data-URL decode, header probe, blake3 key, template,
     tokenize, placeholder expansion), timed in-process
  3. bytes moved per image on each hop

    python bench/image_pipeline.py [--images 64] [--out bench/results/image_pipeline.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq
from PIL import Image

from frontend.media.encoder_pool import rendezvous
from frontend.random_model import build_random_llava
from protocol.addresses import tcp
from protocol.codec import encode
from protocol.hashing import content_key
from protocol.messages import Embedding, EncodeDone, EncodeRequest, EncoderHeartbeat, Hello
from protocol.sockets import Receiver, Sender


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((480, 640, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def run_encoder(model: str, addr: str) -> None:
    os.environ.setdefault("MMSERVE_LOG_LEVEL", "WARNING")
    from encoder_worker.config import EncoderConfig
    from encoder_worker.server import run_encoder as run

    run(EncoderConfig(model=model, device="cpu"), addr)


def encoder_throughput(model: str, images: list[bytes], num_encoders: int) -> dict:
    ctx = mp.get_context("spawn")
    addrs = [tcp() for _ in range(num_encoders)]
    procs = [ctx.Process(target=run_encoder, args=(model, a), daemon=True) for a in addrs]
    for p in procs:
        p.start()
    zctx = zmq.Context()
    reply, inbox = tcp(), tcp()
    rx, emb_rx = Receiver(zctx, reply, bind=True), Receiver(zctx, inbox, bind=True)
    senders = {a: Sender(zctx, a) for a in addrs}
    try:
        live: set[str] = set()
        deadline = time.monotonic() + 120
        while len(live) < num_encoders:
            assert time.monotonic() < deadline, "encoders did not start"
            for s in senders.values():
                s.send(Hello(frontend_id="bench", reply_to=reply))
            got = rx.recv(500)
            if got and isinstance(got[0], EncoderHeartbeat):
                live.add(got[0].addr)
        reqs = [EncodeRequest(content_key(b), "image", b, {}, [inbox], reply, f"r{i}")
                for i, b in enumerate(images)]
        sent_bytes = [sum(len(f) for f in encode(r)) for r in reqs]
        t0 = time.perf_counter()
        for r in reqs:
            senders[rendezvous(r.key, addrs)].send(r)
        done, emb_bytes = 0, []
        while done < len(reqs):
            got = rx.recv(60_000)
            assert got is not None, "timed out"
            if isinstance(got[0], EncodeDone):
                assert got[0].status == 200, got[0].message
                done += 1
        elapsed = time.perf_counter() - t0
        while len(emb_bytes) < len(reqs):
            msg, frames = emb_rx.recv(10_000)
            if isinstance(msg, Embedding):
                emb_bytes.append(sum(memoryview(f).nbytes for f in frames)
                                 + len(encode(msg)[1]))
        return {"encoders": num_encoders, "images": len(reqs),
                "images_per_s": len(reqs) / elapsed,
                "frontend_to_encoder_bytes_per_image": statistics.mean(sent_bytes),
                "encoder_to_decoder_bytes_per_image": statistics.mean(emb_bytes)}
    finally:
        for s in senders.values():
            s.close()
        rx.close()
        emb_rx.close()
        zctx.term()
        for p in procs:
            p.terminate()
            p.join()


def frontend_work(model: str, data: bytes, n: int) -> dict:
    import transformers

    from frontend.chat import ChatRenderer
    from frontend.config import FrontendConfig
    from frontend.media.inputs import MediaInputs
    from frontend.processor import InputProcessor
    from frontend.sampling_params import SamplingParams

    tok = transformers.AutoTokenizer.from_pretrained(model)
    config = FrontendConfig(model=model, engine_addr="tcp://127.0.0.1:1")
    media, renderer = MediaInputs(config, None), ChatRenderer(tok)
    processor = InputProcessor(tok, 2048, len(tok), model_path=model)
    url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is in this image?"}]}]

    async def one() -> tuple[float, int]:
        t0 = time.perf_counter()
        messages, items = await media.parse(msgs)
        ids, mm = media.expand(renderer.render(messages).prompt_token_ids, items)
        reqs = processor.process("r", ids, SamplingParams(max_tokens=16), "tcp://x", mm_items=mm)
        return time.perf_counter() - t0, sum(len(f) for f in encode(reqs[0]))

    async def run() -> list[tuple[float, int]]:
        out = [await one() for _ in range(n)]
        await media.close()
        return out

    res = asyncio.run(run())[n // 10:]
    return {"data_url_bytes": len(url), "frontend_ms_per_image_request":
            statistics.median(t for t, _ in res) * 1e3,
            "frontend_to_decoder_request_bytes": res[0][1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--out", default="bench/results/image_pipeline.json")
    args = ap.parse_args()
    images = [jpeg(i) for i in range(args.images)]
    with tempfile.TemporaryDirectory() as d:
        # CLIP-style 224/14 tower (256 patches) that is small enough for two CPU cores.
        build_random_llava(d, image_size=224, patch_size=14, vision_hidden=64, text_hidden=128)
        rows = [encoder_throughput(d, images, k) for k in (1, 2)]
        fe = frontend_work(d, images[0], 50)
    result = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
              "model": "random LLaVA: CLIP 224/14 hidden 64 x3 layers, LM hidden 128",
              "image": "640x480 JPEG", "encoders": rows, "frontend": fe}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
