"""OpenAI-API load generator: Poisson arrivals of streamed chat requests with images.

    python bench/serve.py --base-url http://127.0.0.1:8000 --rates 2 5 10 --num-requests 100
    python bench/serve.py --launch deploy/demo_model/checkpoint --rates 2 5 --num-requests 40 \
        --images 1 --image-size 64x64 --repeat-fraction 0.5 --max-tokens 8 \
        --out bench/results/serve_cpu_demo.json

For each rate (requests/s) it sends `--num-requests` (or `--duration-s` worth of) chat requests
at Poisson arrival times, each with `--images` PNG data URLs of random pixels (made up front,
outside the timed path; `--repeat-fraction` of requests reuse an earlier request's images so the
encoder cache shows), `--prompt-words` of text, and `max_tokens=--max-tokens` with ignore_eos.
All requests stream with `stream_options.include_usage`. Per rate it reports TTFT (request sent
-> first content chunk), TPOT ((last token - first token) / (tokens - 1)), ITL (every gap between
content chunks) and end-to-end latency (p50 / p99 / mean, ms), request and output-token
throughput over the run (first send -> last completion), failures by status, and the deltas of
the server's cache counters in /metrics. `--launch MODEL` starts `mmserve serve MODEL` on a free
port in its own process group and always takes it down.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

WORDS = ("the a picture of shape colour red green blue circle square star triangle small large "
         "left right top bottom next to above below how many what is there in this").split()


# -- server ----------------------------------------------------------------------------------------

def free_port() -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model: str, extra: list[str], timeout: float) -> tuple[subprocess.Popen, str]:
    import urllib.request
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MMSERVE_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "frontend.cli", "serve", model,
                             "--port", str(port), *extra], env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=1.0) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError("mmserve serve did not become healthy")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server, SIGKILL its whole process group if it lingers (no orphans)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children left behind, if any
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait()


async def scrape(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """Every raw mmserve_* cache/hit number in /metrics (not their mmserve: twins), summed over
    labels ({} if /metrics is absent)."""
    try:
        async with session.get(base + "/metrics") as r:
            if r.status != 200:
                return {}
            text = await r.text()
    except aiohttp.ClientError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        if name.startswith("mmserve_") and ("cache" in name or "hit" in name):
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                pass
    return out


# -- workload --------------------------------------------------------------------------------------

def png_url(rng: np.random.Generator, w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_requests(args, n: int, rng: np.random.Generator, pyrng: random.Random) -> list[dict]:
    """Message lists for n requests; fresh images are distinct across the whole run."""
    w, h = args.image_size
    images: list[list[str]] = []
    out = []
    for i in range(n):
        repeat = bool(args.images) and i > 0 and pyrng.random() < args.repeat_fraction
        if repeat:
            urls = pyrng.choice(images)
        else:
            urls = [png_url(rng, w, h) for _ in range(args.images)]
        images.append(urls)
        text = " ".join(pyrng.choice(WORDS) for _ in range(args.prompt_words))
        content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        content.append({"type": "text", "text": text})
        out.append({"messages": [{"role": "user", "content": content}], "repeat": repeat})
    return out


async def one(session: aiohttp.ClientSession, url: str, model: str, messages: list,
              max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0}
    times: list[float] = []
    usage = None
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                await r.read()
                return {"status": r.status, "t0": t0, "end": time.perf_counter()}
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk.get("choices") or []:
                    if (c.get("delta") or {}).get("content"):
                        times.append(time.perf_counter())
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return {"status": type(e).__name__, "t0": t0, "end": time.perf_counter()}
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else len(times)
    if not times:
        return {"status": "no_content", "t0": t0, "end": end}
    return {"status": 200, "t0": t0, "end": end, "times": times, "tokens": tokens}


def stats(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p99": None, "mean": None, "n": 0}
    a = np.asarray(xs) * 1e3
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "n": len(xs)}


async def run_rate(session, base, model, args, rate, reqs, arrivals) -> dict:
    url = base + "/v1/chat/completions"
    before = await scrape(session, base)

    async def fire(i: int, at: float, start: float) -> dict:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        return await one(session, url, model, reqs[i]["messages"], args.max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(fire(i, a, start) for i, a in enumerate(arrivals)))
    after = await scrape(session, base)
    ok = [r for r in results if r["status"] == 200]
    failures: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            failures[str(r["status"])] = failures.get(str(r["status"]), 0) + 1
    span = max(r["end"] for r in results) - min(r["t0"] for r in results)
    ttft = [r["times"][0] - r["t0"] for r in ok]
    tpot = [(r["times"][-1] - r["times"][0]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    e2e = [r["end"] - r["t0"] for r in ok]
    out_tokens = sum(r["tokens"] for r in ok)
    return {
        "rate": rate, "requests": len(results), "repeated_images": sum(r["repeat"] for r in reqs),
        "completed": len(ok), "failures": failures,
        "duration_s": span, "offered_span_s": float(arrivals[-1]) if len(arrivals) else 0.0,
        "request_throughput": len(ok) / span, "output_token_throughput": out_tokens / span,
        "output_tokens": out_tokens, "exact_output_length": all(
            r["tokens"] == args.max_tokens for r in ok),
        "ttft_ms": stats(ttft), "tpot_ms": stats(tpot), "itl_ms": stats(itl), "e2e_ms": stats(e2e),
        "metrics_delta": {k: after[k] - before.get(k, 0.0) for k in after
                          if after[k] != before.get(k, 0.0)},
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


async def main_async(args, base: str) -> dict:
    rng = np.random.default_rng(args.seed)
    pyrng = random.Random(args.seed)
    # Arrival times and payloads for every rate, made before anything is timed.
    plan = []
    for rate in args.rates:
        if args.duration_s:
            gaps, t = [], 0.0
            while True:
                t += pyrng.expovariate(rate)
                if t > args.duration_s:
                    break
                gaps.append(t)
            arrivals = np.asarray(gaps)
        else:
            arrivals = np.cumsum([pyrng.expovariate(rate) for _ in range(args.num_requests)])
            arrivals -= arrivals[0]
        reqs = make_requests(args, len(arrivals), rng, pyrng)
        plan.append((rate, reqs, arrivals))
    warm = make_requests(args, args.warmup, rng, pyrng)

    timeout = aiohttp.ClientTimeout(total=args.request_timeout_s)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        async with session.get(base + "/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        for w in warm:  # sequential warm-up with images of its own (not reused later)
            res = await one(session, base + "/v1/chat/completions", model, w["messages"],
                            args.max_tokens)
            if res["status"] != 200:
                raise RuntimeError(f"warm-up request failed: {res['status']}")
        rows = []
        for rate, reqs, arrivals in plan:
            rows.append(await run_rate(session, base, model, args, rate, reqs, arrivals))
            print_row(rows[-1])
    return {"model": model, "rows": rows}


def print_header() -> None:
    print(f"{'rate':>5} {'done':>5} {'fail':>4} {'req/s':>6} {'tok/s':>7} "
          f"{'TTFT p50/p99':>15} {'TPOT p50/p99':>13} {'ITL p50/p99':>13} {'E2E p50/p99':>15}"
          "  cache deltas", flush=True)


def print_row(r: dict) -> None:
    def pp(s: dict) -> str:
        return "-" if s["p50"] is None else f"{s['p50']:.1f}/{s['p99']:.1f}"
    deltas = " ".join(f"{k.removeprefix('mmserve_')}+{v:g}" for k, v in r["metrics_delta"].items())
    print(f"{r['rate']:>5g} {r['completed']:>5} {sum(r['failures'].values()):>4} "
          f"{r['request_throughput']:>6.2f} {r['output_token_throughput']:>7.1f} "
          f"{pp(r['ttft_ms']):>15} {pp(r['tpot_ms']):>13} {pp(r['itl_ms']):>13} "
          f"{pp(r['e2e_ms']):>15}  {deltas}", flush=True)


def size(s: str) -> tuple[int, int]:
    w, h = s.lower().split("x")
    return int(w), int(h)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--base-url", default="http://127.0.0.1:8000")
    g.add_argument("--launch", metavar="MODEL", help="start `mmserve serve MODEL` on a free port")
    p.add_argument("--serve-args", default="", help="extra args for --launch, one string")
    p.add_argument("--rates", type=float, nargs="+", default=[2.0, 5.0, 10.0])
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--duration-s", type=float, default=None, help="instead of --num-requests")
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--image-size", type=size, default=(64, 64), help="WxH")
    p.add_argument("--repeat-fraction", type=float, default=0.0)
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    proc = None
    try:
        if args.launch:
            proc, base = launch(args.launch, args.serve_args.split(), timeout=180.0)
        else:
            base = args.base_url.rstrip("/")
        print_header()
        res = asyncio.run(main_async(args, base))
    finally:
        if proc is not None:
            stop(proc)
    report = {
        "bench": "serve", "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "server": {"base_url": None if args.launch else base, "launched": args.launch,
                   "serve_args": args.serve_args, "model": res["model"]},
        "config": {k: v for k, v in vars(args).items() if k not in ("base_url", "launch")},
        "results": res["rows"],
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
