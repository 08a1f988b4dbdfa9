"""Each decoder hot-path kernel: the torch reference (mmkernels.reference) vs its Triton kernel,
at Llama-2-7B shapes in bf16, and torch SDPA (flash over a contiguous copy of the same K/V) as
the bound to beat for attention.

Per case: max abs / relative difference of the Triton output from the reference on the same
random inputs; time (triton.testing.do_bench median on CUDA, which flushes L2 between runs);
achieved GB/s = bytes a single pass must move / time, as % of the copy bandwidth measured in
this process; TFLOP/s for attention prefill. A Triton module that is missing or fails is
recorded and skipped.

    python bench/kernels.py --out bench/results/kernels.json
    TRITON_INTERPRET=1 python bench/kernels.py --tiny --device cpu   # smoke (interpreter)
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from common import env_record, measure_device, resolve_device, time_ms, write_json

import mmkernels
from mmkernels import reference

DT = torch.bfloat16
SHAPE_7B = dict(hidden=4096, inter=11008, heads=32, kv_heads=32, head_dim=128,
                tokens=[64, 16384],
                decode=[(1, 1024), (1, 4096), (8, 2048), (32, 1024), (64, 1024), (64, 2048)],
                prefill=[(1, 632, 632), (1, 2048, 2048), (4, 1024, 1024), (8, 512, 2048)])
SHAPE_TINY = dict(hidden=64, inter=128, heads=4, kv_heads=2, head_dim=16, tokens=[4, 64],
                  decode=[(1, 40), (4, 100)], prefill=[(2, 32, 32), (2, 8, 40)])


class Case(NamedTuple):
    op: str
    name: str
    run: Callable[[Callable], object]  # calls an implementation on this case's inputs
    fresh: Callable[[], Callable[[Callable], object]]  # a run over fresh copies (in-place ops)
    bytes: float
    flops: float
    sdpa: Callable[[], object] | None


def _meta(q_lens: list[int], seq_lens: list[int], block_tables: torch.Tensor, device):
    """Every field of llm_worker.attention.AttentionMetadata: host lists for the reference,
    device tensors for the Triton kernel."""
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    return SimpleNamespace(
        slot_mapping=torch.zeros(qsl[-1], dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables, query_start_loc_cpu=qsl, seq_lens_cpu=list(seq_lens),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens))


def _paged_cache(num_seqs: int, ctx: int, s: dict, device, block_size: int = 16):
    """A random cache whose blocks are scattered (shuffled) over the pool, and its block table."""
    per_seq = -(-ctx // block_size)
    nb = num_seqs * per_seq + 1  # block 0 stays unused, as the engine's null block
    cache = torch.randn(2, nb, block_size, s["kv_heads"], s["head_dim"], dtype=DT, device=device)
    perm = torch.randperm(nb - 1, device=device)[: num_seqs * per_seq] + 1
    return cache, perm.view(num_seqs, per_seq).to(torch.int32)


def _contiguous_kv(cache: torch.Tensor, table: torch.Tensor, ctx: int):
    """[B, Hkv, ctx, D] copies of K and V, what SDPA reads."""
    k = cache[0, table.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    v = cache[1, table.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    return k, v


def _flash(q, k, v, causal: bool, scale: float):
    gqa = q.shape[1] != k.shape[1]
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                  enable_gqa=gqa)
    except RuntimeError:  # no flash for this device / dtype: SDPA's own choice
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=gqa)


def _bind(f: Callable, *ts: torch.Tensor) -> tuple[Callable, Callable]:
    """(run over `ts`, factory of runs over fresh copies of `ts` with the same strides), so an
    implementation that wrote into its inputs could not skew the other's correctness check."""
    def fresh() -> Callable:
        cs = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
              for t in ts]
        return lambda fn: f(fn, *cs)

    return (lambda fn: f(fn, *ts)), fresh


