"""Where one decode step's time goes: host stages, the GPU's share, and the kernels behind it.

For each batch size, a decode batch of `--context`-token prompts runs through mmserve's engine
(Triton kernels, CUDA-graph decode) and this prints:
- the served step (`EngineCore.step()` back to back, wall time over the run / steps, as
  served: with asynchronous scheduling the host's work overlaps the device's), split into host
  stages timed around the engine's own methods: schedule, input prep + upload, graph replay
  (launch), sampling (launch), the wait for the sampled ids (the step's one host sync: with
  asynchronous scheduling, for the previous step's), scheduler update;
- the GPU time of the captured graph alone (back-to-back replays, CUDA events), so
  host overhead = step - GPU time (what the overlap leaves), and the roofline of the step;
- the kernels of one eager step (torch.profiler, CUDA time per kernel family), which show what
  bounds the GPU time (the GEMMs' bandwidth, attention, the small ops).

For each `--prefill` length, one prompt of that many tokens is prefilled alone (the step an
image request's TTFT waits on): the step's wall time through the mixed-step graph and eagerly,
and the eager step's CUDA time by kernel family (so eager step - CUDA time = what the Python
launches add).

    python bench/profile_step.py --model /dev/shm/mmserve_llama7b --batch 1 8 64 --out prof.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from common import checkpoint_stats, env_record, measure_device, prompt_ids, sync, write_json

from llm_worker.config import LLMWorkerConfig
from llm_worker.engine import EngineCore
from protocol.messages import GenerateRequest, Sampling


class StageTimer:
    """Wraps bound methods so each call adds its wall time to a named bucket."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.totals[name] += time.perf_counter() - t0

        setattr(obj, attr, timed)


def _family(kernel: str) -> str:
    k = kernel.lower()
    for key, fam in (("rope_write_kv", "rope+write_kv"),
                     ("paged_attention", "attention"), ("reduce_splits", "attention"),
                     ("rms_norm", "rms_norm"), ("rope", "rope"), ("silu", "silu_and_mul"),
                     ("write_kv", "write_kv"), ("gemm", "gemm"), ("gemv", "gemm"),
                     ("cutlass", "gemm"), ("sm90", "gemm"), ("nvjet", "gemm"),
                     ("splitk", "gemm"), ("argmax", "sampling"), ("copy", "copy"),
                     ("elementwise", "elementwise")):
        if key in k:
            return fam
    return "other"


