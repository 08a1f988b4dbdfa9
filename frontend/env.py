"""Every environment variable mmserve reads, in one place (prefix MMSERVE_).

Where vLLM has the same knob, its ``VLLM_`` name is honoured when the ``MMSERVE_`` one is unset,
so a deployment moving over keeps its settings.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("MMSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mmserve"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_level() -> str:
    return os.environ.get("MMSERVE_LOG_LEVEL", "INFO").upper()


def engine_dead_after_s() -> float:
    """No heartbeat for this long => the engine is considered dead (health 503, requests fail)."""
    return float(os.environ.get("MMSERVE_ENGINE_TIMEOUT", "1.0"))


def _vllm_compatible(name: str, default: str) -> str:
    """``MMSERVE_<name>``, else vLLM's ``VLLM_<name>``, else ``default``."""
    for prefix in ("MMSERVE_", "VLLM_"):
        value = os.environ.get(prefix + name)
        if value is not None and value.strip():
            return value
    return default


def _positive_float(name: str, default: str) -> float:
    raw = _vllm_compatible(name, default)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"MMSERVE_{name} (or VLLM_{name}): not a number: {raw!r}") from None
    if not value > 0:
        raise ValueError(f"MMSERVE_{name} (or VLLM_{name}) must be > 0, got {raw!r}")
    return value


def image_fetch_timeout_s() -> float:
    """Total time allowed to fetch one http(s) image, redirects included."""
    return _positive_float("IMAGE_FETCH_TIMEOUT", "5")


def video_fetch_timeout_s() -> float:
    return _positive_float("VIDEO_FETCH_TIMEOUT", "30")


def audio_fetch_timeout_s() -> float:
    return _positive_float("AUDIO_FETCH_TIMEOUT", "10")


def encoder_dead_after_s() -> float:
    """No heartbeat from an encoder for this long => its in-flight items move to another one.
    Only for a process stuck with its socket up: a dead process or an unreachable host drops its
    connection first (the pool's socket monitor, well under 0.5 s). 5 beats, like the engine's."""
    return float(os.environ.get("MMSERVE_ENCODER_TIMEOUT", "1.0"))


def debug_slow_step_s() -> float:
    """Fault injection, for tests only (off by default): the engine's first step that runs a
    request sleeps this many seconds first, like a first compile, to test that /health says
    "busy" and nothing fails meanwhile. Read by `mmserve llm-worker` (and so by `serve`)."""
    return float(os.environ.get("MMSERVE_DEBUG_SLOW_STEP_S") or 0)


def timeline_dir() -> str | None:
    """Where every role records its request timeline (protocol/timeline.py; off when unset):
    `bench/ttft.py --timeline` sets it for the server it starts."""
    return os.environ.get("MMSERVE_TIMELINE") or None
