"""TTFT and TPOT of one image + 40 text tokens at low load, end to end over HTTP (issue 8 target:
TTFT <= 25 ms for one 336x336 image on one H200, LLaVA-1.5-7B shapes, bf16).

    python bench/ttft.py --device cuda --out $OUT/ttft.json     # builds ~14 GB in /dev/shm once
    python bench/ttft.py --tiny --device cpu --requests 3       # smoke, tiny LLaVA, ~20 s

1. Builds (or reuses, by a marker file) a random bf16 LLaVA-1.5-7B-shaped checkpoint: CLIP
   ViT-L/14-336 tower (576 image tokens), MLP projector, Llama-2-7B LM with the vocabulary cut to
   the 384-token offline BPE (frontend/random_model.py), ChatML template with image parts, CLIP
   processor config. `--model DIR` takes any LLaVA-1.5 folder instead.
2. Starts `mmserve serve` (its log next to the JSON) with `--allowed-local-media-path` on a folder
   of 336x336 JPEGs written up front, and waits for /health.
3. Sends streamed chat requests one at a time (low load; one keep-alive connection), temperature 0,
   `max_tokens` with ignore_eos, the image as a file:// URL. Variants, each after its own warm-up:
     image                   a fresh image per request + 40 text tokens (the target)
     text                    the same 40-token prompts without the image
     image_repeat            one image for every request: encoder store hit, and the KV blocks of
                             the image tokens are prefix-cache hits
     image_repeat_text_first one image again, after the text: encoder store hit only (the LM
                             prefills everything, as the blocks' hashes chain from the new text)
   Texts differ per request, so no variant reuses another request's prefix by accident.

TTFT = request sent -> first SSE chunk (the role chunk, which the server writes only once the
engine's first token is in); `first text` = first non-empty content (later when random weights
start with a partial UTF-8 byte, which the detokenizer holds back). TPOT = (last token's chunk -
first chunk) / (tokens - 1). Per variant: p50 / p90 / min / mean / max, prompt tokens, and the
deltas of the server's /metrics counters over the timed requests. Everything runs within
`--budget-s`; the server's process tree is always taken down (also on error, SIGTERM, or when this
process is killed: the server gets SIGTERM through PR_SET_PDEATHSIG).

--timeline: every process (this client too) records each request's events beside the JSON
(MMSERVE_TIMELINE, protocol/timeline.py); per variant, their median offsets and gaps
(bench/timeline_report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import timeline_report
from common import REPO, env_record, resolve_device, write_json
from llava_ckpt import MARKER, SHAPES, build_checkpoint, default_ckpt_dir
from mm_server import served

from protocol import timeline

VARIANTS = ("image", "text", "image_repeat", "image_repeat_text_first")
WORDS = ("the quick brown fox jumps over lazy dog a serving system answers requests hello world "
         "how are you today what is capital of france tokens blocks caches and schedulers "
         "continuous batching keeps accelerator busy numbers code text").split()
SETTLE_S = 0.6  # /metrics lags by up to one heartbeat (0.2 s) per role


# -- inputs ----------------------------------------------------------------------------------------

def write_jpegs(folder: Path, n: int, side: int, seed: int) -> list[Path]:
    """n distinct photo-like JPEGs (smooth colour fields + grain; pure noise would be a worst
    case for JPEG decoding that real pictures are not)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        img = np.asarray(low.resize((side, side), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:03d}.jpg"
        Image.fromarray(img).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def make_texts(model_dir: str, n: int, length: int, seed: int) -> list[str]:
    """n different texts of exactly `length` tokens of the checkpoint's tokenizer."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    count = lambda t: len(tok.encode(t, add_special_tokens=False))  # noqa: E731
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        words: list[str] = []
        while count(" ".join(words)) < length:
            words.append(rng.choice(WORDS))
        text = tok.decode(tok.encode(" ".join(words), add_special_tokens=False)[:length])
        if count(text) == length and text not in out:  # cutting may re-merge; then draw again
            out.append(text)
    return out


class Variant(NamedTuple):
    name: str
    warmup: list[list[dict]]  # message contents
    timed: list[list[dict]]


def file_part(kind: str, path: Path) -> dict:
    """A chat content part for a local file: ``kind`` "image_url" or "video_url"."""
    return {"type": kind, kind: {"url": "file://" + str(path)}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def expand(names: list[str], build: dict, warmup: int, n: int) -> list[Variant]:
    """Each variant's warm-up and timed contents: ``build[name](i)`` for request i."""
    return [Variant(v, [build[v](i) for i in range(warmup)],
                    [build[v](i) for i in range(warmup, warmup + n)]) for v in names]


def plan(names: list[str], images: list[Path], texts: list[str], warmup: int,
         n: int) -> list[Variant]:
    """Contents of every request; images[:warmup + n] are fresh ones, the last two repeated."""
    texts_left = iter(texts)
    img = lambda p: file_part("image_url", p)  # noqa: E731
    build = {
        "image": lambda i: [img(images[i]), text_part(next(texts_left))],
        "text": lambda i: [text_part(next(texts_left))],
        "image_repeat": lambda i: [img(images[-2]), text_part(next(texts_left))],
        "image_repeat_text_first": lambda i: [text_part(next(texts_left)), img(images[-1])],
    }
    return expand(names, build, warmup, n)


# -- server ----------------------------------------------------------------------------------------

# -- client ----------------------------------------------------------------------------------------

async def counters(session, base: str) -> dict[str, float]:
    """The raw mmserve_* counters of /metrics (untyped since the names lack _total; their
    typed mmserve: twins say the same), summed over labels."""
    async with session.get(base + "/metrics") as r:
        text = await r.text() if r.status == 200 else ""
    kinds = {ln.split()[2]: ln.split()[3] for ln in text.splitlines()
             if ln.startswith("# TYPE ") and len(ln.split()) >= 4}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        if name.startswith("mmserve_") and kinds.get(name) in ("counter", "untyped"):
            with contextlib.suppress(ValueError):
                out[name] = out.get(name, 0.0) + float(value)
    return out


async def one(session, url: str, body: bytes) -> dict:
    """One streamed request; times (perf_counter) of send, first chunk, first text, last token,
    and the request's id (from its chunks). The send and the first chunk also go to the
    timeline (monotonic_ns, the servers' clock), once the id is known."""
    first = text = finish = rid = None
    usage: dict = {}
    t0, sent_ns, first_ns = time.perf_counter(), time.monotonic_ns(), 0
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        if r.status != 200:
            return {"status": r.status, "error": (await r.text())[:300]}
        async for raw in r.content:
            now, now_ns = time.perf_counter(), time.monotonic_ns()
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                return {"status": "stream error", "error": str(chunk["error"])[:300]}
            usage = chunk.get("usage") or usage
            rid = rid or chunk.get("id")
            for c in chunk.get("choices") or []:
                if first is None:
                    first, first_ns = now, now_ns
                if text is None and (c.get("delta") or {}).get("content"):
                    text = now
                if c.get("finish_reason") is not None:
                    finish = now
    end = time.perf_counter()
    if first is None or finish is None:
        return {"status": "no tokens", "error": ""}
    timeline.mark("sent", rid, sent_ns)
    timeline.mark("first_chunk", rid, first_ns)
    tokens = usage.get("completion_tokens", 0)
    return {"status": 200, "id": rid, "ttft": first - t0,
            "first_text": None if text is None else text - t0,
            "tpot": (finish - first) / (tokens - 1) if tokens > 1 else None, "e2e": end - t0,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": tokens}


def stats(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs) * 1e3
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "min": float(a.min()), "mean": float(a.mean()), "max": float(a.max()), "n": len(xs)}


async def run_variant(session, base: str, model: str, v: Variant, max_tokens: int,
                      deadline: float) -> dict:
    url = base + "/v1/chat/completions"

    def body(content: list[dict]) -> bytes:  # serialised before the clock starts
        return json.dumps({"model": model, "messages": [{"role": "user", "content": content}],
                           "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
                           "stream": True, "stream_options": {"include_usage": True}}).encode()

    for content in v.warmup:
        res = await one(session, url, body(content))
        if res["status"] != 200:
            raise RuntimeError(f"{v.name} warm-up failed: {res['status']} {res['error']}")
    await asyncio.sleep(SETTLE_S)
    before = await counters(session, base)
    results = []
    for content in v.timed:
        if time.monotonic() > deadline:
            break
        results.append(await one(session, url, body(content)))
    await asyncio.sleep(SETTLE_S)
    after = await counters(session, base)
    ok = [r for r in results if r["status"] == 200]
    failed = [f"{r['status']} {r['error']}" for r in results if r["status"] != 200]
    return {
        "variant": v.name, "requests": len(results), "planned": len(v.timed),
        "completed": len(ok), "failures": failed[:5], "request_ids": [r["id"] for r in ok],
        "ttft_ms": stats([r["ttft"] for r in ok]),
        "first_text_ms": stats([r["first_text"] for r in ok if r["first_text"] is not None]),
        "tpot_ms": stats([r["tpot"] for r in ok if r["tpot"] is not None]),
        "e2e_ms": stats([r["e2e"] for r in ok]),
        "prompt_tokens": sorted({r["prompt_tokens"] for r in ok}),
        "completion_tokens": sorted({r["completion_tokens"] for r in ok}),
        "metrics_delta": {k: after[k] - before.get(k, 0.0) for k in sorted(after)
                          if after[k] != before.get(k, 0.0)},
    }


async def run_all(base: str, variants: list[Variant], max_tokens: int, deadline: float
                  ) -> tuple[str, list[dict]]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=60.0)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=1)) as session:
        async with session.get(base + "/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        rows = []
        for v in variants:
            if time.monotonic() > deadline:
                rows.append({"variant": v.name, "skipped": "budget spent"})
                continue
            rows.append(await run_variant(session, base, model, v, max_tokens, deadline))
            print_row(rows[-1])
    return model, rows


def print_header() -> None:
    print(f"{'variant':<24} {'done':>7} {'TTFT p50/p90/min ms':>21} {'first text p50':>14} "
          f"{'TPOT p50/p90 ms':>15} {'E2E p50':>8} {'prompt':>7}  counters", flush=True)


def print_row(r: dict) -> None:
    if "skipped" in r:
        print(f"{r['variant']:<24} skipped: {r['skipped']}", flush=True)
        return

    def f(s: dict, *keys: str) -> str:
        return "/".join(f"{s[k]:.1f}" for k in keys) if s.get("n") else "-"

    deltas = " ".join(f"{k.removeprefix('mmserve_')}+{v:g}" for k, v in r["metrics_delta"].items()
                      if "cache" in k or "encoded" in k)
    prompt = "/".join(map(str, r["prompt_tokens"])) or "-"
    print(f"{r['variant']:<24} {r['completed']:>3}/{r['planned']:<3} "
          f"{f(r['ttft_ms'], 'p50', 'p90', 'min'):>21} {f(r['first_text_ms'], 'p50'):>14} "
          f"{f(r['tpot_ms'], 'p50', 'p90'):>15} {f(r['e2e_ms'], 'p50'):>8} {prompt:>7}  "
          f"{deltas}", flush=True)
    d = r["metrics_delta"]
    n = d.get("mmserve_encoder_num_encoded", 0)
    steps = d.get("mmserve_num_steps", 0)
    if steps:  # the engine's clock: its steps per request and time in them
        print(f"    engine: {steps / max(r['completed'], 1):.1f} steps/request, "
              f"{1e3 * d.get('mmserve_step_seconds', 0.0) / steps:.2f} ms/step", flush=True)
    media = d.get("mmserve_frontend_media_seconds", 0.0)
    if media:  # the frontend's clock, per request: fetch + probe + hash, then the encoder wait
        done = max(r["completed"], 1)
        print(f"    frontend ms/request: media {1e3 * media / done:.1f}, encode wait "
              f"{1e3 * d.get('mmserve_frontend_encode_wait_seconds', 0.0) / done:.1f}",
              flush=True)
    if n:  # the encoder's own clock, per encoded item (its stage counters over the variant)
        print("    encoder ms/item: " + ", ".join(
            f"{stage} {1e3 * d.get(f'mmserve_encoder_{stage}_seconds', 0.0) / n:.1f}"
            for stage in ("decode", "queue", "tower", "item")), flush=True)


# -- main ------------------------------------------------------------------------------------------

SERVER_MODULES = ("zmq", "msgspec", "blake3", "aiohttp", "jinja2", "PIL", "tokenizers")


def check_imports(modules: tuple[str, ...] = SERVER_MODULES, script: str = "ttft.py") -> None:
    """The server needs these; say so in one line before building 14 GB."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"{script}: missing modules {missing} (carry their wheels; see bench/README.md)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="a LLaVA-1.5 checkpoint folder (default: build the random one)")
    ap.add_argument("--ckpt-dir", help="where to build/reuse it (default /dev/shm/mmserve_llava7b "
                                       "if tmpfs has room, else $TMPDIR; tiny: $TMPDIR)")
    ap.add_argument("--tiny", action="store_true", help="a tiny LLaVA (CPU smoke)")
    ap.add_argument("--shape", choices=SHAPES, help="the random checkpoint's shape (default "
                    "llava7b; tiny with --tiny; interfaces: the 7B's sizes between the roles, "
                    "one layer each, for CPU timelines)")
    ap.add_argument("--device", default="auto", help="auto, cuda, cpu (engine and encoder)")
    ap.add_argument("--dtype", default="auto", help="serve's --dtype (auto: bf16 on CUDA)")
    ap.add_argument("--requests", type=int, default=20, help="timed requests per variant")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up requests per variant")
    ap.add_argument("--prompt-tokens", type=int, default=40)
    ap.add_argument("--image-side", type=int, default=336, help="JPEG size (the processor "
                    "resizes it to the tower's)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--serve-args", default="", help="extra `mmserve serve` flags, one string")
    ap.add_argument("--ready-timeout-s", type=float, default=90.0,
                    help="model load + warm-up allowance before /health must be 200")
    ap.add_argument("--budget-s", type=float, default=140.0,
                    help="whole run; variants past it are cut short or skipped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeline", action="store_true", help="record each request's events in "
                    "every process and report the median time between them (see above)")
    ap.add_argument("--out", help="JSON path; the server log goes beside it (default: "
                                  "bench/results/ttft.json, with --tiny $TMPDIR/ttft_tiny.json)")
    args = ap.parse_args()
    t_start = time.monotonic()
    deadline = t_start + args.budget_s - 25.0  # leave time to stop the server and write JSON
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` => finally still runs
    check_imports()
    device = resolve_device(args.device)
    shape = args.shape or ("tiny" if args.tiny else "llava7b")

    t0 = time.monotonic()
    if args.model:
        model_dir, built = args.model, None
    else:
        ckpt = Path(args.ckpt_dir) if args.ckpt_dir else default_ckpt_dir(shape)
        reused = (ckpt / MARKER).is_file()
        model_dir = str(build_checkpoint(ckpt, shape, device, seed=args.seed))
        built = {"shape": shape, "spec": SHAPES[shape], "dir": model_dir,
                 "marker_found": reused, "seconds": round(time.monotonic() - t0, 1)}
        print(f"checkpoint {model_dir} ({'reused' if reused else 'built'}, "
              f"{built['seconds']} s)", flush=True)
    out = Path(args.out or (Path(tempfile.gettempdir()) / f"ttft_{shape}.json"
                            if shape != "llava7b" else REPO / "bench" / "results" / "ttft.json"))
    log_path = out.with_name(out.stem + "_server.log")
    out.parent.mkdir(parents=True, exist_ok=True)
    timeline_dir = out.with_name(out.stem + "_timeline")  # one .jsonl per process
    server_env: dict[str, str] = {}
    if args.timeline:
        shutil.rmtree(timeline_dir, ignore_errors=True)  # a previous run's events
        timeline.init("client", str(timeline_dir))
        server_env["MMSERVE_TIMELINE"] = str(timeline_dir)
    media = Path(tempfile.mkdtemp(prefix="mmserve_ttft_media_"))
    n_fresh = args.warmup + args.requests
    images = write_jpegs(media, n_fresh + 2, args.image_side, args.seed)
    texts = make_texts(model_dir, n_fresh * len(args.variants), args.prompt_tokens, args.seed)
    variants = plan(args.variants, images, texts, args.warmup, args.requests)
    serve_argv = ["--allowed-local-media-path", str(media), "--device", str(device),
                  "--encoder-device", str(device), "--dtype", args.dtype,
                  *shlex.split(args.serve_args)]
    report: dict = {
        "bench": "ttft", "env": env_record(device), "checkpoint": built or {"dir": model_dir},
        "config": vars(args),
        "images": {"format": "jpeg", "side": args.image_side, "url": "file://",
                   "mean_bytes": int(np.mean([p.stat().st_size for p in images]))},
        "server": {"argv": serve_argv, "log": str(log_path)},
        "definitions": {"ttft_ms": "request sent -> first SSE chunk (written with the first "
                                   "token)", "first_text_ms": "-> first non-empty content",
                        "tpot_ms": "(last token chunk - first chunk) / (tokens - 1)"},
    }
    ready_by = min(time.monotonic() + args.ready_timeout_s, deadline)
    try:
        with served(model_dir, serve_argv, log_path, ready_by, report, server_env) as base:
            print_header()
            model, rows = asyncio.run(run_all(base, variants, args.max_tokens, deadline))
            report["server"]["model"] = model
            report["results"] = rows
        if args.timeline:  # the server is down: every process has written all it will
            timeline_report.add(rows, timeline.load(timeline_dir))
            report["timeline_dir"] = str(timeline_dir)
    finally:
        shutil.rmtree(media, ignore_errors=True)
        summarize(report)
        report["wall_s"] = round(time.monotonic() - t_start, 1)
        write_json(out, report)
        print(f"wrote {out} and {log_path.name} ({report['wall_s']} s in all)", flush=True)


def summarize(report: dict) -> None:
    """The issue-8 number: TTFT p50 of the fresh-image variant against 25 ms; image tokens as
    the prompt-length difference to the text-only variant."""
    rows = {r["variant"]: r for r in report.get("results", []) if "ttft_ms" in r}
    img, txt = rows.get("image"), rows.get("text")
    s: dict = {"target_ttft_ms": 25.0}
    if img and img["ttft_ms"].get("n"):
        s.update(ttft_p50_ms=img["ttft_ms"]["p50"], ttft_p90_ms=img["ttft_ms"]["p90"],
                 tpot_p50_ms=img["tpot_ms"].get("p50"), met=img["ttft_ms"]["p50"] <= 25.0)
        print(f"image + {report['config']['prompt_tokens']} text tokens: TTFT p50 "
              f"{s['ttft_p50_ms']:.1f} ms (p90 {s['ttft_p90_ms']:.1f}; target 25: "
              f"{'met' if s['met'] else 'not met'}), TPOT p50 {s['tpot_p50_ms'] or 0:.2f} ms",
              flush=True)
    if img and txt and img["prompt_tokens"] and txt["prompt_tokens"]:
        s["image_tokens"] = img["prompt_tokens"][0] - txt["prompt_tokens"][0]
    report["summary"] = s


if __name__ == "__main__":
    main()
