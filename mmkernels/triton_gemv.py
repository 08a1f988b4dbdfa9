"""A Triton GEMV for the decode projections: y = x @ W^T (+ b) with few rows of x (M <= 16).

At batch 1 a 7B decode step is ~13 GB of weight reads, and cuBLAS's M=1 path reads them at 85% of
the H200's copy bandwidth (bench/README.md, "Where a step goes"). This kernel is the candidate to
do better: every program owns BLOCK_N output columns, streams their rows of W once along K (the
contiguous axis of an nn.Linear weight) and keeps x's few rows in a 16-row tile for `tl.dot`, so
the tensor cores do the math and the loads are one long, coalesced read per row. No split-K: it
would need a zeroed fp32 buffer and a cast kernel, two more launches per projection.

`linear` has the signature of `mmkernels.reference.linear`; it takes the GEMV only for M <= 16 and
hands anything larger to `F.linear` (cuBLAS is compute-bound there and hard to beat). The config
can be passed per call so `bench/gemv_sweep.py` can time a grid of them against cuBLAS.

The same kernel also runs the op before a projection in its prologue, as each K tile of x loads:
`norm_linear` (RMSNorm, then the qkv or gate_up projection) and `silu_mul_linear` (SiLU-and-mul
of the merged gate_up output, then the down projection); and the residual stream's add in its
epilogue (`residual=` of o_proj and down). At batch 1 those small ops are 96 launch-bound
kernels per 7B step; fused, x's extra reads are a few KB per program against the 32+ KB of
weights it streams.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmkernels import reference, triton_ops

MAX_ROWS = 16  # x's rows live in one tl.dot tile (its smallest M)
# Rows up to which the norm / SiLU prologues pay. Measured on the H200 (2026-12-02 suite): at 1
# row a decode step takes 4.15 ms fused against 4.33 unfused; at 8 rows 5.01 against 4.63, the
# prologues costing more GEMV time (+0.8 ms a step) than the launches they remove.
FUSED_MAX_ROWS = 1


# What the kernel does to x's tile before the dot (constexpr: one compile each).
PLAIN, RMS_NORM, SILU_MUL = 0, 1, 2


@triton.jit
def _gemv_kernel(
    x_ptr, g_ptr, w_ptr, b_ptr, res_ptr, out_ptr, M, N, K,
    stride_xm, stride_wn, stride_rm, stride_om, eps,
    PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast dot operands: the interpreter multiplies bf16 as raw bits
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no silent tf32)
):  # fmt: skip
    # The loop body stays loads, elementwise math and the dot (no stores, no branches), so
    # Triton can still pipeline the weight loads; the residual add waits for the epilogue.
    pid = tl.program_id(0)
    rn = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: rn * stride passes 2**31
    rm = tl.arange(0, 16)
    rk = tl.arange(0, BLOCK_K)
    n_ok, m_ok = rn < N, rm < M
    w_rows = w_ptr + rn[:, None] * stride_wn  # [BLOCK_N, 1]
    x_rows = x_ptr + rm[:, None] * stride_xm  # [16, 1]
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    sum_sq = tl.zeros((16,), dtype=tl.float32)
    # A prologue reads x's tile into registers, where Triton's pipelining of the dot's own
    # loads no longer reaches it: the next tile (and its gain or up half) is loaded one
    # iteration ahead by hand, so the loop never waits on x's latency.
    x_ok = m_ok[:, None] & (rk < K)[None, :]
    if PROLOGUE != 0:
        x_next = tl.load(x_rows + rk[None, :], mask=x_ok, other=0.0)
    if PROLOGUE == 1:
        g_next = tl.load(g_ptr + rk, mask=rk < K, other=0.0)
    if PROLOGUE == 2:
        up_next = tl.load(x_rows + K + rk[None, :], mask=x_ok, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if PROLOGUE == 0:  # x straight into the dot, where Triton pipelines its load itself
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        else:
            x = x_next
            kn = k + BLOCK_K
            xn_ok = m_ok[:, None] & (kn < K)[None, :]
            x_next = tl.load(x_rows + kn[None, :], mask=xn_ok, other=0.0)
        if PROLOGUE == 1:  # RMSNorm: every program normalizes the few rows it needs itself
            g = g_next
            g_next = tl.load(g_ptr + kn, mask=kn < K, other=0.0)
            xf = x.to(tl.float32)
            sum_sq += tl.sum(xf * xf, axis=1)
            # The gain now, the row's 1/rms after the dot (a per-row scalar commutes with it).
            x = (xf * g.to(tl.float32)[None, :]).to(x.dtype)
        if PROLOGUE == 2:  # SiLU-and-mul: x is the merged [gate | up], K = d columns each
            up = up_next
            up_next = tl.load(x_rows + K + kn[None, :], mask=xn_ok, other=0.0)
            gate = x.to(tl.float32)
            # Rounded where the reference rounds: silu(gate), then the product.
            act = (gate / (1.0 + tl.exp(-gate))).to(x.dtype)
            x = (act.to(tl.float32) * up.to(tl.float32)).to(x.dtype)
        if DOT_FP32:
            w, x = w.to(tl.float32), x.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)  # [16, BK] @ [BK, BN]
    if PROLOGUE == 1:
        acc *= tl.rsqrt(sum_sq / K + eps)[:, None]  # masked columns and rows added zeros
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:  # the residual stream's add, in the epilogue: out = residual + x W^T
        # Rounded first, as the reference adds the rounded projection to the stream.
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc += tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=y_ok,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=y_ok)


def default_config(n: int, k: int, element_size: int = 2, prologue: int = PLAIN
                   ) -> dict[str, int]:
    """BLOCK_N / BLOCK_K / warps / stages for an [n, k] weight: the fastest of
    bench/gemv_sweep.py's grid at the 7B projections on the H200 (bf16, 1 and 8 rows; the
    prologues from its --fused sweep). fp32 gets short tiles and two stages, which fit shared
    memory (not a tuned path)."""
    if element_size > 2:
        return {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2}
    if n > 16384:
        return {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    if n > 8192:
        return {"BLOCK_N": 32, "BLOCK_K": 256 if prologue == RMS_NORM else 128, "num_warps": 4,
                "num_stages": 3}
    return {"BLOCK_N": 32, "BLOCK_K": 512, "num_warps": 4,
            "num_stages": 3 if prologue == SILU_MUL else 4}


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: dict[str, int] | None = None, residual: torch.Tensor | None = None
         ) -> torch.Tensor:
    """[M, K] @ [N, K]^T (+ [N]) (+ residual [M, N]) -> [M, N] in x's dtype, M <= MAX_ROWS,
    fp32 accumulation."""
    return _launch(PLAIN, x, weight, bias, config, residual)


def _launch(prologue: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            config: dict[str, int] | None, residual: torch.Tensor | None = None,
            norm_weight: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """One GEMV over x's rows after `prologue`, with the residual added in the epilogue."""
    m = x.shape[0]
    n, k = weight.shape
    if m > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {m}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if residual is not None:
        residual = residual.reshape(m, n)
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
    cfg = config or default_config(n, k, x.element_size(), prologue)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    res = out if residual is None else residual  # unread without HAS_RESIDUAL
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _gemv_kernel[grid](
        x, norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, res, out, m, n, k,
        x.stride(0), weight.stride(0), res.stride(0), out.stride(0), eps,
        PROLOGUE=prologue, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        DOT_FP32=x.device.type != "cuda",
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or x.device.type != "cuda" else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out


def _few_rows(x: torch.Tensor) -> torch.Tensor | None:
    """x as [rows, K] when the GEMV takes it (1..MAX_ROWS rows), else None."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if 0 < rows.shape[0] <= MAX_ROWS else None


def _cublas(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """`mmkernels.reference.linear` with the residual as the GEMM's C operand (one cuBLAS call)."""
    if residual is None or bias is not None or x.dim() != 2:
        return reference.linear(x, weight, bias, residual)
    return torch.addmm(residual, x, weight.t())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """`mmkernels.reference.linear` with the GEMV (residual add in its epilogue) for <= 16 rows,
    cuBLAS above; any leading dims."""
    rows = _few_rows(x)
    if rows is None:
        return _cublas(x, weight, bias, residual)
    return gemv(rows, weight, bias, residual=residual).view(*x.shape[:-1], weight.shape[0])


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                bias: torch.Tensor | None = None, config: dict[str, int] | None = None
                ) -> torch.Tensor:
    """`mmkernels.reference.norm_linear`: for up to FUSED_MAX_ROWS rows one GEMV that normalizes
    x in its prologue (no RMSNorm launch, no normed tensor); else the Triton RMSNorm and the
    `linear` kernel (GEMV to 16 rows, cuBLAS above). The
    1/rms scales the fp32 accumulator instead of each normed value, so bf16 results differ from
    the reference by rounding order only. [T, hidden] inputs."""
    rows = _few_rows(x)
    if rows is None or rows.shape[0] > FUSED_MAX_ROWS or x.dim() != 2:
        return _norm_then_linear(x, norm_weight, eps, weight, bias)
    return _launch(RMS_NORM, rows, weight, bias, config, None, norm_weight, eps)


def silu_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None, config: dict[str, int] | None = None
                    ) -> torch.Tensor:
    """`mmkernels.reference.silu_mul_linear`: for up to FUSED_MAX_ROWS rows one GEMV that applies
    SiLU-and-mul to the merged [gate | up] as it loads it (and adds the residual in its
    epilogue); else the Triton SiLU-and-mul and the `linear` kernel."""
    rows = _few_rows(x)
    if rows is None or rows.shape[0] > FUSED_MAX_ROWS or x.dim() != 2:
        return _silu_then_linear(x, weight, bias, residual)
    return _launch(SILU_MUL, rows, weight, bias, config, residual)


_norm_then_linear = reference.norm_linear_of(triton_ops.rms_norm, linear)
_silu_then_linear = reference.silu_mul_linear_of(triton_ops.silu_and_mul, linear)
