"""The peer: the same checkpoint, prompts and shapes as bench/decode.py through transformers'
`generate` (greedy, min_new_tokens = max_new_tokens so every row runs the full length).

Modes:
- eager: the default dynamic cache, no compile (what `model.generate` does out of the box).
- static: `cache_implementation="static"`, which makes generate compile the decode forward
  (its CompileConfig: inductor, mode="reduce-overhead", i.e. CUDA graphs). The first call per
  shape compiles; it runs under --compile-budget-s (SIGALRM) and a shape whose compile overruns
  is recorded as skipped, as are the shapes after it.

Each step is timed by a streamer: generate hands it every new token on the host (a sync), so
the gaps between consecutive puts are decode steps; the first gap after the prompt is prefill.
The median gap is reported, and the mean over the run as a cross-check.

    python bench/peer_hf.py --model DIR --mode eager --out peer_eager.json
    python bench/peer_hf.py --tiny --device cpu --mode eager static   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import (
    build_checkpoint,
    checkpoint_stats,
    env_record,
    measure_device,
    prefill_flops,
    print_prefill,
    print_skipped_row,
    prompt_ids,
    resolve_device,
    sync,
    write_json,
)


class StepTimer:
    """A generate streamer that only records when each put arrives (host clock)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


class CompileTimeout(BaseException):
    """BaseException, like KeyboardInterrupt: compile code paths swallow plain Exceptions."""


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise CompileTimeout in the main thread after `seconds`, then every second until it gets
    through (0: no limit)."""
    if seconds <= 0:
        yield
        return

    def fire(signum, frame):
        raise CompileTimeout(f"over {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def generate_timed(model, ids: torch.Tensor, n: int, mode: str, device: torch.device,
                   compile_config=None) -> dict:
    timer = StepTimer()
    kwargs = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, streamer=timer,
                  attention_mask=torch.ones_like(ids), pad_token_id=model.config.pad_token_id,
                  temperature=None, top_p=None, top_k=None)
    if mode == "static":
        kwargs["cache_implementation"] = "static"
        if compile_config is not None:
            kwargs["compile_config"] = compile_config
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, **kwargs)
    sync(device)
    t1 = time.perf_counter()
    new = out.shape[1] - ids.shape[1]
    stamps = timer.stamps  # [prompt, token 1, ..., token n]
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return {"total_s": t1 - t0, "new_tokens": new, "prefill_s": stamps[1] - t0 if len(stamps) > 1
            else None, "gaps": gaps,
            "mean_gap_s": (t1 - stamps[1]) / (new - 1) if len(stamps) > 1 and new > 1 else None,
            "row0_first_tokens": out[0, ids.shape[1]: ids.shape[1] + 8].tolist()}


def peer_point(model, mode: str, device: torch.device, st: dict, bw: float, batch: int,
               ctx: int, steps: int, compile_budget_s: float, compile_config=None) -> dict:
    ids = torch.tensor(prompt_ids(batch, ctx, st["vocab_size"], seed=1), device=device)
    n = steps + 1  # the first token comes from prefill
    t0 = time.perf_counter()
    if mode == "static":
        # Same max_new_tokens as the timed call: same cache length, so no recompile.
        with alarm(compile_budget_s):
            generate_timed(model, ids, n, mode, device, compile_config)
    else:
        generate_timed(model, ids, 4, mode, device)
    warm_s = time.perf_counter() - t0
    r = generate_timed(model, ids, n, mode, device, compile_config)
    if r["new_tokens"] != n:
        raise RuntimeError(f"generated {r['new_tokens']} tokens, expected {n}")
    med = statistics.median(r["gaps"])
    # Mean context over the timed steps: prompt + tokens already generated.
    kv = batch * (ctx + 1 + (n - 1) / 2) * st["kv_bytes_per_token"]
    roof_s = (st["weight_bytes_per_step"] + kv) / bw
    return {"batch": batch, "context": ctx, "steps": len(r["gaps"]), "ms_per_step": med * 1e3,
            "mean_ms_per_step": r["mean_gap_s"] * 1e3, "p90_ms": sorted(r["gaps"])[
                int(len(r["gaps"]) * 0.9)] * 1e3, "tok_s": batch / med,
            "roofline_ms": roof_s * 1e3, "pct_roofline": 100 * roof_s / med,
            "prefill_s": r["prefill_s"], "prefill_tok_s": batch * ctx / r["prefill_s"],
            "warm_s": warm_s, "total_s": r["total_s"],
            # generate compiled its decode forward (only static mode on CUDA, or when forced)
            "compiled": hasattr(model, "_compiled_call"),
            "row0_first_tokens": r["row0_first_tokens"]}


def prefill_point(model, mode: str, device: torch.device, st: dict, peak: float, batch: int,
                  length: int, reps: int) -> dict:
    """generate(max_new_tokens=1): prefill plus one sample, what a first token costs."""
    runs = []
    for rep in range(reps + 1):
        ids = torch.tensor(prompt_ids(batch, length, st["vocab_size"], seed=100 + rep),
                           device=device)
        r = generate_timed(model, ids, 1, "eager", device)  # one token: nothing to compile
        if rep:
            runs.append(r["total_s"])
    ms = statistics.median(runs) * 1e3
    flops = prefill_flops(st, batch, length)
    return {"batch": batch, "length": length, "ms": ms, "tok_s": batch * length / (ms * 1e-3),
            "TFLOPs": flops / (ms * 1e-3) / 1e12,
            "pct_matmul_peak": 100 * flops / (ms * 1e-3) / 1e12 / peak,
            "all_ms": [t * 1e3 for t in runs]}


def load_model(path: str, device: torch.device, dtype: torch.dtype):
    import transformers

    kw = dict(dtype=dtype, attn_implementation="sdpa")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map=str(device),
                                                                  **kw)
    except (ImportError, ValueError, TypeError):  # no accelerate, or an older signature
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw).to(device)
    return model.eval()


def print_table(res: dict) -> None:
    print(f"\ntransformers {res['env']['transformers']} generate, mode {res['mode']}, "
          f"copy bw {res['ceilings']['copy_GBps']:.0f} GB/s")
    print(f"{'batch':>5} {'ctx':>5} {'ms/step':>9} {'mean ms':>8} {'tok/s':>9} {'%roof':>6} "
          f"{'warm s':>7} {'prefill tok/s':>13}")
    for r in res["rows"]:
        if print_skipped_row(r):
            continue
        print(f"{r['batch']:>5} {r['context']:>5} {r['ms_per_step']:>9.2f} "
              f"{r['mean_ms_per_step']:>8.2f} {r['tok_s']:>9.1f} {r['pct_roofline']:>5.0f}% "
              f"{r['warm_s']:>7.1f} {r['prefill_tok_s']:>13.0f}")
    print_prefill(res.get("prefill"))


def run_mode(model, mode: str, args, device: torch.device, st: dict, ceilings: dict,
             env: dict, t_start: float) -> dict:
    res = {"env": env, "mode": mode, "model": args.model, "args": vars(args),
           "ceilings": ceilings, "rows": [], "prefill": None}
    out = Path(args.out.replace("{mode}", mode))
    bw = ceilings["copy_GBps"] * 1e9
    batches = args.static_batch if mode == "static" and args.static_batch else args.batch
    contexts = args.static_context if mode == "static" and args.static_context else args.context
    grid = sorted(((b, c) for c in contexts for b in batches), key=lambda p: p[0] * p[1])
    compile_config = None
    if mode == "static" and args.compile_all_devices:
        from transformers import CompileConfig

        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # smoke-test the compile path on CPU
    stop = None
    for b, c in grid:
        row: dict = {"batch": b, "context": c, "ms_per_step": None}
        if stop:
            row["skipped"] = stop
        elif time.perf_counter() - t_start > args.budget_s:
            row["skipped"] = f"budget {args.budget_s:.0f} s spent"
        else:
            try:
                # The compile may not outlive the run's own budget either.
                left = args.budget_s - (time.perf_counter() - t_start) - 15
                row = peer_point(model, mode, device, st, bw, b, c, args.steps,
                                 max(5.0, min(args.compile_budget_s, left)), compile_config)
                print(f"{mode} batch {b:>3} ctx {c:>5}: {row['ms_per_step']:8.2f} ms/step "
                      f"{row['tok_s']:9.1f} tok/s (warm-up {row['warm_s']:.1f} s)", flush=True)
            except CompileTimeout as e:
                stop = f"compile exceeded the budget ({e}) at batch {b} ctx {c}"
                row["skipped"] = stop
                print(stop, flush=True)
                _reset_compile()
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                print(f"{mode} batch {b} ctx {c}: {row['error']}", flush=True)
        res["rows"].append(row)
        write_json(out, res)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["rows"].sort(key=lambda r: (r["context"], r["batch"]))
    if mode == "eager" and time.perf_counter() - t_start <= args.budget_s:
        try:
            res["prefill"] = prefill_point(model, mode, device, st, ceilings["matmul_TFLOPs"],
                                           args.prefill_batch, args.prefill_len,
                                           args.prefill_reps)
        except Exception as e:
            res["prefill"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    write_json(out, res)
    print_table(res)
    print(f"wrote {out}")
    return res


def _reset_compile() -> None:
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: build one of --shape)")
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--tiny", action="store_true", help="tiny shape, small defaults (CPU smoke)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--mode", nargs="+", choices=["eager", "static"], default=["eager"])
    ap.add_argument("--batch", type=int, nargs="+", help="default 1 8 32 64 (tiny: 1 4)")
    ap.add_argument("--context", type=int, nargs="+", help="default 128 700 2048 (tiny: 16 40)")
    ap.add_argument("--static-batch", type=int, nargs="+", help="static mode only (default: "
                    "--batch)")
    ap.add_argument("--static-context", type=int, nargs="+", help="static mode only")
    ap.add_argument("--steps", type=int, help="timed decode steps per point (32; tiny 4)")
    ap.add_argument("--prefill-batch", type=int, help="default 64 (tiny 4)")
    ap.add_argument("--prefill-len", type=int, help="default 128 (tiny 16)")
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--compile-budget-s", type=float, default=240,
                    help="static: give up when one shape's compile + first run takes longer")
    ap.add_argument("--compile-all-devices", action="store_true",
                    help="static: compile on CPU too (generate compiles on CUDA only)")
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="stop starting new points after this many seconds")
    ap.add_argument("--out", default="bench/results/peer_{mode}.json",
                    help="{mode} is replaced by the mode")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.tiny:
        args.shape = "tiny"
    for k, full, tiny in (("batch", [1, 8, 32, 64], [1, 4]), ("context", [128, 700, 2048], [16, 40]),
                          ("steps", 32, 4), ("prefill_batch", 64, 4), ("prefill_len", 128, 16)):
        if getattr(args, k) is None:
            setattr(args, k, tiny if args.tiny else full)
    device = resolve_device(args.device)
    tmp = None
    if args.model is None:
        tmp = tempfile.TemporaryDirectory()
        args.model = str(build_checkpoint(tmp.name, args.shape, str(device)))
    st = checkpoint_stats(args.model)
    env = env_record(device)
    ceilings = measure_device(device)
    t0 = time.perf_counter()
    model = load_model(args.model, device, getattr(torch, args.dtype))
    print(f"transformers model loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    for mode in args.mode:
        run_mode(model, mode, args, device, st, ceilings, env, t_start)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
