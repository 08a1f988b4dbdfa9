"""Programmatic dependent launch (Hopper and later) for the decode path's Triton kernels.

A batch-1 decode step of a 7B is ~200 kernels back to back, each of which, launched the plain
way, starts only once the one before it has finished and flushed: every boundary leaves the
GPU idle for the next grid's launch and ramp. With PDL a running kernel tells the scheduler
that the next may launch (`gdc_launch_dependents`), so the next grid's programs become
resident while this one's last programs still run; each waits (`gdc_wait`) for the previous
grid to complete and flush before it reads anything. The GEMV spends that wait pulling its
first weight tiles into L2 (weights no kernel writes), so its loop starts on warm lines.

The trigger comes after the wait: a kernel lets its successor in only once it runs itself.
Triggered first (measured on the H200, `bench/results/gpu_h200_2026-12-02_s17/`), each
resident-but-waiting grid let the next one in too, a cascade of waiting programs that held
the SMs' registers and shared memory: a batch-1 step took 4.36 ms against 3.85 without PDL.

Every kernel that launches with PDL waits before its first read of a previous kernel's output
and before its first write, so completion still chains: a grid cannot finish before the one
before it did. Kernels launched without it (torch's, cuBLAS) keep the plain full dependency on
their predecessor. CUDA-graph capture keeps the launch attribute (programmatic edges).

Off on CPU and under the interpreter; on the GPU `MMSERVE_PDL=0` turns it off and
`MMSERVE_PDL=noprefetch` keeps it without the GEMV's prefetch (A/B).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _device_supports(index: int) -> bool:
    return (torch.cuda.get_device_capability(index)[0] >= 9
            and hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda,
                                                               "gdc_launch_dependents"))


def _mode() -> str:
    return os.environ.get("MMSERVE_PDL", "1")


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL."""
    if t.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or _mode() == "0":
        return False
    return _device_supports(t.device.index if t.device.index is not None
                            else torch.cuda.current_device())


def launch_args(t: torch.Tensor) -> dict[str, bool]:
    """The kernel's PDL constexpr and Triton's launch option, for ``t``'s device."""
    on = enabled(t)
    return {"PDL": on, "launch_pdl": on}


def prefetch_weights(t: torch.Tensor) -> bool:
    """Whether a GEMV prefetches its first weight tiles while it waits (MMSERVE_PDL=noprefetch:
    PDL without it)."""
    return enabled(t) and _mode() != "noprefetch"


@triton.jit
def wait_then_trigger(PDL: tl.constexpr):
    """Wait for the previous kernel, then let the next one launch: a kernel's first statement
    (nothing before it may read another kernel's output or write anything)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Pull the 128-byte lines at ``ptrs`` (valid addresses) into L2; nothing waits for it."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)
