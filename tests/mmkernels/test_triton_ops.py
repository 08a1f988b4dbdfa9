"""The Triton elementwise kernels against their torch references (mmkernels.reference).

CPU cases run under the Triton interpreter at tiny shapes; on a CUDA machine the GPU cases run
compiled at model shapes (marked gpu). Interpreter mode is process-wide: Triton reads
TRITON_INTERPRET when `@triton.jit` decorates (its own tl.sum at `import triton`) and again when a
first launch imports triton.experimental.gluon, so it cannot be scoped to one module in-process.
`test_interpreter_cases` therefore reruns this file's CPU cases in a child pytest with
TRITON_INTERPRET=1; with the variable already set, they run here directly. Outputs come from
allocations poisoned with NaN, so an element a kernel never writes fails the comparison.
"""

from __future__ import annotations

import zlib
from types import ModuleType, SimpleNamespace

import pytest
import torch
from interp_child import INTERPRETED, run_interpreter_cases
from interp_child import interp_or_gpu_cases as cases

import mmkernels
from llm_worker.layers.activation import SiluAndMul
from llm_worker.layers.norm import RMSNorm
from llm_worker.layers.rope import RotaryEmbedding
from mmkernels import reference

interp_only = pytest.mark.skipif(not INTERPRETED, reason="runs in test_interpreter_cases' child")

# (rtol, atol) per dtype. fp32 differs from the reference only in summation order. bf16/fp16 allow
# about two ulps: one output rounding plus one intermediate (the interpreter also truncates
# fp32 -> bf16 where the GPU rounds to nearest).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = list(TOL)


def test_interpreter_cases():
    if INTERPRETED:
        pytest.skip("already under the interpreter: the CPU cases run in this process")
    # MMSERVE_KERNELS unset: the tests force it where they dispatch.
    run_interpreter_cases(__file__, "not test_interpreter_cases", kernels=None)


@pytest.fixture(scope="module")
def triton_ops() -> ModuleType:
    """mmkernels.triton_ops: interpreted in the child, compiled on a CUDA machine."""
    import mmkernels.triton_ops as module

    # Guard the claim above: if a Triton release moved the switch, fail here, not in a launch.
    interpreted = type(module._rms_norm_kernel).__name__ == "InterpretedFunction"
    assert interpreted == INTERPRETED
    return module


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test's id: fresh inputs per case, the same every run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _randn(gen, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _poisoned(fn, *args):
    """fn(*args) with torch.empty / empty_like filled with NaN (ints: -1) and recorded.

    Returns fn's result and the tensors allocated: the caller checks that the outputs are those
    allocations (and no others), so an unwritten element cannot pass as a lucky zero. On CUDA any
    host sync inside fn raises.
    """
    made: list[torch.Tensor] = []
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        made.append(t.fill_(float("nan") if t.is_floating_point() else -1))
        return t

    on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
        mp.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
        if on_cuda:
            torch.cuda.set_sync_debug_mode("error")
        try:
            result = fn(*args)
        finally:
            if on_cuda:
                torch.cuda.set_sync_debug_mode("default")
    return result, made


def _assert_outputs_are(outputs, made):
    assert len(made) == len(outputs), "the wrapper allocated more than its outputs"
    assert {o.data_ptr() for o in outputs} == {t.data_ptr() for t in made}


