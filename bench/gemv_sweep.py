"""Decode projections at few rows: cuBLAS (F.linear) against the Triton GEMV
(mmkernels/triton_gemv.py) over a grid of tile configs, at the Llama-2-7B shapes in bf16.

Per (rows, projection): µs and achieved GB/s (weight + x + y bytes / time) as % of the copy
bandwidth measured in this process, for cuBLAS, the GEMV's default config and its best config;
then the sum over one layer's four projections x 32 layers, the GEMM time of one decode step that
`profile_step.py` reports (3.59 ms for cuBLAS at batch 1 on the H200). Every config's output is
checked against cuBLAS first (bf16 tolerance). triton.testing.do_bench median, L2 flushed.

    python bench/gemv_sweep.py --out bench/results/gemv_sweep.json
    python bench/gemv_sweep.py --fused --out bench/results/gemv_fused.json
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F
from common import env_record, measure_device, write_json

# name -> (N, K) of the weight, Llama-2-7B (hidden 4096, intermediate 11008, 32 heads)
PROJECTIONS = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096),
               "down": (4096, 11008)}
LAYERS = 32
GRID = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
        for bn, bk, w, st in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4))]


def sweep_point(triton_gemv, do_bench, m: int, name: str, n: int, k: int, bw: float,
                gen: torch.Generator) -> dict:
    """cuBLAS and every GEMV config at one (rows, projection); configs checked before timing."""
    device = gen.device
    x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
    w = (0.02 * torch.randn(n, k, device=device, generator=gen)).to(torch.bfloat16)
    nbytes = (n * k + m * k + m * n) * 2
    want = F.linear(x, w)

    def timed(fn) -> dict:
        us = do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3
        return {"us": us, "pct_bw": 100 * nbytes / (us * 1e-6) / bw}

    row = {"rows": m, "proj": name, "N": n, "K": k, "bytes": nbytes,
           "cublas": timed(lambda: F.linear(x, w)), "configs": []}
    for cfg in [None, *GRID]:
        try:
            got = triton_gemv.gemv(x, w, config=cfg)
            err = (got.float() - want.float()).abs().max().item()
            ok = err <= 2e-2 * max(1.0, want.float().abs().max().item())
            t = timed(lambda cfg=cfg: triton_gemv.gemv(x, w, config=cfg)) if ok else {}
            row["configs"].append({"config": cfg or "default", "max_abs_diff": err, "ok": ok,
                                   **t})
        except Exception as e:  # a config Triton cannot build (shared memory, registers)
            row["configs"].append({"config": cfg, "error": f"{type(e).__name__}: {e}"[:200]})
    timed_cfgs = [c for c in row["configs"] if "us" in c]
    row["default"] = next((c for c in timed_cfgs if c["config"] == "default"), None)
    row["best"] = min(timed_cfgs, key=lambda c: c["us"], default=None)
    return row


# The fused sweep's smaller grid (each config is its own compile per prologue).
FUSED_GRID = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st)
              for bn, bk, st in itertools.product((32, 64), (128, 256, 512), (3, 4))]
# Each projection's fused op in a decoder layer: (triton_gemv function, its extra inputs).
FUSED = {"qkv": "norm_linear", "o": "residual", "gate_up": "norm_linear", "down": "silu_mul_linear"}


def fused_point(triton_gemv, triton_ops, do_bench, m: int, name: str, n: int, k: int, bw: float,
                gen: torch.Generator) -> dict:
    """One projection as a decoder layer runs it: the fused GEMV (norm prologue, SiLU prologue or
    residual epilogue; default and every grid config) against the plain GEMV and against the
    unfused pair of kernels it replaces. Outputs checked against the unfused pair first."""
    device = gen.device
    bf = torch.bfloat16
    w = (0.02 * torch.randn(n, k, device=device, generator=gen)).to(bf)
    x = torch.randn(m, 2 * k if name == "down" else k, device=device, generator=gen).to(bf)
    gain = (1 + 0.1 * torch.randn(k, device=device, generator=gen)).to(bf)
    res = torch.randn(m, n, device=device, generator=gen).to(bf)
    kind = FUSED[name]
    if kind == "norm_linear":
        def fused(cfg):
            return triton_gemv.norm_linear(x, gain, 1e-6, w, config=cfg)

        def unfused():
            return triton_gemv.gemv(triton_ops.rms_norm(x, gain, 1e-6), w)
    elif kind == "silu_mul_linear":
        def fused(cfg):
            return triton_gemv.silu_mul_linear(x, w, None, res, config=cfg)

        def unfused():
            return triton_gemv.gemv(triton_ops.silu_and_mul(x), w) + res
    else:
        def fused(cfg):
            return triton_gemv.gemv(x, w, config=cfg, residual=res)

        def unfused():
            return triton_gemv.gemv(x, w) + res
    plain_x = x[:, :k].contiguous()
    want = unfused().float()
    nbytes = (n * k + m * k + m * n) * 2

    def timed(fn) -> dict:
        us = do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3
        return {"us": us, "pct_bw": 100 * nbytes / (us * 1e-6) / bw}

    row = {"rows": m, "proj": name, "fused_op": kind, "N": n, "K": k,
           "plain_gemv": timed(lambda: triton_gemv.gemv(plain_x, w)), "unfused": timed(unfused),
           "configs": []}
    for cfg in [None, *FUSED_GRID]:
        try:
            err = (fused(cfg).float() - want).abs().max().item()
            ok = err <= 3e-2 * max(1.0, want.abs().max().item())
            t = timed(lambda cfg=cfg: fused(cfg)) if ok else {}
            row["configs"].append({"config": cfg or "default", "max_abs_diff": err, "ok": ok,
                                   **t})
        except Exception as e:
            row["configs"].append({"config": cfg, "error": f"{type(e).__name__}: {e}"[:200]})
    timed_cfgs = [c for c in row["configs"] if "us" in c]
    row["default"] = next((c for c in timed_cfgs if c["config"] == "default"), None)
    row["best"] = min(timed_cfgs, key=lambda c: c["us"], default=None)
    return row


def _line(row: dict) -> str:
    """One printed line per swept point (fused or plain)."""
    best, dflt = row["best"], row["default"]
    m, name = row["rows"], row["proj"]
    us = lambda c: c["us"] if c else float("nan")  # noqa: E731
    if "fused_op" in row:
        return (f"M={m:2d} {name:8s} {row['fused_op']:16s} plain gemv "
                f"{row['plain_gemv']['us']:6.1f} us  unfused {row['unfused']['us']:6.1f} us  "
                f"fused default {us(dflt):6.1f} us  best {us(best):6.1f} us "
                f"{best['config'] if best else ''}")
    if best is None:
        return f"M={m} {name}: no config ran"
    return (f"M={m:2d} {name:8s} [{row['N']}x{row['K']}]  cublas {row['cublas']['us']:7.1f} us "
            f"({row['cublas']['pct_bw']:3.0f}%)  gemv default {us(dflt):7.1f} us  best "
            f"{best['us']:7.1f} us ({best['pct_bw']:3.0f}%) {best['config']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--budget-s", type=float, default=150)
    ap.add_argument("--fused", action="store_true",
                    help="time each projection's fused op (mmkernels.triton_gemv prologues and "
                         "epilogue) against the plain GEMV and the unfused kernels instead")
    ap.add_argument("--out", default="bench/results/gemv_sweep.json")
    args = ap.parse_args()
    from triton.testing import do_bench

    from mmkernels import triton_gemv, triton_ops

    t_start = time.perf_counter()
    device = torch.device("cuda")
    res = {"env": env_record(device), "ceilings": measure_device(device), "args": vars(args),
           "rows": []}
    bw = res["ceilings"]["copy_GBps"] * 1e9
    gen = torch.Generator(device=device).manual_seed(0)
    for m, (name, (n, k)) in itertools.product(args.rows, PROJECTIONS.items()):
        if time.perf_counter() - t_start > args.budget_s:
            print("budget spent: stopping")
            break
        if args.fused:
            row = fused_point(triton_gemv, triton_ops, do_bench, m, name, n, k, bw, gen)
        else:
            row = sweep_point(triton_gemv, do_bench, m, name, n, k, bw, gen)
        res["rows"].append(row)
        write_json(args.out, res)
        print(_line(row))
    for m in args.rows:
        rows = [r for r in res["rows"] if r["rows"] == m and r["best"]]
        if len(rows) == len(PROJECTIONS) and args.fused:
            step = {key: LAYERS * sum(r[key]["us"] for r in rows) / 1e3
                    for key in ("plain_gemv", "unfused", "default", "best")}
            res.setdefault("per_step_ms", {})[m] = step
            print(f"M={m}: one decode step's projections x {LAYERS} layers: plain GEMVs "
                  f"{step['plain_gemv']:.2f} ms, unfused ops {step['unfused']:.2f}, fused "
                  f"default {step['default']:.2f}, fused best {step['best']:.2f}")
        elif len(rows) == len(PROJECTIONS):
            step = {key: LAYERS * sum(r[key]["us"] for r in rows) / 1e3
                    for key in ("cublas", "best")}
            res.setdefault("per_step_ms", {})[m] = step
            print(f"M={m}: GEMMs of one decode step (4 projections x {LAYERS} layers): cuBLAS "
                  f"{step['cublas']:.2f} ms, GEMV best configs {step['best']:.2f} ms")
    write_json(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
