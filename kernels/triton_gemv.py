"""A Triton GEMV for the decode projections: y = x @ W^T (+ b) with few rows of x (M <= 16).

At batch 1 a 7B decode step is ~13 GB of weight reads, and cuBLAS's M=1 path reads them at 85% of
the H200's copy bandwidth (bench/README.md, "Where a step goes"). This kernel is the candidate to
do better: every program owns BLOCK_N output columns, streams their rows of W once along K (the
contiguous axis of an nn.Linear weight) and keeps x's few rows in a 16-row tile for `tl.dot`, so
the tensor cores do the math and the loads are one long, coalesced read per row. No split-K: it
would need a zeroed fp32 buffer and a cast kernel, two more launches per projection.

`linear` has the signature of `kernels.reference.linear`; it takes the GEMV only for M <= 16 and
hands anything larger to `F.linear` (cuBLAS is compute-bound there and hard to beat). The config
can be passed per call so `bench/gemv_sweep.py` can time a grid of them against cuBLAS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROWS = 16  # x's rows live in one tl.dot tile (its smallest M)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast dot operands: the interpreter multiplies bf16 as raw bits
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no silent tf32)
):  # fmt: skip
    pid = tl.program_id(0)
    rn = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: rn * stride passes 2**31
    rm = tl.arange(0, 16)
    rk = tl.arange(0, BLOCK_K)
    n_ok, m_ok = rn < N, rm < M
    w_rows = w_ptr + rn[:, None] * stride_wn  # [BLOCK_N, 1]
    x_rows = x_ptr + rm[:, None] * stride_xm  # [16, 1]
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_FP32:
            w, x = w.to(tl.float32), x.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)  # [16, BK] @ [BK, BN]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def default_config(n: int, k: int, element_size: int = 2) -> dict[str, int]:
    """BLOCK_N / BLOCK_K / warps / stages for an [n, k] weight: the fastest of
    bench/gemv_sweep.py's grid at the 7B projections on the H200 (bf16, 1 and 8 rows). fp32 gets
    short tiles and two stages, which fit shared memory (not a tuned path)."""
    if element_size > 2:
        return {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2}
    if n > 16384:
        return {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    if n > 8192:
        return {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_N": 32, "BLOCK_K": 512, "num_warps": 4, "num_stages": 4}


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: dict[str, int] | None = None) -> torch.Tensor:
    """[M, K] @ [N, K]^T (+ [N]) -> [M, N] in x's dtype, M <= MAX_ROWS, fp32 accumulation."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {m}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    cfg = config or default_config(n, k, x.element_size())
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _gemv_kernel[grid](
        x, weight, bias if bias is not None else weight, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        DOT_FP32=x.device.type != "cuda",
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or x.device.type != "cuda" else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """`F.linear` with the GEMV for <= 16 rows; any leading dims."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > MAX_ROWS or rows.shape[0] == 0:
        return F.linear(x, weight, bias)
    return gemv(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])
