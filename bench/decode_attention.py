"""The decode attention kernel inside a CUDA graph, the way a decode step runs it: µs per layer.

`profile_step.py` sees the kernel as one family of a whole step; `kernels.py` times one launch
with do_bench, where this host's launch cost (tens of µs) hides a 5-10 µs kernel. Here one
graph replays 32 layers back to back (32 separate KV caches, so nothing stays in L2 that a real
step would not find there), and a layer is graph time / 32. Rows, at Llama-2-7B heads
(32 q heads, head_dim 128, bf16; `--kv-heads 8` for GQA), per batch x context:
- `unfused`: `rope_write_kv` then `decode_attention` over the cache (two kernels a layer, the
  path before the fusion, with the decode kernel's default tiles);
- `fused`: `decode_attention` rotating q and k, writing the new K/V and attending (what serving
  runs), at its default tiles and at every config of the sweep (KV tile, warps, stages), each
  checked against the default's output first.

    python bench/decode_attention.py --out bench/results/decode_attention.json
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from common import env_record, measure_device, write_json

LAYERS = 32


class Point:
    """One batch x context: per-layer caches, the step's q/k/v, metadata and RoPE inputs."""

    def __init__(self, batch: int, ctx: int, hq: int, hkv: int, d: int, block_size: int,
                 device: torch.device, gen: torch.Generator):
        from types import SimpleNamespace

        blocks = -(-(ctx + 1) // block_size)
        self.caches = [torch.empty(2, batch * blocks + 1, block_size, hkv, d, device=device,
                                   dtype=torch.bfloat16).normal_(generator=gen)
                       for _ in range(LAYERS)]
        perm = torch.randperm(batch * blocks, device=device, generator=gen).int() + 1
        tables = perm.view(batch, blocks)
        seq_lens = torch.full((batch,), ctx + 1, dtype=torch.int32, device=device)
        last = tables[:, ctx // block_size].long()
        self.slots = last * block_size + ctx % block_size
        self.meta = SimpleNamespace(query_start_loc=torch.arange(batch + 1, dtype=torch.int32,
                                                                 device=device),
                                    seq_lens=seq_lens, block_tables=tables, max_query_len=1,
                                    max_seq_len=ctx + 1)
        qkv = torch.randn(batch, (hq + 2 * hkv) * d, device=device, generator=gen)
        q, k, v = qkv.to(torch.bfloat16).split([hq * d, hkv * d, hkv * d], dim=-1)
        self.q, self.k, self.v = (t.unflatten(-1, (-1, d)) for t in (q, k, v))
        self.rope = (torch.full((batch,), ctx, device=device),
                     torch.randn(ctx + 1, d, device=device, generator=gen).to(torch.bfloat16))
        self.out = torch.empty_like(self.q)
        self.scale = d**-0.5


def graph_us(fn, reps: int) -> float:
    """Per-layer µs of a graph that runs fn(layer) for every layer."""
    for layer in range(LAYERS):  # compile outside the capture
        fn(layer)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(LAYERS):
            fn(layer)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / LAYERS)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--context", type=int, nargs="+", default=[128, 700, 2048])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=100.0)
    ap.add_argument("--out", default="bench/results/decode_attention.json")
    args = ap.parse_args()
    t0 = time.monotonic()
    device = torch.device("cuda")
    from mmkernels import triton_attention as ta

    gen = torch.Generator(device).manual_seed(0)
    group = args.heads // args.kv_heads
    default = ta.decode_config(group, True)
    sweep = [ta.DecodeConfig(default.block_m, bn, w, st)
             for bn, w, st in itertools.product((32, 64, 128), (2, 4, 8), (1, 2))]
    rows: list[dict] = []
    print(f"{'batch':>5} {'ctx':>5} {'row':>34} {'us/layer':>9} {'KV GB/s':>8}")
    for batch, ctx in itertools.product(args.batch, args.context):
        if time.monotonic() - t0 > args.budget_s:
            print(f"budget spent: skipping batch {batch} ctx {ctx} and the rest")
            break
        p = Point(batch, ctx, args.heads, args.kv_heads, args.head_dim, args.block_size,
                  device, gen)
        rows += bench_point(p, batch, ctx, args, default, sweep, t0 + args.budget_s)
        del p
        torch.cuda.empty_cache()
    write_json(args.out, dict(bench="decode_attention", env=env_record(device),
                              ceilings=measure_device(device), args=vars(args), rows=rows))
    print(f"wrote {args.out}")


def bench_point(p: Point, batch: int, ctx: int, args, default, sweep: list,
                deadline: float) -> list[dict]:
    """The unfused pair, the fused default and every sweep config at one batch x context."""
    from mmkernels import triton_attention as ta
    from mmkernels.triton_ops import rope_write_kv

    kv_bytes = batch * (ctx + 1) * args.kv_heads * args.head_dim * 2 * 2
    splits = ta.decode_splits(p.q.device, batch, args.kv_heads, ctx + 1)
    rows: list[dict] = []

    def fused(layer, cfg=None):
        ta.decode_attention(p.q, p.k, p.v, p.caches[layer], p.meta, p.scale, p.slots, p.rope,
                            num_splits=splits, out=p.out, config=cfg)

    def unfused(layer):
        q = rope_write_kv(p.q, p.k, p.v, *p.rope, p.caches[layer], p.slots)
        ta.decode_attention(q, None, None, p.caches[layer], p.meta, p.scale, num_splits=splits,
                            out=p.out)

    def record(name, us, cfg=None):
        rows.append(dict(batch=batch, ctx=ctx, row=name, us_per_layer=us, splits=splits,
                         config=cfg._asdict() if cfg else None, kv_gbps=kv_bytes / us / 1e3))
        print(f"{batch:>5} {ctx:>5} {name:>34} {us:>9.2f} {kv_bytes / us / 1e3:>8.0f}")

    record("unfused", graph_us(unfused, args.reps))
    record("fused (default)", graph_us(fused, args.reps), default)
    fused(0)
    want = p.out.clone()
    for cfg in sweep:
        if time.monotonic() > deadline:
            break
        try:
            fused(0, cfg)
            torch.testing.assert_close(p.out, want, atol=2e-2, rtol=2e-2)
            us = graph_us(lambda layer, cfg=cfg: fused(layer, cfg), args.reps)
        except Exception as e:  # a config that does not compile or fit: recorded, skipped
            rows.append(dict(batch=batch, ctx=ctx, config=cfg._asdict(), error=type(e).__name__))
            continue
        record(f"m{cfg.block_m} n{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}", us, cfg)
    best = min((r for r in rows if r.get("config") and "us_per_layer" in r),
               key=lambda r: r["us_per_layer"])
    print(f"      best: {best['row']} {best['us_per_layer']:.2f} us")
    return rows


if __name__ == "__main__":
    main()
