"""Decoder hot-path kernels: one dispatch table picks the pure-torch reference or the Triton
kernel for a device. Layers ask ``kernels.get(name, device)`` once and never import an
implementation module directly.

Every op has its reference in ``kernels.reference`` (the semantics, and what CPU serving runs)
and, where one exists, a Triton kernel with the same signature. Values are import paths, so
importing ``kernels`` loads neither Triton nor a kernel module until one is asked for.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

from kernels.reference import (
    apply_rope,
    linear,
    paged_attention,
    rms_norm,
    silu_and_mul,
    write_kv_cache,
)

OPS = ("rms_norm", "silu_and_mul", "apply_rope", "write_kv_cache", "paged_attention", "linear")

# op -> "module:function" of its Triton kernel (same signature as the reference).
TRITON: dict[str, str] = {
    "rms_norm": "kernels.triton_ops:rms_norm",
    "silu_and_mul": "kernels.triton_ops:silu_and_mul",
    "apply_rope": "kernels.triton_ops:apply_rope",
    "write_kv_cache": "kernels.triton_ops:write_kv_cache",
    "paged_attention": "kernels.triton_attention:paged_attention",
    # A GEMV for decode's few rows; the layers still call F.linear (cuBLAS) until
    # bench/gemv_sweep.py shows it faster on the GPU.
    "linear": "kernels.triton_gemv:linear",
}


def use_triton(device: Any) -> bool:
    """Triton on CUDA devices; on CPU only when forced (tests run kernels under the interpreter
    with MMSERVE_KERNELS=triton TRITON_INTERPRET=1)."""
    forced = os.environ.get("MMSERVE_KERNELS", "auto")
    if forced == "reference":
        return False
    if forced == "triton":
        return True
    return getattr(device, "type", str(device)).startswith("cuda")


def get(name: str, device: Any) -> Callable[..., Any]:
    """The implementation of op ``name`` for ``device``: Triton where registered, else reference.
    Resolve once (at load or first call), not per forward: it reads the environment."""
    if name not in OPS:
        raise KeyError(f"unknown kernel {name!r} (known: {', '.join(OPS)})")
    path = TRITON.get(name)
    if path is None or not use_triton(device):
        return globals()[name]
    module, fn = path.split(":")
    return getattr(importlib.import_module(module), fn)


__all__ = ["OPS", "TRITON", "apply_rope", "get", "linear", "paged_attention", "rms_norm",
           "silu_and_mul", "use_triton", "write_kv_cache"]
