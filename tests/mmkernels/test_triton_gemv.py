"""The Triton GEMV (mmkernels.triton_gemv) against F.linear: few rows, odd N and K (partial tiles
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
    import mmkernels.triton_gemv as module

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


@pytest.mark.parametrize(("device",), cases(cpu=[()], gpu=[()]))
def test_parallel_linears_run_the_fused_gemv(gemv_mod, request, device, monkeypatch):
    """forward_normed / forward_gated run the fused GEMV for few rows, with the reference's
    answer: the norm, the activation and the residual add happen inside the projections."""
    from llm_worker.layers.linear import MergedColumnParallelLinear, RowParallelLinear
    from llm_worker.layers.norm import RMSNorm
    from mmkernels import reference

    monkeypatch.setenv("MMSERVE_KERNELS", "triton")
    monkeypatch.delenv("MMSERVE_REFERENCE_OPS", raising=False)
    if INTERPRETED:
        monkeypatch.setattr(gemv_mod, "default_config", lambda *shape: SMALL)
    prologues, real = [], gemv_mod._launch
    monkeypatch.setattr(gemv_mod, "_launch", lambda p, *a, **kw: prologues.append(p) or real(p, *a, **kw))
    monkeypatch.setattr(gemv_mod, "FUSED_MAX_ROWS", gemv_mod.MAX_ROWS)
    with torch.device(device):
        norm, gate_up = RMSNorm(72, 1e-6), MergedColumnParallelLinear(72, [20, 20])
        down = RowParallelLinear(20, 72)
    gate_up.weight.data = _inputs(request, device, 1, 40, 72, torch.float32, False)[1]
    down.weight.data = _inputs(request, device, 1, 72, 20, torch.float32, False)[1]
    norm.weight.data = 1 + 0.15 * torch.randn(72, device=device)
    x = torch.randn(3, 72, device=device)
    h = gate_up.forward_normed(norm, x)
    torch.testing.assert_close(h, reference.norm_linear(x, norm.weight, 1e-6, gate_up.weight),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(down.forward_gated(h, residual=x),
                               reference.silu_mul_linear(h, down.weight, None, x),
                               rtol=1e-5, atol=1e-5)
    assert prologues == [gemv_mod.RMS_NORM, gemv_mod.SILU_MUL]
    # By default only one row runs fused; more go through the norm / activation kernel first.
    monkeypatch.setattr(gemv_mod, "FUSED_MAX_ROWS", 1)
    del prologues[:]
    torch.testing.assert_close(gate_up.forward_normed(norm, x), h)
    torch.testing.assert_close(gate_up.forward_normed(norm, x[:1]), h[:1], rtol=1e-5, atol=1e-5)
    assert prologues == [gemv_mod.PLAIN, gemv_mod.RMS_NORM]


def _poisoned(fn):
    """fn's result with every torch.empty of the call NaN-filled; also the buffers made."""
    empty, made = torch.empty, []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", lambda *a, **kw: made.append(empty(*a, **kw).fill_(float("nan")))
                   or made[-1])
        return fn(), made


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize(
    ("device", "m", "n", "k"),
    cases(cpu=[(1, 40, 96), (3, 17, 130), (16, 33, 64)],
          gpu=[(1, 12288, 4096), (8, 22016, 4096), (16, 4000, 1000)]),
)
def test_norm_linear_matches_reference(gemv_mod, request, device, m, n, k, dtype, monkeypatch):
    """RMSNorm in the GEMV's prologue: the projection of the normed rows, from a fresh
    (NaN-poisoned) buffer, against the reference. Every row count the kernel takes, though by
    default only one row runs fused."""
    from mmkernels import reference

    monkeypatch.setattr(gemv_mod, "FUSED_MAX_ROWS", gemv_mod.MAX_ROWS)

    x, w, b = _inputs(request, device, m, n, k, dtype, True)
    gen = torch.Generator().manual_seed(7)
    gain = (1 + 0.15 * torch.randn(k, generator=gen)).to(device, dtype)
    out, made = _poisoned(lambda: gemv_mod.norm_linear(x, gain, 1e-6, w, b,
                                                       config=SMALL if INTERPRETED else None))
    assert len(made) == 1 and out.data_ptr() == made[0].data_ptr()
    want = reference.norm_linear(x.float(), gain.float(), 1e-6, w.float(), b.float())
    rtol, atol = TOL[dtype]
    scale = max(1.0, want.abs().max().item()) if dtype == torch.float32 else 1.0
    torch.testing.assert_close(out, want.to(dtype), rtol=rtol, atol=atol * 3 * scale)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize(
    ("device", "m", "n", "k"),
    cases(cpu=[(1, 40, 96), (5, 17, 130)], gpu=[(1, 4096, 4096), (8, 4096, 11008)]),
)
def test_residual_add_in_the_epilogue(gemv_mod, request, device, m, n, k, dtype):
    """linear(..., residual=r) = r + x W^T (+ b), the rounded projection added to the stream."""
    from mmkernels import reference

    x, w, b = _inputs(request, device, m, n, k, dtype, True)
    res = torch.randn(m, n, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    out, made = _poisoned(lambda: gemv_mod.gemv(x, w, b, config=SMALL if INTERPRETED else None,
                                                residual=res))
    assert len(made) == 1 and out.data_ptr() == made[0].data_ptr()
    want = reference.linear(x.float(), w.float(), b.float()).to(dtype) + res
    rtol, atol = TOL[dtype]
    scale = max(1.0, want.abs().max().item()) if dtype == torch.float32 else 1.0
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol * 3 * scale)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize(
    ("device", "m", "n", "k"),
    cases(cpu=[(1, 40, 96), (5, 17, 130)], gpu=[(1, 4096, 11008), (8, 4096, 11008)]),
)
def test_silu_mul_linear_matches_reference(gemv_mod, request, device, m, n, k, dtype,
                                           monkeypatch):
    """SiLU-and-mul of the merged [gate | up] in the prologue of the down projection, the
    residual add in its epilogue."""
    from mmkernels import reference

    monkeypatch.setattr(gemv_mod, "FUSED_MAX_ROWS", gemv_mod.MAX_ROWS)
    gate_up, w, b = _inputs(request, device, m, n, 2 * k, dtype, True)
    w = w[:, :k].contiguous()
    res = torch.randn(m, n, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    out, made = _poisoned(lambda: gemv_mod.silu_mul_linear(
        gate_up, w, b, res, config=SMALL if INTERPRETED else None))
    assert len(made) == 1 and out.data_ptr() == made[0].data_ptr()
    want = reference.silu_mul_linear(gate_up.float(), w.float(), b.float(), res.float())
    rtol, atol = TOL[dtype]
    scale = max(1.0, want.abs().max().item()) if dtype == torch.float32 else 1.0
    torch.testing.assert_close(out, want.to(dtype), rtol=rtol, atol=atol * 3 * scale)


@pytest.mark.parametrize(("device",), cases(cpu=[()], gpu=[()]))
def test_fused_ops_hand_many_rows_to_their_parts(gemv_mod, request, device, monkeypatch):
    """Past 16 rows (prefill) the fused ops run the Triton norm / activation, then F.linear."""
    from mmkernels import reference

    monkeypatch.setattr(gemv_mod, "_launch", lambda *a, **kw: pytest.fail("GEMV took 17 rows"))
    x, w, b = _inputs(request, device, 17, 8, 16, torch.float32, True)
    gain, res = torch.rand(16, device=device) + 0.5, torch.randn(17, 8, device=device)
    torch.testing.assert_close(gemv_mod.norm_linear(x, gain, 1e-6, w, b),
                               reference.norm_linear(x, gain, 1e-6, w, b), rtol=1e-5, atol=1e-5)
    gate_up = torch.randn(17, 16, device=device)
    torch.testing.assert_close(gemv_mod.silu_mul_linear(gate_up, w[:, :8], None, res),
                               reference.silu_mul_linear(gate_up, w[:, :8], None, res),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gemv_mod.linear(x, w, None, res), F.linear(x, w) + res,
                               rtol=1e-5, atol=1e-5)


def test_fused_ops_dispatch(monkeypatch):
    """The fused kernels run when Triton is on; keeping any op on the reference composes the
    fused op from its parts, each resolved on its own (the benchmarks' A/B switches)."""
    import mmkernels
    import mmkernels.triton_gemv as gemv_mod
    import mmkernels.triton_ops as ops
    from mmkernels import reference

    monkeypatch.setenv("MMSERVE_KERNELS", "reference")
    assert mmkernels.get("norm_linear", "cpu") is reference.norm_linear
    assert mmkernels.get("silu_mul_linear", "cpu") is reference.silu_mul_linear
    monkeypatch.setenv("MMSERVE_KERNELS", "triton")
    monkeypatch.delenv("MMSERVE_REFERENCE_OPS", raising=False)
    assert mmkernels.get("norm_linear", "cpu") is gemv_mod.norm_linear
    assert mmkernels.get("silu_mul_linear", "cpu") is gemv_mod.silu_mul_linear

    seen = []

    def spy(module, name, label, impl):
        monkeypatch.setattr(module, name, lambda *a: seen.append(label) or impl(*a))

    spy(ops, "rms_norm", "triton norm", reference.rms_norm)
    spy(ops, "silu_and_mul", "triton silu", reference.silu_and_mul)
    spy(gemv_mod, "linear", "gemv", reference.linear)
    spy(mmkernels, "linear", "cublas", reference.linear)
    x, w, gain = torch.randn(2, 8), torch.randn(4, 8), torch.ones(8)
    for switch, want in [("linear", ["triton norm", "cublas", "triton silu", "cublas"]),
                         ("norm_linear,silu_mul_linear",
                          ["triton norm", "gemv", "triton silu", "gemv"])]:
        monkeypatch.setenv("MMSERVE_REFERENCE_OPS", switch)
        del seen[:]
        got = mmkernels.get("norm_linear", "cpu")(x, gain, 1e-6, w)
        torch.testing.assert_close(got, reference.norm_linear(x, gain, 1e-6, w))
        got = mmkernels.get("silu_mul_linear", "cpu")(x, w[:, :4])
        torch.testing.assert_close(got, reference.silu_mul_linear(x, w[:, :4]))
        assert seen == want, switch