def _close(actual, expected, rounded_to: torch.dtype | None = None):
    """Within TOL of the dtype the values were last rounded to (default: the output's)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol, atol = TOL[rounded_to or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# rms_norm


@pytest.mark.parametrize(
    ("device", "num_tokens", "hidden"),
    cases(cpu=[(5, 96), (3, 100)], gpu=[(257, 4096), (64, 5120), (33, 3584), (7, 96)]),
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(triton_ops, gen, device, num_tokens, hidden, dtype, with_residual):
    # x: rows strided past the hidden size (a slice of a wider buffer), read in place.
    x = _randn(gen, num_tokens, hidden + 8, dtype=dtype, device=device)[:, :hidden]
    weight = _randn(gen, hidden, dtype=dtype, device=device)
    # residual: column-major, so the wrapper must copy it to unit stride.
    residual = _randn(gen, hidden, num_tokens, dtype=dtype, device=device).t()
    args = (x, weight, 1e-5, residual if with_residual else None)
    x_before = x.clone()

    got, made = _poisoned(triton_ops.rms_norm, *args)
    want = reference.rms_norm(*args)
    if with_residual:
        _assert_outputs_are(got, made)
        _close(got[0], want[0])
        # The new residual is one rounded add: exact, except that the interpreter truncates bf16.
        if INTERPRETED and dtype == torch.bfloat16:
            _close(got[1], want[1])
        else:
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    else:
        _assert_outputs_are([got], made)
        _close(got, want)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)  # inputs are never written


@pytest.mark.parametrize(("device",), cases(cpu=[()], gpu=[()]))
def test_rms_norm_promotes_like_the_reference(triton_ops, gen, device):
    # bf16 activations with an fp32 weight give an fp32 output, as torch promotion does.
    x = _randn(gen, 3, 48, dtype=torch.bfloat16, device=device)
    weight = _randn(gen, 48, device=device)
    got = triton_ops.rms_norm(x, weight, 1e-6)
    _close(got, reference.rms_norm(x, weight, 1e-6), rounded_to=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# silu_and_mul


@pytest.mark.parametrize(
    ("device", "shape"),
    cases(cpu=[((3, 2 * 40),), ((2, 3, 2 * 24),)], gpu=[((130, 2 * 11008),), ((9, 2 * 14336),)]),
    ids=str,
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul(triton_ops, gen, device, shape, dtype):
    # Rows strided past 2 * d, as a slice of a wider buffer; the leading dims may be several.
    x = _randn(gen, *shape[:-1], shape[-1] + 4, dtype=dtype, device=device)[..., : shape[-1]]
    got, made = _poisoned(triton_ops.silu_and_mul, x)
    _assert_outputs_are([got], made)
    _close(got, reference.silu_and_mul(x))


# ---------------------------------------------------------------------------------------------
# apply_rope


@pytest.mark.parametrize(
    ("device", "num_tokens", "num_heads", "num_kv_heads", "head_dim"),
    cases(
        cpu=[(3, 4, 2, 64), (3, 4, 1, 80), (2, 2, 2, 96), (3, 20, 4, 128)],
        gpu=[(300, 32, 8, 128), (77, 28, 4, 128), (65, 32, 32, 80), (129, 16, 2, 96), (5, 8, 8, 64)],
    ),
)  # fmt: skip
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_rope(triton_ops, gen, device, num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    max_position = 64
    # q and k as the qkv projection's split hands them over: strided views into one buffer.
    qkv = _randn(gen, num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype,
                 device=device)  # fmt: skip
    q = qkv[:, : num_heads * head_dim].unflatten(-1, (num_heads, head_dim))
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].unflatten(
        -1, (num_kv_heads, head_dim)
    )
    # Strided positions: read through their stride, not copied.
    positions = torch.randint(max_position, (2 * num_tokens,), generator=gen).to(device)[::2]
    cache = _randn(gen, max_position, head_dim, device=device)  # fp32, as RotaryEmbedding keeps it
    qkv_before = qkv.clone()

    (q_out, k_out), made = _poisoned(triton_ops.apply_rope, q, k, positions, cache)
    q_want, k_want = reference.apply_rope(q, k, positions, cache)
    _assert_outputs_are([q_out, k_out], made)
    _close(q_out, q_want)
    _close(k_out, k_want)
    torch.testing.assert_close(qkv, qkv_before, rtol=0, atol=0)  # out of place, like the reference


# ---------------------------------------------------------------------------------------------
# write_kv_cache


@pytest.mark.parametrize(
    ("device", "num_tokens", "num_blocks", "block_size", "num_kv_heads", "head_dim"),
    cases(
        cpu=[(6, 4, 4, 2, 80), (5, 3, 2, 1, 64)],
        gpu=[(300, 64, 16, 8, 128), (70, 16, 16, 4, 96), (33, 8, 32, 2, 80)],
    ),
)  # fmt: skip
@pytest.mark.parametrize(
    ("dtype", "cache_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
     (torch.float16, torch.float16), (torch.float32, torch.bfloat16)],
    ids=str,
)  # fmt: skip
def test_write_kv_cache(
    triton_ops, gen, device, num_tokens, num_blocks, block_size, num_kv_heads, head_dim, dtype,
    cache_dtype,
):  # fmt: skip
    num_slots = num_blocks * block_size
    shape = (num_tokens, num_kv_heads, head_dim)
    # key: a strided view (as split from qkv); value: head_dim not unit-stride (forces a copy).
    key = _randn(gen, num_tokens, num_kv_heads * head_dim + 16, dtype=dtype, device=device)
    key = key[:, : num_kv_heads * head_dim].view(shape)
    value = _randn(gen, num_tokens, head_dim, num_kv_heads, dtype=dtype, device=device)
    value = value.transpose(1, 2)
    # Distinct random slots; every third token is padding (-1) and must be skipped.
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[::3] = -1
    slots = slots.to(device)
    # Poisoned cache: any slot the kernel should not touch must still be NaN afterwards.
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"),
                       dtype=cache_dtype, device=device)  # fmt: skip
    want = cache.clone()

    assert _poisoned(triton_ops.write_kv_cache, key, value, cache, slots) == (None, [])
    reference.write_kv_cache(key, value, want, slots)
    written = torch.zeros(num_slots, dtype=torch.bool, device=device)
    written[slots[slots >= 0]] = True
    flat = cache.view(2, num_slots, -1)  # [2, num_slots, Hkv * D]
    assert flat[:, ~written].isnan().all(), "a padding token or an unused slot was written"
    assert not flat[:, written].isnan().any(), "a token's slot was left unwritten"
    if dtype == cache_dtype:
        torch.testing.assert_close(cache, want, rtol=0, atol=0, equal_nan=True)  # a pure copy
    else:
        _close(flat[:, written], want.view(2, num_slots, -1)[:, written])


# ---------------------------------------------------------------------------------------------
# rope_write_kv (RoPE fused with the KV-cache write)


@pytest.mark.parametrize(
    ("device", "num_tokens", "num_heads", "num_kv_heads", "head_dim", "block_size"),
    cases(
        cpu=[(6, 4, 2, 64, 2), (5, 4, 1, 80, 4), (3, 2, 2, 96, 1)],
        gpu=[(300, 32, 8, 128, 16), (65, 32, 32, 80, 16), (1, 32, 32, 128, 16),
             (129, 16, 2, 96, 32)],
    ),
)  # fmt: skip
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_write_kv(triton_ops, gen, device, num_tokens, num_heads, num_kv_heads, head_dim,
                       block_size, dtype):  # fmt: skip
    """One kernel: the rotated q out, the rotated k and v in their cache slots, padding tokens
    (slot -1) rotated but not written, every other slot untouched."""
    max_position, num_slots = 64, 2 * num_tokens + block_size
    num_blocks = -(-num_slots // block_size)
    num_slots = num_blocks * block_size
    qkv = _randn(gen, num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype,
                 device=device)  # the qkv projection's output, split into strided views
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim], dim=-1)
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in (q, k, v))
    positions = torch.randint(max_position, (num_tokens,), generator=gen).to(device)
    table = _randn(gen, max_position, head_dim, device=device)
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[1::3] = -1
    slots = slots.to(device)
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"),
                       dtype=dtype, device=device)  # fmt: skip
    want_cache = cache.clone()

    q_out, made = _poisoned(triton_ops.rope_write_kv, q, k, v, positions, table, cache, slots)
    _assert_outputs_are([q_out], made)
    q_want = reference.rope_write_kv(q, k, v, positions, table, want_cache, slots)
    _close(q_out, q_want)
    written = torch.zeros(num_slots, dtype=torch.bool, device=device)
    written[slots[slots >= 0]] = True
    flat, want_flat = cache.view(2, num_slots, -1), want_cache.view(2, num_slots, -1)
    assert flat[:, ~written].isnan().all(), "a padding token or an unused slot was written"
    assert not flat[:, written].isnan().any(), "a token's slot was left unwritten"
    _close(flat[0, written], want_flat[0, written])  # rotated k
    torch.testing.assert_close(flat[1, written], want_flat[1, written], rtol=0, atol=0)  # v


# ---------------------------------------------------------------------------------------------
# dispatch and layers


@interp_only
def test_dispatch_and_layers_resolve_once(triton_ops, gen, monkeypatch):
    """mmkernels.get hands out the Triton ops when forced; a layer resolves its op at first forward
    and keeps it, so later environment changes do not reach the hot path."""
    monkeypatch.setenv("MMSERVE_KERNELS", "triton")
    for op in ("rms_norm", "silu_and_mul", "apply_rope", "write_kv_cache"):
        assert mmkernels.get(op, "cpu") is getattr(triton_ops, op)
    norm, act = RMSNorm(64, eps=1e-6), SiluAndMul()
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), head_dim=64, max_position=16)
    norm.weight.data = _randn(gen, 64)
    x = _randn(gen, 3, 64)  # [T, hidden]
    q, k = _randn(gen, 3, 4, 64), _randn(gen, 3, 2, 64)  # [T, H, D]
    positions = torch.tensor([0, 5, 15])
    _close(norm(x), reference.rms_norm(x, norm.weight, 1e-6))
    _close(act(x), reference.silu_and_mul(x))
    for got, want in zip(
        rope(positions, q, k), reference.apply_rope(q, k, positions, rope.cos_sin_cache)
    ):
        _close(got, want)
    resolved = (norm._rms_norm.fn, act._silu_and_mul.fn, rope._apply_rope.fn)
    assert resolved == (triton_ops.rms_norm, triton_ops.silu_and_mul, triton_ops.apply_rope)
    monkeypatch.setenv("MMSERVE_KERNELS", "reference")
    norm(x)
    act(x)
    rope(positions, q, k)
    assert (norm._rms_norm.fn, act._silu_and_mul.fn, rope._apply_rope.fn) == resolved


def test_reference_ops_override_one_op(monkeypatch):
    """MMSERVE_REFERENCE_OPS keeps the named ops on the reference where Triton would run."""
    monkeypatch.setenv("MMSERVE_KERNELS", "triton")
    monkeypatch.setenv("MMSERVE_REFERENCE_OPS", "linear,rms_norm")
    assert mmkernels.get("linear", "cpu") is reference.linear
    assert mmkernels.get("rms_norm", "cpu") is reference.rms_norm
    assert mmkernels.get("silu_and_mul", "cpu") is not reference.silu_and_mul


def test_layers_on_cpu_use_the_reference(gen, monkeypatch):
    # CPU serving stays bit-identical to the reference unless Triton is forced.
    monkeypatch.delenv("MMSERVE_KERNELS", raising=False)
    norm, act = RMSNorm(40, eps=1e-6), SiluAndMul()
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), head_dim=16, max_position=8)
    norm.weight.data = _randn(gen, 40)
    x, res = _randn(gen, 3, 40), _randn(gen, 3, 40)  # [T, hidden]
    q, k, positions = _randn(gen, 3, 2, 16), _randn(gen, 3, 1, 16), torch.tensor([1, 0, 7])
    for got, want in [
        (norm(x, res), reference.rms_norm(x, norm.weight, 1e-6, res)),
        ((act(x),), (reference.silu_and_mul(x),)),
        (rope(positions, q, k), reference.apply_rope(q, k, positions, rope.cos_sin_cache)),
    ]:
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    resolved = (norm._rms_norm.fn, act._silu_and_mul.fn, rope._apply_rope.fn)
    assert resolved == (reference.rms_norm, reference.silu_and_mul, reference.apply_rope)
