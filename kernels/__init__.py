"""Decoder hot-path kernels. Each has a pure-torch reference in `kernels.reference`.

CPU serving uses the references; Triton versions with the same signatures come later.
"""

from __future__ import annotations

from kernels.reference import (
    apply_rope,
    paged_attention,
    rms_norm,
    silu_and_mul,
    write_kv_cache,
)

__all__ = ["apply_rope", "paged_attention", "rms_norm", "silu_and_mul", "write_kv_cache"]