def cases(s: dict, device) -> Iterator[Case]:
    """Built one at a time, so each case's tensors are freed before the next is made."""
    h, inter, H, Hkv, D = s["hidden"], s["inter"], s["heads"], s["kv_heads"], s["head_dim"]
    for T in s["tokens"]:
        x = torch.randn(T, h, dtype=DT, device=device)
        w = (1 + 0.1 * torch.randn(h, device=device)).to(DT)
        res = torch.randn(T, h, dtype=DT, device=device)
        norm = lambda fn, x, w, r=None: fn(x, w, 1e-5) if r is None else fn(x, w, 1e-5, r)  # noqa: E731
        yield Case("rms_norm", f"T={T} h={h}", *_bind(norm, x, w), 2 * T * h * 2 + h * 2, 0,
                   None)
        yield Case("rms_norm", f"T={T} h={h} +residual", *_bind(norm, x, w, res),
                   4 * T * h * 2 + h * 2, 0, None)
        g = torch.randn(T, 2 * inter, dtype=DT, device=device)
        yield Case("silu_and_mul", f"T={T} d={inter}", *_bind(lambda fn, g: fn(g), g),
                   3 * T * inter * 2, 0, None)
        # q and k as the views the qkv split hands over (row stride of the fused projection).
        qkv = torch.randn(T, (H + 2 * Hkv) * D, dtype=DT, device=device)
        q = qkv[:, : H * D].view(T, H, D)
        k = qkv[:, H * D: (H + Hkv) * D].view(T, Hkv, D)
        pos = torch.randint(0, 4096, (T,), device=device)
        cs = torch.randn(4096, D, device=device)
        yield Case("apply_rope", f"T={T} H={H} Hkv={Hkv} D={D}",
                   *_bind(lambda fn, q, k, p, c: fn(q, k, p, c), q, k, pos, cs),
                   2 * T * (H + Hkv) * D * 2 + T * D * 4 + T * 8, 0, None)
        kv_new = torch.randn(2, T, Hkv, D, dtype=DT, device=device)
        nb = 2 * (-(-T // 16)) + 1
        cache = torch.randn(2, nb, 16, Hkv, D, dtype=DT, device=device)
        slots = torch.randperm((nb - 1) * 16, device=device)[:T] + 16

        def wrun(fn, kv=kv_new, cache=cache, slots=slots):
            fn(kv[0], kv[1], cache, slots)
            return cache

        def wfresh(kv=kv_new, cache=cache, slots=slots):
            c = cache.clone()
            return lambda fn: (fn(kv[0], kv[1], c, slots), c)[1]

        yield Case("write_kv_cache", f"T={T} Hkv={Hkv} D={D}", wrun, wfresh,
                        2 * 2 * T * Hkv * D * 2 + T * 8, 0, None)
    scale = 1 / math.sqrt(D)
    for B, ctx in s["decode"]:
        cache, table = _paged_cache(B, ctx, s, device)
        q = torch.randn(B, H, D, dtype=DT, device=device)
        meta = _meta([1] * B, [ctx] * B, table, device)
        k, v = _contiguous_kv(cache, table, ctx)
        run = lambda fn, q=q, c=cache, m=meta: fn(q, c, m, scale)  # noqa: E731
        sdpa = lambda q=q, k=k, v=v: _flash(q[:, :, None], k, v, False, scale)  # noqa: E731
        yield Case("paged_attention", f"decode B={B} ctx={ctx}", run, lambda run=run: run,
                        B * ctx * Hkv * D * 2 * 2 + 2 * B * H * D * 2, 4 * B * H * ctx * D, sdpa)
    for B, qlen, ctx in s["prefill"]:
        cache, table = _paged_cache(B, ctx, s, device)
        q = torch.randn(B * qlen, H, D, dtype=DT, device=device)
        meta = _meta([qlen] * B, [ctx] * B, table, device)
        pairs = B * (qlen * (ctx - qlen) + qlen * (qlen + 1) / 2)
        sdpa = None
        if qlen == ctx:  # SDPA's causal mask is top-left aligned: only full prompts compare
            k, v = _contiguous_kv(cache, table, ctx)
            qs = q.view(B, qlen, H, D).transpose(1, 2).contiguous()
            sdpa = lambda qs=qs, k=k, v=v: _flash(qs, k, v, True, scale)  # noqa: E731
        run = lambda fn, q=q, c=cache, m=meta: fn(q, c, m, scale)  # noqa: E731
        kind = "prefill" if qlen == ctx else "chunk"
        yield Case("paged_attention", f"{kind} B={B} q={qlen} ctx={ctx}", run,
                        lambda run=run: run,
                        B * ctx * Hkv * D * 2 * 2 + 2 * B * qlen * H * D * 2, 4 * H * D * pairs,
                        sdpa)


def _triton_impl(op: str) -> tuple[Callable | None, str | None]:
    """The registered Triton kernel itself (not via mmkernels.get, which reads the env)."""
    path = mmkernels.TRITON.get(op)
    if path is None:
        return None, "no Triton kernel registered"
    module, fn = path.split(":")
    try:
        return getattr(importlib.import_module(module), fn), None
    except Exception as e:  # module not written yet, or broken: skip this op
        return None, f"{type(e).__name__}: {e}"[:300]


def _diff(a, b) -> dict:
    a = a if isinstance(a, tuple | list) else (a,)
    b = b if isinstance(b, tuple | list) else (b,)
    max_abs, num, den, finite = 0.0, 0.0, 0.0, True
    for x, y in zip(a, b):
        x, y = x.float(), y.float()
        finite &= bool(torch.isfinite(x).all())
        max_abs = max(max_abs, (x - y).abs().max().item())
        num += (x - y).pow(2).sum().item()
        den += y.pow(2).sum().item()
    return {"max_abs_diff": max_abs, "rel_err": math.sqrt(num / max(den, 1e-30)),
            "finite": finite}


def _time(fn: Callable[[], object], device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return statistics.median(time_ms(fn, device, warmup=1, reps=3))


def bench_case(c: Case, device, bw: float, triton_fn, triton_err) -> dict:
    row: dict = {"op": c.op, "case": c.name, "bytes": c.bytes, "flops": c.flops}

    def rate(prefix: str, ms: float) -> None:
        row[f"{prefix}_us"] = ms * 1e3
        row[f"{prefix}_GBps"] = c.bytes / (ms * 1e-3) / 1e9
        row[f"{prefix}_pct_bw"] = 100 * c.bytes / (ms * 1e-3) / bw
        if c.flops:
            row[f"{prefix}_TFLOPs"] = c.flops / (ms * 1e-3) / 1e12

    ref_fn = getattr(reference, c.op)
    rate("ref", _time(lambda: c.run(ref_fn), device))
    if triton_fn is None:
        row["triton"] = f"skipped: {triton_err}"
    else:
        try:
            row.update(_diff(c.fresh()(triton_fn), c.fresh()(ref_fn)))
            rate("triton", _time(lambda: c.run(triton_fn), device))
        except Exception as e:
            row["triton"] = f"error: {type(e).__name__}: {e}"[:500]
    if c.sdpa is not None:
        try:
            rate("sdpa", _time(c.sdpa, device))
        except Exception as e:
            row["sdpa"] = f"error: {type(e).__name__}: {e}"[:300]
    return row


def print_table(res: dict) -> None:
    bw = res["ceilings"]["copy_GBps"]
    print(f"\nkernels, {res['env'].get('gpu')}, copy bw {bw:.0f} GB/s (triton {res['env']['triton']})")
    print(f"{'op':<15} {'case':<26} {'ref us':>9} {'triton us':>9} {'sdpa us':>9} "
          f"{'tri GB/s':>8} {'%bw':>5} {'tri TF/s':>8} {'max|d|':>8} {'rel':>8}")
    for r in res["rows"]:
        def f(k: str, fmt: str, r: dict = r) -> str:
            return format(r[k], fmt) if isinstance(r.get(k), int | float) else "-"

        print(f"{r['op']:<15} {r['case']:<26} {f('ref_us', '9.1f'):>9} {f('triton_us', '9.1f'):>9} "
              f"{f('sdpa_us', '9.1f'):>9} {f('triton_GBps', '8.0f'):>8} "
              f"{f('triton_pct_bw', '5.0f'):>5} {f('triton_TFLOPs', '8.1f'):>8} "
              f"{f('max_abs_diff', '8.1e'):>8} {f('rel_err', '8.1e'):>8}"
              + (f"  {r['triton']}" if isinstance(r.get("triton"), str) else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke)")
    ap.add_argument("--ops", nargs="+", default=list(mmkernels.OPS))
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--out", default="bench/results/kernels.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    on_cpu_compiled = device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
    res: dict = {"env": env_record(device), "ceilings": measure_device(device),
                 "shape": "tiny" if args.tiny else "llama-2-7b", "rows": []}
    bw = res["ceilings"]["copy_GBps"] * 1e9
    impls: dict[str, tuple] = {}
    for op in args.ops:
        impls[op] = ((None, "CPU without TRITON_INTERPRET=1") if on_cpu_compiled
                     else _triton_impl(op))
    out = Path(args.out)
    for c in cases(SHAPE_TINY if args.tiny else SHAPE_7B, device):
        if c.op not in args.ops:
            continue
        if time.perf_counter() - t0 > args.budget_s:
            res["rows"].append({"op": c.op, "case": c.name, "triton": "skipped: budget spent"})
            continue
        try:
            row = bench_case(c, device, bw, *impls[c.op])
        except Exception as e:
            row = {"op": c.op, "case": c.name, "triton": f"error: {type(e).__name__}: {e}"[:500]}
        print(f"{c.op} {c.name}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in row.items() if k.endswith(("_us", "_diff"))), flush=True)
        res["rows"].append(row)
        write_json(out, res)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["wall_s"] = time.perf_counter() - t0
    write_json(out, res)
    print_table(res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
