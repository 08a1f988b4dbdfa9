"""mmserve's stateless API tier, and the in-process Python API.

    from frontend import LLM, SamplingParams
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from frontend.offline.llm import LLM
    from frontend.outputs import CompletionOutput, RequestOutput
    from frontend.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]

_LAZY = {
    "LLM": "frontend.offline.llm",
    "SamplingParams": "frontend.sampling_params",
    "RequestOutput": "frontend.outputs",
    "CompletionOutput": "frontend.outputs",
}


def __getattr__(name: str) -> Any:
    # Lazy: the CLI and the HTTP tier import `frontend.*` without loading the engine core.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'frontend' has no attribute {name!r}")
