"""The fast path against the reference path on one checkpoint: greedy tokens and logprobs.

Runs the same prompts through mmserve's engine in this process: with
MMSERVE_KERNELS=reference (torch kernels, eager: the semantics) and once with the Triton kernels
and CUDA-graph decode (what serving runs on CUDA), both greedy with the top-k logprobs of every
step. Reports, per prompt, how many steps agree token for token, the largest logprob difference
over the agreeing steps (logits compared, not only tokens; logprobs are logits up to a per-row
constant), and at a divergence the reference's own top-2 gap there (a near-tie that bf16 rounding
may break either way). Exits 1 when an agreeing step differs by more than the tolerance, or a
divergence is not at a near-tie (gap > --tie) or picks a token outside the reference's top-k.
The tolerance is calibrated in the same run: the reference path batched against itself at
batch 1 (bf16 GEMMs of other shapes round differently), times --tol-factor.

    python bench/parity.py --model /dev/shm/mmserve_llama7b --out bench/results/parity.json
    python bench/parity.py --tiny --device cpu --steps 4   # smoke (both paths are torch on CPU)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import torch
from common import (
    build_checkpoint,
    checkpoint_stats,
    env_record,
    prompt_ids,
    resolve_device,
    write_json,
)

from llm_worker.config import LLMWorkerConfig
from llm_worker.engine import EngineCore
from protocol.messages import GenerateRequest, Sampling


def run_path(model: str, device: torch.device, dtype: str, kernels: str, prompts: list[list[int]],
             steps: int, k: int, sequential: bool = False
             ) -> tuple[dict[str, list[tuple[int, list[int], list[float]]]], dict]:
    """Greedy outputs with top-k logprobs through one kernel path; the engine is freed after.
    `sequential`: one prompt at a time (batch 1), else all decoded together."""
    os.environ["MMSERVE_KERNELS"] = kernels
    t0 = time.perf_counter()
    max_len = max(map(len, prompts)) + steps + 16
    core = EngineCore(LLMWorkerConfig(
        model=model, device=str(device), dtype=dtype, max_num_seqs=len(prompts),
        max_model_len=max_len, max_num_batched_tokens=max(2048, max_len),
        num_kv_blocks=len(prompts) * (-(-max_len // 16)) + 1, enable_prefix_caching=False))
    load_s = time.perf_counter() - t0
    got: dict[str, list[tuple[int, list[int], list[float]]]] = {f"p{i}": [] for i in range(len(prompts))}
    groups = [[i] for i in range(len(prompts))] if sequential else [list(range(len(prompts)))]
    for group in groups:
        for i in group:
            err = core.add_request(GenerateRequest(
                f"p{i}", prompts[i],
                Sampling(max_tokens=steps, temperature=0.0, ignore_eos=True, logprobs=k), [], ""))
            assert err is None, err
        done = 0
        while done < len(group):
            for o in core.step():
                for j, tok in enumerate(o.new_token_ids):
                    lp = o.logprobs[j]
                    got[o.request_id].append((tok, lp.token_ids, lp.logprobs))
                done += o.finish_reason is not None
    runner = core.executor.worker.runner
    info = {"kernels": kernels, "attention": type(runner.attn_backend).__name__, "load_s": load_s,
            "graph_steps": runner.graphs.num_replays if runner.graphs is not None else 0}
    core.shutdown()
    del core, runner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return got, info


def compare(ref: list, fast: list, tol: float, tie: float) -> dict:
    """One prompt: agreeing steps, max |d logprob| over them (every top-k id both report), and
    the divergence (if any): the reference's top-2 gap there and whether the other path's token
    is in the reference's top-k (a near-tie broken the other way, not a wrong distribution)."""
    agree, max_diff = 0, 0.0
    for (t_ref, ids_ref, lps_ref), (t_fast, ids_fast, lps_fast) in zip(ref, fast):
        fast_lp = dict(zip(ids_fast, lps_fast))
        diffs = [abs(a - fast_lp[i]) for i, a in zip(ids_ref, lps_ref) if i in fast_lp]
        max_diff = max([max_diff, *diffs])
        if t_ref != t_fast:
            top = sorted(lps_ref[1:], reverse=True)  # [0] is the chosen token, then the top-k
            gap = top[0] - top[1] if len(top) > 1 else float("inf")
            in_topk = t_fast in ids_ref[1:]
            return {"agree_steps": agree, "steps": len(ref), "max_abs_dlogprob": max_diff,
                    "diverged_at": agree, "ref_top2_gap": gap, "token_in_ref_topk": in_topk,
                    "ok": max_diff <= tol and gap <= tie and in_topk}
        agree += 1
    return {"agree_steps": agree, "steps": len(ref), "max_abs_dlogprob": max_diff,
            "diverged_at": None, "ok": max_diff <= tol}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: build one of --shape)")
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=8, help="prompts, decoded together")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--logprobs", type=int, default=5)
    ap.add_argument("--tol-factor", type=float, default=2.0,
                    help="agreeing steps may differ by this many times the reference's own noise "
                         "(its batched run against its batch-1 run: bf16 GEMMs of other shapes)")
    ap.add_argument("--tol-floor", type=float, default=0.02, help="tolerance floor (nats)")
    ap.add_argument("--tie", type=float, default=None,
                    help="a divergence needs a reference top-2 gap <= this (default 2 x tolerance: "
                         "two paths each off by the tolerance can swap such a pair)")
    ap.add_argument("--out", default="bench/results/parity.json")
    args = ap.parse_args()
    device = resolve_device(args.device)
    tmp = None
    if args.model is None:
        tmp = tempfile.TemporaryDirectory()
        args.model = str(build_checkpoint(tmp.name, "tiny" if args.tiny else args.shape, str(device)))
    st = checkpoint_stats(args.model)
    prompts = prompt_ids(args.batch, args.context, st["vocab_size"], seed=7)
    # Prompt lengths differ so prefill ends at different steps and decode batches get padded.
    prompts = [p[: args.context - 3 * i] for i, p in enumerate(prompts)]
    ref, ref_info = run_path(args.model, device, args.dtype, "reference", prompts, args.steps,
                             args.logprobs)
    # The reference against itself at batch 1: how far bf16 moves with nothing but GEMM shapes.
    solo, _ = run_path(args.model, device, args.dtype, "reference", prompts, args.steps,
                       args.logprobs, sequential=True)
    noise = [compare(ref[rid], solo[rid], float("inf"), float("inf")) for rid in ref]
    self_noise = max(r["max_abs_dlogprob"] for r in noise)
    tol = max(args.tol_factor * self_noise, args.tol_floor)
    tie = args.tie if args.tie is not None else 2 * tol
    fast, fast_info = run_path(args.model, device, args.dtype, "triton" if device.type == "cuda"
                               else "reference", prompts, args.steps, args.logprobs)
    rows = [dict(prompt=rid, **compare(ref[rid], fast[rid], tol, tie)) for rid in ref]
    res = {"env": env_record(device), "model": args.model, "args": vars(args), "dtype": args.dtype,
           "reference": ref_info, "fast": fast_info, "rows": rows, "tolerance": tol,
           "tie": tie, "reference_self_noise": self_noise, "reference_self_rows": noise,
           "ok": all(r["ok"] for r in rows)}
    write_json(args.out, res)
    print(f"\nparity {args.dtype}: {fast_info['attention']} + {fast_info['graph_steps']} graph steps "
          f"vs {ref_info['attention']}; reference batched vs batch-1 differs by up to "
          f"{self_noise:.4f} nats -> tolerance {tol:.4f}, tie {tie:.4f}")
    print("prompt  agree/steps  max|dlogprob|  diverged_at  ref_top2_gap  ok")
    for r in rows:
        print(f"{r['prompt']:>6}  {r['agree_steps']:>5}/{r['steps']:<5}  "
              f"{r['max_abs_dlogprob']:13.4f}  {str(r['diverged_at']):>11}  "
              f"{r.get('ref_top2_gap', float('nan')):12.4f}  {r['ok']}")
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
