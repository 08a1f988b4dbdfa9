"""Offline decode sweep through mmserve's engine: batch x context, greedy, ignore_eos, against
the roofline measured in the same process.

For each (batch, context) point, `batch` random prompts of `context` tokens are prefilled
(chunked, untimed for the decode figures), then `warmup + steps` pure decode steps run
back to back, each timed as the wall time between the returns of consecutive
`EngineCore.step()` calls (scheduler, input prep, forward, sampling and bookkeeping: what a
served step costs). The device is synchronized only before the first timed step and after the
last, so asynchronous scheduling (`--async-scheduling`, on by default on CUDA) overlaps the
host's share of each step with the device's, as it does when serving. Roofline of a step = (weight
bytes + K/V bytes the step must read) / device copy bandwidth measured at start-up. A separate
prefill point (default 64 x 128 tokens, one step) gives tokens/s and TFLOP/s.

    MMSERVE_KERNELS=triton python bench/decode.py --model DIR --out decode_triton.json
    python bench/decode.py --tiny --device cpu --batch 1 4 --context 16 40 --steps 4   # smoke
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import (
    build_checkpoint,
    checkpoint_stats,
    env_record,
    kernel_choice,
    measure_device,
    prefill_flops,
    print_prefill,
    print_skipped_row,
    prompt_ids,
    resolve_device,
    sync,
    write_json,
)

from llm_worker.config import LLMWorkerConfig
from llm_worker.engine import EngineCore
from protocol.messages import GenerateRequest, Sampling


def _add(core: EngineCore, ids: list[str], prompts: list[list[int]], max_tokens: int,
         eos: int) -> None:
    for rid, p in zip(ids, prompts):
        err = core.add_request(GenerateRequest(
            rid, p, Sampling(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), [eos], ""))
        if err:
            raise RuntimeError(f"{rid}: {err}")


def _step(core: EngineCore, device: torch.device) -> tuple[float, list]:
    sync(device)
    t0 = time.perf_counter()
    outs = core.step()
    sync(device)
    return time.perf_counter() - t0, outs


def decode_point(core: EngineCore, device: torch.device, st: dict, bw: float, batch: int,
                 ctx: int, steps: int, warmup: int, budget_tokens: int, eos: int) -> dict:
    prompts = prompt_ids(batch, ctx, st["vocab_size"], seed=1)
    ids = [f"b{batch}c{ctx}-{i}" for i in range(batch)]
    # Enough tokens that no sequence finishes while others still prefill or during timing.
    prefill_steps_max = math.ceil(batch * ctx / budget_tokens) + 2
    _add(core, ids, prompts, warmup + steps + prefill_steps_max + 4, eos)
    count = dict.fromkeys(ids, 0)
    prefill_s, prefill_steps = 0.0, 0
    while min(count.values()) == 0:
        dt, outs = _step(core, device)
        prefill_s += dt
        prefill_steps += 1
        for o in outs:
            count[o.request_id] += len(o.new_token_ids)
        if prefill_steps > 10 * prefill_steps_max:
            raise RuntimeError(f"prefill did not finish in {prefill_steps} steps")
    times, kv_bytes, short = [], [], 0
    first_tokens: list[int] = []
    replays0 = 0
    sync(device)
    last = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            replays0 = _replays(core)
        # Each sequence attends over prompt + outputs so far (the newest output is this input).
        kv = sum(ctx + count[r] for r in ids) * st["kv_bytes_per_token"]
        outs = core.step()
        if i == warmup + steps - 1:
            sync(device)
        now = time.perf_counter()
        dt, last = now - last, now
        if len(outs) != batch:
            short += 1  # a step that did not advance the whole batch: reported, not hidden
        for o in outs:
            count[o.request_id] += len(o.new_token_ids)
            if o.request_id == ids[0] and len(first_tokens) < 8:
                first_tokens.extend(o.new_token_ids)
        if i >= warmup:
            times.append(dt)
            kv_bytes.append(kv)
    core.abort(ids)
    core.step()
    med = statistics.median(times)
    kv_med = statistics.median(kv_bytes)
    roof_s = (st["weight_bytes_per_step"] + kv_med) / bw
    return {
        "batch": batch, "context": ctx, "steps": steps, "warmup": warmup,
        "ms_per_step": med * 1e3, "p10_ms": _pct(times, 10) * 1e3, "p90_ms": _pct(times, 90) * 1e3,
        "tok_s": batch / med, "roofline_ms": roof_s * 1e3, "pct_roofline": 100 * roof_s / med,
        "weight_bytes": st["weight_bytes_per_step"], "kv_bytes": kv_med,
        "achieved_GBps": (st["weight_bytes_per_step"] + kv_med) / med / 1e9,
        "steps_not_full_batch": short, "prefill_s": prefill_s, "prefill_steps": prefill_steps,
        "prefill_tok_s": batch * ctx / prefill_s, "row0_first_tokens": first_tokens,
        "graph_steps": _replays(core) - replays0 if steps else 0,
    }


def prefill_point(core: EngineCore, device: torch.device, st: dict, peak_tflops: float,
                  batch: int, length: int, reps: int, eos: int) -> dict:
    """`batch` prompts of `length` tokens, max_tokens=1: the time until every first token."""
    runs = []
    for rep in range(reps + 1):  # rep 0 warms up (compiles, allocator)
        prompts = prompt_ids(batch, length, st["vocab_size"], seed=100 + rep)
        ids = [f"pf{rep}-{i}" for i in range(batch)]
        _add(core, ids, prompts, 1, eos)
        done, total, n = set(), 0.0, 0
        while len(done) < batch:
            dt, outs = _step(core, device)
            total, n = total + dt, n + 1
            done.update(o.request_id for o in outs if o.new_token_ids)
            if n > 1000:
                raise RuntimeError("prefill point did not finish")
        core.step()  # flush finished requests
        if rep:
            runs.append((total, n))
    ms = statistics.median(t for t, _ in runs) * 1e3
    flops = prefill_flops(st, batch, length)
    return {"batch": batch, "length": length, "ms": ms, "steps": runs[0][1],
            "tok_s": batch * length / (ms * 1e-3), "TFLOPs": flops / (ms * 1e-3) / 1e12,
            "pct_matmul_peak": 100 * flops / (ms * 1e-3) / 1e12 / peak_tflops,
            "all_ms": [t * 1e3 for t, _ in runs]}


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q / 100))]


def _runner(core: EngineCore):
    """The in-process model runner; None under a multi-process executor (TP > 1)."""
    worker = getattr(core.executor, "worker", None)
    return None if worker is None else worker.runner


def _backend_name(core: EngineCore) -> str:
    runner = _runner(core)
    return type(runner.attn_backend).__name__ if runner else f"{core.executor.__class__.__name__}"


def _replays(core: EngineCore) -> int:
    """Decode steps served by a CUDA graph so far (0 when eager or out of process)."""
    graphs = getattr(_runner(core), "graphs", None)
    return graphs.num_replays if graphs is not None else 0


def print_table(res: dict) -> None:
    print(f"\nmmserve decode, MMSERVE_KERNELS={res['kernels']['MMSERVE_KERNELS']}, "
          f"attention {res['attention_backend']}, copy bw {res['ceilings']['copy_GBps']:.0f} GB/s")
    print(f"{'batch':>5} {'ctx':>5} {'ms/step':>9} {'tok/s':>9} {'roof ms':>8} {'%roof':>6} "
          f"{'GB/s':>7} {'prefill tok/s':>13}")
    for r in res["rows"]:
        if print_skipped_row(r):
            continue
        print(f"{r['batch']:>5} {r['context']:>5} {r['ms_per_step']:>9.2f} {r['tok_s']:>9.1f} "
              f"{r['roofline_ms']:>8.2f} {r['pct_roofline']:>5.0f}% {r['achieved_GBps']:>7.0f} "
              f"{r['prefill_tok_s']:>13.0f}")
    print_prefill(res.get("prefill"))


def plot(res: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for ctx in sorted({r["context"] for r in res["rows"]}):
        pts = [r for r in res["rows"] if r["context"] == ctx and r.get("ms_per_step")]
        if pts:
            a1.plot([r["batch"] for r in pts], [r["tok_s"] for r in pts], marker="o",
                    label=f"ctx {ctx}")
            a2.plot([r["batch"] for r in pts], [r["pct_roofline"] for r in pts], marker="o",
                    label=f"ctx {ctx}")
    for ax, y in ((a1, "output tok/s"), (a2, "% of roofline")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel(y)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"mmserve decode, MMSERVE_KERNELS={res['kernels']['MMSERVE_KERNELS']} — "
                 f"{res['env'].get('gpu', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: build one of --shape)")
    ap.add_argument("--shape", default="7b", help="shape to build when --model is absent")
    ap.add_argument("--tiny", action="store_true", help="tiny shape, small defaults (CPU smoke)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, nargs="+", help="default 1 8 32 64 (tiny: 1 4)")
    ap.add_argument("--context", type=int, nargs="+", help="default 128 700 2048 (tiny: 16 40)")
    ap.add_argument("--steps", type=int, help="timed decode steps per point (32; tiny 4)")
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps per point")
    ap.add_argument("--prefill-batch", type=int, help="default 64 (tiny 4)")
    ap.add_argument("--prefill-len", type=int, help="default 128 (tiny 16)")
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--async-scheduling", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="TP ranks, one GPU each (the mp executor's worker processes)")
    ap.add_argument("--executor", default="auto", help="auto, uni, mp, ray")
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="stop starting new points after this many seconds (JSON stays valid)")
    ap.add_argument("--out", default="bench/results/decode.json")
    ap.add_argument("--png", default=None, help="default: --out with .png")
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
    res: dict = {"env": env_record(device), "kernels": kernel_choice(device), "model": args.model,
                 "shape": {k: v for k, v in st.items() if k != "params"}, "params": st["params"],
                 "args": vars(args), "rows": [], "prefill": None}
    res["ceilings"] = measure_device(device)
    bw = res["ceilings"]["copy_GBps"] * 1e9
    out = Path(args.out)
    write_json(out, res)

    # One step must hold the whole prefill point (64 x 128 = 8192 tokens by default).
    budget_tokens = max(args.max_num_batched_tokens, args.prefill_batch * args.prefill_len)
    prefill_steps_max = math.ceil(max(args.batch) * max(args.context) / budget_tokens) + 2
    max_len = max(args.context) + args.warmup + args.steps + prefill_steps_max + 32
    t0 = time.perf_counter()
    core = EngineCore(LLMWorkerConfig(
        model=args.model, device=str(device), dtype="bfloat16",
        max_num_seqs=max(max(args.batch), args.prefill_batch), max_model_len=max_len,
        max_num_batched_tokens=budget_tokens, enable_prefix_caching=False,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_backend=args.attention_backend, kv_cache_memory_gb=1.0,
        enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
        executor=args.executor, async_scheduling=args.async_scheduling))
    res["engine_load_s"] = time.perf_counter() - t0
    res["attention_backend"] = _backend_name(core)
    res["async_scheduling"] = core.async_scheduling
    res["num_kv_blocks"] = core.kv.num_total_blocks
    graphs = getattr(_runner(core), "graphs", None)
    res["cuda_graph_sizes"] = graphs.sizes if graphs is not None else []
    res["max_num_batched_tokens"] = budget_tokens
    eos = 2
    print(f"engine ready in {res['engine_load_s']:.1f} s: {res['attention_backend']}, "
          f"{res['num_kv_blocks']} KV blocks, kernels {res['kernels']}", flush=True)

    # Cheapest points first, so a budget cut loses the most expensive ones.
    grid = sorted(((b, c) for c in args.context for b in args.batch), key=lambda p: p[0] * p[1])
    for b, c in grid:
        row: dict = {"batch": b, "context": c, "ms_per_step": None}
        if time.perf_counter() - t_start > args.budget_s:
            row["skipped"] = f"budget {args.budget_s:.0f} s spent"
        else:
            try:
                row = decode_point(core, device, st, bw, b, c, args.steps, args.warmup,
                                   budget_tokens, eos)
                print(f"batch {b:>3} ctx {c:>5}: {row['ms_per_step']:8.2f} ms/step "
                      f"{row['tok_s']:9.1f} tok/s {row['pct_roofline']:5.1f}% of roofline",
                      flush=True)
            except Exception as e:  # one failed point must not lose the others
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                print(f"batch {b} ctx {c}: {row['error']}", flush=True)
                _drain(core)
        res["rows"].append(row)
        write_json(out, res)
    res["rows"].sort(key=lambda r: (r["context"], r["batch"]))

    if time.perf_counter() - t_start > args.budget_s:
        res["prefill"] = {"skipped": "budget spent"}
    else:
        try:
            res["prefill"] = prefill_point(core, device, st, res["ceilings"]["matmul_TFLOPs"],
                                           args.prefill_batch, args.prefill_len,
                                           args.prefill_reps, eos)
        except Exception as e:
            res["prefill"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    res["ceilings_after"] = measure_device(device)
    res["wall_s"] = time.perf_counter() - t_start
    png = Path(args.png) if args.png else out.with_suffix(".png")
    res["png"] = plot(res, png)
    write_json(out, res)
    print_table(res)
    print(f"wrote {out}" + (f" and {png}" if res["png"] else " (no matplotlib: no PNG)"))
    core.shutdown()
    if tmp is not None:
        tmp.cleanup()


def _drain(core: EngineCore) -> None:
    """Abort whatever a failed point left behind so the next one starts clean."""
    try:
        core.abort(list(core.scheduler.requests))
        core.step()
    except Exception:
        pass


if __name__ == "__main__":
    main()
