"""The Triton GEMV (kernels.triton_gemv) against F.linear: few rows, odd N and K (partial tiles
on both axes), bias or none, strided rows, and the hand-over to F.linear past 16 rows.

CPU cases run in a child pytest under the Triton interpreter (see test_triton_ops.py for why);
GPU cases run compiled at Llama-2-7B projection shapes (marked gpu). Outputs come from a
NaN-poisoned allocation, so an element the kernel never writes fails."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from interp_child import INTERPRETED, run_interpreter_cases
from interp_child import interp_or_gpu_cases as cases

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}
SMALL = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}  # interpreter tiles


def test_interpreter_cases():
    if INTERPRETED:
        pytest.skip("already under the interpreter: the CPU cases run in this process")
    run_interpreter_cases(__file__, "not test_interpreter_cases", kernels=None)


@pytest.fixture(scope="module")
def gemv_mod():
    import kernels.triton_gemv as module

    assert (type(module._gemv_kernel).__name__ == "InterpretedFunction") == INTERPRETED
    return module


def _inputs(request, device, m, n, k, dtype, bias):
    gen = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    x = (torch.randn(m, k, generator=gen)).to(device, dtype)
    w = (0.05 * torch.randn(n, k, generator=gen)).to(device, dtype)
    b = torch.randn(n, generator=gen).to(device, dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize(
    ("device", "m", "n", "k"),
    cases(cpu=[(1, 40, 96), (3, 17, 130), (16, 33, 64)],
          gpu=[(1, 12288, 4096), (1, 4096, 4096), (8, 22016, 4096), (3, 4096, 11008),
               (16, 4000, 1000)]),
)
def test_gemv_matches_linear(gemv_mod, request, device, m, n, k, dtype, bias):
    x, w, b = _inputs(request, device, m, n, k, dtype, bias)
    config = SMALL if INTERPRETED else None
    empty = torch.empty
    made = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", lambda *a, **kw: made.append(empty(*a, **kw).fill_(float("nan")))
                   or made[-1])
        out = gemv_mod.gemv(x, w, b, config=config)
    assert len(made) == 1 and out.data_ptr() == made[0].data_ptr()
    want = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    rtol, atol = TOL[dtype]
    # fp32 differs from cuBLAS only in summation order, which grows with |y| (K terms)
    scale = max(1.0, want.abs().max().item()) if dtype == torch.float32 else 1.0
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol * 3 * scale)


@pytest.mark.parametrize(("device",), cases(cpu=[()], gpu=[()]))
def test_linear_takes_strided_rows_and_leading_dims(gemv_mod, request, device, monkeypatch):
    """Rows with a stride wider than K (a slice of a wider tensor) and [B, T, K] inputs."""
    x, w, b = _inputs(request, device, 4, 24, 72, torch.float32, True)
    wide = torch.randn(4, 100, device=device)
    wide[:, 10:82] = x
    strided = wide[:, 10:82]
    assert strided.stride(0) == 100
    if INTERPRETED:
        monkeypatch.setattr(gemv_mod, "default_config", lambda *shape: SMALL)
    torch.testing.assert_close(gemv_mod.linear(strided, w, b), F.linear(x, w, b),
                               rtol=1e-5, atol=1e-5)
    x3 = x.view(2, 2, 72)
    torch.testing.assert_close(gemv_mod.linear(x3, w, b), F.linear(x3, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("device",), cases(cpu=[()], gpu=[()]))
def test_many_rows_go_to_f_linear(gemv_mod, request, device, monkeypatch):
    x, w, _ = _inputs(request, device, 17, 8, 16, torch.float32, False)
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv_mod.gemv(x, w)
    monkeypatch.setattr(gemv_mod, "gemv", lambda *a, **kw: pytest.fail("gemv took 17 rows"))
    torch.testing.assert_close(gemv_mod.linear(x, w), F.linear(x, w))


@pytest.mark.parametrize(("device",), cases(cpu=[()], gpu=[()]))
def test_parallel_linears_run_the_gemv(gemv_mod, request, device, monkeypatch):
    """The decoder's linears dispatch to the GEMV for few rows (Triton is forced on CPU; it is
    the default on CUDA) and give F.linear's answer."""
    from llm_worker.layers.linear import ColumnParallelLinear, RowParallelLinear

    monkeypatch.setenv("MMSERVE_KERNELS", "triton")
    monkeypatch.delenv("MMSERVE_REFERENCE_OPS", raising=False)
    if INTERPRETED:
        monkeypatch.setattr(gemv_mod, "default_config", lambda *shape: SMALL)
    calls, real = [], gemv_mod.gemv
    monkeypatch.setattr(gemv_mod, "gemv", lambda *a, **kw: calls.append(a[0].shape) or real(*a))
    with torch.device(device):
        column, row = ColumnParallelLinear(72, 24, bias=True), RowParallelLinear(24, 40)
    x, w, b = _inputs(request, device, 3, 24, 72, torch.float32, True)
    column.weight.data, column.bias.data = w, b
    row.weight.data = _inputs(request, device, 1, 40, 24, torch.float32, False)[1]
    hidden = column(x)
    torch.testing.assert_close(hidden, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row(hidden), F.linear(hidden, row.weight), rtol=1e-5, atol=1e-5)
    assert calls == [(3, 72), (3, 24)]
