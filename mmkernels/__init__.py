"""Decoder hot-path kernels: one dispatch table picks the pure-torch reference or the Triton
kernel for a device. Layers ask ``mmkernels.get(name, device)`` once and never import an
implementation module directly.

Every op has its reference in ``mmkernels.reference`` (the semantics, and what CPU serving runs)
and, where one exists, a Triton kernel with the same signature. Values are import paths, so
importing ``kernels`` loads neither Triton nor a kernel module until one is asked for.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

from mmkernels.reference import (
    apply_rope,
    linear,
    norm_linear,
    norm_linear_of,
    paged_attention,
    rms_norm,
    rope_write_kv,
    rope_write_kv_of,
    silu_and_mul,
    silu_mul_linear,
    silu_mul_linear_of,
    write_kv_cache,
)

OPS = ("rms_norm", "silu_and_mul", "apply_rope", "write_kv_cache", "paged_attention", "linear",
       "norm_linear", "silu_mul_linear", "rope_write_kv")

# op -> "module:function" of its Triton kernel (same signature as the reference).
TRITON: dict[str, str] = {
    "rms_norm": "mmkernels.triton_ops:rms_norm",
    "silu_and_mul": "mmkernels.triton_ops:silu_and_mul",
    "apply_rope": "mmkernels.triton_ops:apply_rope",
    "write_kv_cache": "mmkernels.triton_ops:write_kv_cache",
    "paged_attention": "mmkernels.triton_attention:paged_attention",
    # A GEMV for decode's few rows (<= 16; more go to cuBLAS): 3-8% faster than cuBLAS's M=1
    # path at every 7B projection on the H200 (bench/gemv_sweep.py).
    "linear": "mmkernels.triton_gemv:linear",
    # The same GEMV with the op before it in its prologue: one launch instead of two per layer.
    "norm_linear": "mmkernels.triton_gemv:norm_linear",
    "silu_mul_linear": "mmkernels.triton_gemv:silu_mul_linear",
    "rope_write_kv": "mmkernels.triton_ops:rope_write_kv",
}

# fused op -> (the ops it fuses, how to compose them). When the fused kernel is off, or any of
# its parts is kept on the reference, the op is its parts, each resolved for the device on its
# own: MMSERVE_REFERENCE_OPS=linear still means "projections on cuBLAS, norms in Triton".
FUSED: dict[str, tuple[tuple[str, ...], Callable[..., Callable[..., Any]]]] = {
    "norm_linear": (("rms_norm", "linear"), norm_linear_of),
    "silu_mul_linear": (("silu_and_mul", "linear"), silu_mul_linear_of),
    "rope_write_kv": (("apply_rope", "write_kv_cache"), rope_write_kv_of),
}


def kept_on_reference(name: str) -> bool:
    """Whether MMSERVE_REFERENCE_OPS names ``name``: an op (or a fusion such as
    "decode_attention") the benchmarks switch off for an A/B of one kernel."""
    return name in os.environ.get("MMSERVE_REFERENCE_OPS", "").split(",")


def use_triton(device: Any, name: str | None = None) -> bool:
    """Triton on CUDA devices; on CPU only when forced (tests run kernels under the interpreter
    with MMSERVE_KERNELS=triton TRITON_INTERPRET=1). MMSERVE_REFERENCE_OPS="linear,..." keeps
    the named ops on the reference everywhere (the benchmarks' A/B of one kernel)."""
    if name is not None and kept_on_reference(name):
        return False
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
    parts, compose = FUSED.get(name, ((), None))
    if path is None or not all(use_triton(device, op) for op in (name, *parts)):
        resolved = [get(op, device) for op in parts]
        if compose is None or all(fn is globals()[op] for fn, op in zip(resolved, parts)):
            return globals()[name]
        return compose(*resolved)
    module, fn = path.split(":")
    return getattr(importlib.import_module(module), fn)


class DeviceOp:
    """Op ``name`` for the device of its first argument, resolved when that device changes (a
    module's first forward), not per call: `get` reads the environment."""

    def __init__(self, name: str):
        self.name, self.device, self.fn = name, None, globals()[name]

    def __call__(self, x: Any, *args: Any) -> Any:
        if x.device != self.device:
            self.device, self.fn = x.device, get(self.name, x.device)
        return self.fn(x, *args)


__all__ = ["FUSED", "OPS", "TRITON", "DeviceOp", "apply_rope", "get", "kept_on_reference",
           "linear", "norm_linear",
           "paged_attention", "rms_norm", "rope_write_kv", "silu_and_mul", "silu_mul_linear",
           "use_triton", "write_kv_cache"]