def profile_point(core: EngineCore, st: dict, bw: float, batch: int, ctx: int,
                  steps: int) -> dict:
    runner = core.executor.worker.runner
    prompts = prompt_ids(batch, ctx, st["vocab_size"], seed=3)
    ids = [f"p{batch}-{i}" for i in range(batch)]
    for rid, p in zip(ids, prompts):
        core.add_request(GenerateRequest(
            rid, p, Sampling(max_tokens=steps * 3 + 16, temperature=0.0, ignore_eos=True), [2], ""))
    while any(len(core.scheduler.requests[r].output_token_ids) == 0 for r in ids):
        core.step()
    for _ in range(3):
        core.step()
    timer = StageTimer()
    timer.wrap(core.scheduler, "schedule", "schedule")
    timer.wrap(core.scheduler, "update_from_output", "update")
    timer.wrap(runner.inputs, "prepare", "prepare")
    timer.wrap(runner.inputs, "upload", "upload")
    timer.wrap(runner, "_sample", "sample (launch)")
    timer.wrap(runner, "_land", "wait for ids")
    if runner.graphs is not None:
        timer.wrap(runner.graphs, "replay", "graph launch")
    # Back to back, synchronized only around the run: with asynchronous scheduling a step's
    # host work overlaps the previous step's device work, as when serving.
    sync(core.executor.worker.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        core.step()
    sync(core.executor.worker.device)
    step_ms = (time.perf_counter() - t0) / steps * 1e3
    stages = {k: v / steps * 1e3 for k, v in timer.totals.items()}
    for obj, attr in ((core.scheduler, "schedule"), (core.scheduler, "update_from_output"),
                      (runner.inputs, "prepare"), (runner.inputs, "upload"), (runner, "_sample"),
                      (runner, "_land")):
        delattr(obj, attr)  # back to the class methods
    gpu_ms = None
    size = None
    if runner.graphs is not None:
        delattr(runner.graphs, "replay")
        size = runner.graphs.last  # (batch size, split-KV count) of the latest step
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            runner.graphs.graphs[size].replay()  # the same buffers: the last step's inputs
        end.record()
        torch.cuda.synchronize()
        gpu_ms = start.elapsed_time(end) / steps
    kernels = _eager_kernels(core, runner)
    launches = kernels.pop("launches")
    core.abort(ids)
    core.step()
    kv = batch * (ctx + steps) * st["kv_bytes_per_token"]
    roof_ms = (st["weight_bytes_per_step"] + kv) / bw * 1e3
    return {"batch": batch, "context": ctx, "graph_size": size, "step_ms": step_ms,
            "gpu_ms": gpu_ms, "host_overhead_ms": step_ms - gpu_ms if gpu_ms else None,
            "roofline_ms": roof_ms, "stages_ms": stages, "eager_kernels_ms": kernels,
            "eager_launches": launches}


def profile_prefill(core: EngineCore, st: dict, tokens: int, reps: int = 5) -> dict:
    """One `tokens`-token prompt prefilled alone, through the mixed graph (where one holds it)
    and eagerly: median step wall time of each, and the eager step's kernels."""
    runner = core.executor.worker.runner
    prompts = iter(prompt_ids(4 * reps + 4, tokens, st["vocab_size"], seed=11))
    device = core.executor.worker.device

    def prefill_ms() -> float:
        rid = f"prefill{tokens}-{id(object())}"
        core.add_request(GenerateRequest(
            rid, next(prompts), Sampling(max_tokens=1, temperature=0.0, ignore_eos=True), [2], ""))
        sync(device)
        t0 = time.perf_counter()
        core.step()  # the whole prompt in one step (max_num_batched_tokens >= tokens)
        sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        while rid in core.scheduler.requests:
            core.step()
        return ms

    mixed = runner.mixed
    replays = mixed.num_replays if mixed is not None else 0
    prefill_ms()  # settles the shape
    graph = statistics.median(prefill_ms() for _ in range(reps))
    used_graph = mixed is not None and mixed.num_replays > replays
    runner.mixed = None
    try:
        prefill_ms()
        eager = statistics.median(prefill_ms() for _ in range(reps))
        rid = f"prefill{tokens}-profiled"
        core.add_request(GenerateRequest(
            rid, next(prompts), Sampling(max_tokens=1, temperature=0.0, ignore_eos=True), [2], ""))
        kernels = _profiled_kernels(core.step)
        launches = kernels.pop("launches")
        while rid in core.scheduler.requests:
            core.step()
    finally:
        runner.mixed = mixed
    return {"tokens": tokens, "graph_step_ms": graph if used_graph else None,
            "eager_step_ms": eager, "eager_cuda_ms": sum(kernels.values()),
            "eager_kernels_ms": kernels, "eager_launches": launches}


def _profiled_kernels(step) -> dict[str, float]:
    """CUDA time per kernel family of one call of `step`, and under "launches" the number of
    kernels it ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    fam: dict[str, float] = defaultdict(float)
    launches = 0
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.key and not ev.key.startswith(("cudaLaunch", "cuLaunch", "ProfilerStep")):
            fam[_family(ev.key)] += t / 1e3
            launches += ev.count
    return {**dict(sorted(fam.items(), key=lambda kv: -kv[1])), "launches": launches}


def _eager_kernels(core: EngineCore, runner) -> dict[str, float]:
    """CUDA time per kernel family of one eager decode step (graphs off for this one step)."""
    graphs, mixed, runner.graphs, runner.mixed = runner.graphs, runner.mixed, None, None
    try:
        core.step()  # any lazily compiled eager shape compiles outside the profile
        return _profiled_kernels(core.step)
    finally:
        runner.graphs, runner.mixed = graphs, mixed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prefill", type=int, nargs="*", default=[632],
                    help="prompt lengths prefilled alone (632: one LLaVA image + 56 text tokens)")
    ap.add_argument("--out", default="bench/results/profile_step.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    st = checkpoint_stats(args.model)
    res = {"env": env_record(device), "ceilings": measure_device(device), "args": vars(args),
           "rows": []}
    bw = res["ceilings"]["copy_GBps"] * 1e9
    read = res["ceilings"]["read_GBps"] * 1e9
    print(f"copy {bw / 1e9:.0f} GB/s, read-only {read / 1e9:.0f} GB/s: the weights alone take "
          f"{st['weight_bytes_per_step'] / bw * 1e3:.2f} ms at copy and "
          f"{st['weight_bytes_per_step'] / read * 1e3:.2f} ms at read bandwidth")
    core = EngineCore(LLMWorkerConfig(
        model=args.model, device="cuda", dtype="bfloat16", max_num_seqs=max(args.batch),
        max_model_len=max(args.context + 4 * args.steps + 64, max(args.prefill, default=0) + 8),
        max_num_batched_tokens=8192,
        enable_prefix_caching=False, gpu_memory_utilization=0.9))
    for b in args.batch:
        row = profile_point(core, st, bw, b, args.context, args.steps)
        res["rows"].append(row)
        write_json(args.out, res)
        print(f"\nbatch {b} ctx {args.context} (graph size, splits {row['graph_size']}): step "
              f"{row['step_ms']:.2f} ms, GPU {row['gpu_ms'] or 0:.2f} ms, host overhead "
              f"{row['host_overhead_ms'] or 0:.2f} ms, roofline {row['roofline_ms']:.2f} ms")
        print("  host stages (ms/step): " + ", ".join(
            f"{k} {v:.3f}" for k, v in row["stages_ms"].items()))
        print(f"  eager step, {row['eager_launches']} kernels, CUDA ms by family: " + ", ".join(
            f"{k} {v:.2f}" for k, v in row["eager_kernels_ms"].items()))
    res["prefill"] = []
    for n in args.prefill:
        row = profile_prefill(core, st, n)
        res["prefill"].append(row)
        write_json(args.out, res)
        graph = f"{row['graph_step_ms']:.2f} ms" if row["graph_step_ms"] else "no graph"
        print(f"\nprefill {n} tokens alone: mixed graph {graph}, eager {row['eager_step_ms']:.2f} ms "
              f"(its CUDA time {row['eager_cuda_ms']:.2f} ms: " + ", ".join(
                  f"{k} {v:.2f}" for k, v in row["eager_kernels_ms"].items()) + ")")
    core.shutdown()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
