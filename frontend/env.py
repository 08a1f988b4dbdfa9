"""Every environment variable mmserve reads, in one place (prefix MMSERVE_)."""

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


def heartbeat_interval_s() -> float:
    return float(os.environ.get("MMSERVE_HEARTBEAT_INTERVAL", "0.2"))


def engine_dead_after_s() -> float:
    """No heartbeat for this long => the engine is considered dead (health 503, requests fail)."""
    return float(os.environ.get("MMSERVE_ENGINE_TIMEOUT", "1.0"))


def image_fetch_timeout_s() -> float:
    """Total time allowed to fetch one http(s) image, redirects included."""
    return float(os.environ.get("MMSERVE_IMAGE_FETCH_TIMEOUT", "5"))


def encoder_dead_after_s() -> float:
    """No heartbeat from an encoder for this long => its in-flight items move to another one.
    Longer than the engine's: a false alarm costs a second encode of the same items."""
    return float(os.environ.get("MMSERVE_ENCODER_TIMEOUT", "3.0"))
