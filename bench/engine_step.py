"""Engine step overhead with an (almost) empty model: a 1-layer, 32-wide Llama, so the time is the
scheduler, the runner's input preparation, sampling and bookkeeping, not the math.

    python bench/engine_step.py [--batch 1 8 32 64] [--out bench/results/engine_step.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from frontend.random_model import build_random_checkpoint
from llm_worker.config import LLMWorkerConfig
from llm_worker.engine import EngineCore
from protocol.messages import GenerateRequest, Sampling


def measure(core: EngineCore, batch: int, steps: int) -> dict:
    for i in range(batch):
        core.add_request(GenerateRequest(f"r{batch}-{i}", [1 + (i % 50)] * 20,
                                         Sampling(max_tokens=steps + 10, temperature=0.0,
                                                  ignore_eos=True), [2], ""))
    core.step()  # prefill
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - t0)
    core.abort([f"r{batch}-{i}" for i in range(batch)])
    core.step()
    times = times[steps // 5:]
    return {"batch": batch, "median_ms": statistics.median(times) * 1e3,
            "p90_ms": sorted(times)[int(len(times) * 0.9)] * 1e3,
            "per_seq_us": statistics.median(times) * 1e6 / batch}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/results/engine_step.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        build_random_checkpoint(d, num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1,
                                intermediate_size=32)
        core = EngineCore(LLMWorkerConfig(model=d, max_num_seqs=max(args.batch),
                                          device=args.device, max_model_len=1024))
        rows = [measure(core, b, args.steps) for b in args.batch]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    result = {"device": device, "model": "1-layer Llama, hidden 32, vocab 384", "rows": rows}
    print(f"{'batch':>6} {'median ms':>10} {'p90 ms':>8} {'us/seq':>8}")
    for r in rows:
        print(f"{r['batch']:>6} {r['median_ms']:>10.3f} {r['p90_ms']:>8.3f} {r['per_seq_us']:>8.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
