"""Throughput while an encoder is SIGKILLed under load (`mmserve serve MODEL --encoders 2`):

  1. steady requests/s of a closed-loop load of image chat requests (all images distinct)
  2. requests/s in the 3 s after one encoder child is SIGKILLed, and the ratio to (1)
  3. detection latency: kill -> /metrics mmserve_encoders_live drops (polled every 10 ms)
  4. rejoin: kill -> the launcher's restarted encoder is live again, and it receives work

Then the same with the launcher paused (SIGSTOP) for the window, so its restart of the encoder
(imports + model load, seconds of CPU) does not compete with serving: that separates what the
routing costs from what a restart on the same cores costs.

    python bench/encoder_kill.py [--model DIR] [--concurrency 16] [--kills 2] [--held-kills 1]
        [--out bench/results/encoder_kill.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

from protocol.addresses import free_port

WINDOW_S = 3.0


def png_url(seed: int) -> str:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def metrics(base: str) -> dict[str, float]:
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=2) as r:
            lines = r.read().decode().splitlines()
    except OSError:
        return {}
    return {ln.split()[0]: float(ln.split()[1]) for ln in lines if ln and ln[0] != "#"}


def children(pid: int) -> dict[int, str]:
    """Direct children of ``pid`` -> their command lines (from /proc)."""
    out = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(
                    b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
    return out


def arg_after(cmd: str, flag: str) -> list[str]:
    words = cmd.split()
    i = words.index(flag) + 1
    out = []
    while i < len(words) and not words[i].startswith("--"):
        out.append(words[i])
        i += 1
    return out


class Load:
    """Closed-loop clients, each sending the next distinct image as soon as its last answer came."""

    def __init__(self, base: str, model: str, concurrency: int):
        self.base, self.model, self.concurrency = base, model, concurrency
        self.done: list[tuple[float, int]] = []  # (monotonic finish time, status)
        self.seed = 0
        self.stop = False

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            await asyncio.gather(*(self._client(s) for _ in range(self.concurrency)))

    async def _client(self, s: aiohttp.ClientSession) -> None:
        while not self.stop:
            self.seed += 1
            body = {"model": self.model, "max_tokens": 4, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_url(self.seed)}},
                {"type": "text", "text": "What is this?"}]}]}
            try:
                async with s.post(self.base + "/v1/chat/completions", json=body) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status = 0
            self.done.append((time.monotonic(), status))

    def rate(self, t0: float, t1: float) -> float:
        return sum(1 for t, st in self.done if t0 <= t < t1 and st == 200) / (t1 - t0)

    def failures(self, t0: float, t1: float) -> int:
        return sum(1 for t, st in self.done if t0 <= t < t1 and st != 200)


def watch_live(base: str, since: float, until_live: int, timeout: float,
               below: int | None = None) -> float | None:
    """Seconds from ``since`` until encoders_live < ``below`` (or == ``until_live``)."""
    while time.monotonic() - since < timeout:
        live = metrics(base).get("mmserve_encoders_live")
        if live is not None and (live < below if below is not None else live == until_live):
            return time.monotonic() - since
        time.sleep(0.01)
    return None


def one_kill(base: str, serve_pid: int, load: Load, victim: int, steady_s: float,
             hold_restart: bool) -> dict:
    kids = children(serve_pid)
    frontend = next(c for c in kids.values() if " frontend " in c)
    order = arg_after(frontend, "--encoder-addrs")
    pid = next(p for p, c in kids.items() if f" {order[victim]} " in c and " encoder " in c)
    encoded_before = metrics(base).get(f'mmserve_encoder_num_encoded{{encoder="{victim}"}}', 0)
    time.sleep(steady_s)
    if hold_restart:
        os.kill(serve_pid, signal.SIGSTOP)
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    detect = watch_live(base, t_kill, 0, 5.0, below=2)
    time.sleep(max(0.0, t_kill + WINDOW_S - time.monotonic()))
    os.kill(serve_pid, signal.SIGCONT)
    rejoin = watch_live(base, t_kill, 2, 60.0)
    t_back = time.monotonic()
    time.sleep(2.0)
    encoded_after = metrics(base).get(f'mmserve_encoder_num_encoded{{encoder="{victim}"}}', 0)
    steady = load.rate(t_kill - steady_s, t_kill)
    during = load.rate(t_kill, t_kill + WINDOW_S)
    return {"victim": victim, "restart_held": hold_restart, "steady_rps": steady, "kill_window_rps": during,
            "ratio": during / steady if steady else None, "detect_s": detect, "rejoin_s": rejoin,
            "rps_after_rejoin": load.rate(t_back, t_back + 2.0),
            "failed_in_steady": load.failures(t_kill - steady_s, t_kill),
            "failed_in_window": load.failures(t_kill, t_kill + WINDOW_S),
            "restarted_encoder_encoded": encoded_after if encoded_after < encoded_before
            else encoded_after - encoded_before}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deploy/demo_model/checkpoint")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--held-kills", type=int, default=1)
    ap.add_argument("--steady-s", type=float, default=5.0)
    ap.add_argument("--out", default="bench/results/encoder_kill.json")
    args = ap.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MMSERVE_LOG_LEVEL="WARNING")
    serve = subprocess.Popen([sys.executable, "-m", "frontend.cli", "serve", args.model,
                              "--encoders", "2", "--port", str(port)], env=env,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while metrics(base).get("mmserve_encoders_live") != 2:
            assert serve.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)
        with urllib.request.urlopen(base + "/v1/models") as r:
            name = json.load(r)["data"][0]["id"]
        load = Load(base, name, args.concurrency)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_until_complete, args=(load.run(),))
        thread.start()
        time.sleep(8.0)  # warm-up (first batches and allocations)
        runs = [one_kill(base, serve.pid, load, i % 2, args.steady_s, i >= args.kills)
                for i in range(args.kills + args.held_kills)]
        load.stop = True
        thread.join(60)
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "unknown")
    result = {"machine": {"cpu": cpu, "cores": os.cpu_count()},
              "model": args.model, "concurrency": args.concurrency, "window_s": WINDOW_S,
              "runs": runs, "max_detect_s": max(r["detect_s"] or float("inf") for r in runs)}
    print(f"{'held':>5} {'steady/s':>9} {'kill/s':>7} {'ratio':>6} {'detect':>7} {'failed':>6}")
    for r in runs:
        print(f"{r['restart_held']!s:>5} {r['steady_rps']:9.1f} {r['kill_window_rps']:7.1f} "
              f"{r['ratio'] or 0:6.2f} {r['detect_s'] or -1:7.3f} {r['failed_in_window']:6}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
