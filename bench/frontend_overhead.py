"""Frontend overhead per request: HTTP latency minus the engine's own latency for the same work.

    python bench/frontend_overhead.py [--n 200] [--out bench/results/frontend_overhead.json]

Starts a real engine core (`mmserve llm-worker`, tiny random model) and measures, sequentially:
  engine:  GenerateRequest -> TokenOutputs straight over zmq (what the frontend must wait for)
  http:    POST /v1/completions and /v1/chat/completions through a real `mmserve frontend`
The difference of medians is the time the frontend adds (parse, template, tokenize, detokenize,
JSON, HTTP), which is what a faster frontend would save.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import zmq

from frontend.random_model import build_random_checkpoint
from protocol.addresses import free_port, tcp
from protocol.messages import GenerateRequest, Hello, Ready, Sampling, TokenOutputs
from protocol.sockets import Receiver, Sender

PROMPT = "The quick brown fox jumps over the lazy dog. Hello world! How are you today?"


def start(argv: list[str]) -> subprocess.Popen:
    env = dict(os.environ, MMSERVE_LOG_LEVEL="WARNING")
    return subprocess.Popen([sys.executable, "-m", "frontend.cli", *argv, "--exit-with-parent"],
                            env=env)


def engine_direct(engine_addr: str, prompt_ids: list[int], n: int, max_tokens: int) -> list[float]:
    ctx = zmq.Context()
    reply = tcp()
    rx, tx = Receiver(ctx, reply, bind=True), Sender(ctx, engine_addr)
    tx.send(Hello(frontend_id="bench", reply_to=reply))
    while not isinstance(rx.recv()[0], Ready):
        pass
    times = []
    for i in range(n):
        req = GenerateRequest(f"bench-{i}", prompt_ids, Sampling(max_tokens=max_tokens,
                              temperature=0.0, ignore_eos=True), [2], reply)
        t0 = time.perf_counter()
        tx.send(req)
        done = False
        while not done:
            msg, _ = rx.recv()
            if isinstance(msg, TokenOutputs):
                done = any(o.finish_reason for o in msg.outputs)
        times.append(time.perf_counter() - t0)
    rx.close()
    tx.close()
    ctx.term()
    return times[n // 10:]


async def http(base: str, model: str, n: int, max_tokens: int, chat: bool) -> list[float]:
    times = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True}
            if chat:
                body["messages"] = [{"role": "user", "content": PROMPT}]
            else:
                body["prompt"] = PROMPT
            url = base + ("/v1/chat/completions" if chat else "/v1/completions")
            t0 = time.perf_counter()
            async with s.post(url, json=body) as r:
                assert r.status == 200, await r.text()
                await r.json()
            times.append(time.perf_counter() - t0)
    return times[n // 10:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--out", default="bench/results/frontend_overhead.json")
    args = ap.parse_args()
    import transformers

    with tempfile.TemporaryDirectory() as model:
        build_random_checkpoint(model)
        tok = transformers.AutoTokenizer.from_pretrained(model)
        engine_addr, port = tcp(), free_port()
        procs = [start(["llm-worker", "--model", model, "--input-addr", engine_addr]),
                 start(["frontend", "--model", model, "--engine-addr", engine_addr,
                        "--port", str(port)])]
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    import urllib.request

                    if urllib.request.urlopen(base + "/health", timeout=1).status == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
            ids = tok(PROMPT)["input_ids"]
            chat_ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                               add_generation_prompt=True, tokenize=False)
            chat_ids = tok(chat_ids, add_special_tokens=False)["input_ids"]
            eng = engine_direct(engine_addr, ids, args.n, args.max_tokens)
            eng_chat = engine_direct(engine_addr, chat_ids, args.n, args.max_tokens)
            comp = asyncio.run(http(base, model, args.n, args.max_tokens, chat=False))
            chat = asyncio.run(http(base, model, args.n, args.max_tokens, chat=True))
        finally:
            for p in procs:
                p.terminate()
                p.wait()
    med = statistics.median
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "model": "random Llama, 2 layers, hidden 64", "max_tokens": args.max_tokens,
        "engine_direct_ms": med(eng) * 1e3,
        "http_completions_ms": med(comp) * 1e3,
        "http_chat_ms": med(chat) * 1e3,
        "frontend_overhead_completions_ms": (med(comp) - med(eng)) * 1e3,
        "frontend_overhead_chat_ms": (med(chat) - med(eng_chat)) * 1e3,
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
