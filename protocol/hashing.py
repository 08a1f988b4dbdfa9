"""Keys for media items: the user's uuid, or a blake3 hash of the bytes and every kwarg that
changes the embedding (never model-agnostic request fields)."""

from __future__ import annotations

from typing import Any

import blake3
import msgspec

_KW_ENCODER = msgspec.json.Encoder(order="sorted")


def uuid_key(uuid: str) -> str:
    return f"uuid:{uuid}"


def content_key(data: bytes | memoryview, kwargs: dict[str, Any] | None = None) -> str:
    h = blake3.blake3()
    h.update(data)
    # Separate the kwargs from the payload so (bytes + kwargs) pairs can't collide by concatenation.
    h.update(b"\x00mmserve-kwargs\x00")
    h.update(_KW_ENCODER.encode(kwargs or {}))
    return f"blake3:{h.hexdigest()}"


def kwargs_tag(kwargs: dict[str, Any]) -> str:
    """A short stable name of ``kwargs`` (order-free), for keys that can't hash the bytes: a
    uuid key processed under other settings becomes ``uuid:<id>#kw:<tag>``."""
    return blake3.blake3(_KW_ENCODER.encode(kwargs)).hexdigest(length=8)


def hash_ints(parent: bytes | None, values: tuple[int, ...], extra: tuple[Any, ...] = ()) -> bytes:
    """Chained hash of a KV block: parent block hash + token ids + extra keys (e.g. mm keys)."""
    h = blake3.blake3(parent or b"")
    h.update(_KW_ENCODER.encode(values))
    if extra:
        h.update(_KW_ENCODER.encode(extra))
    return h.digest(length=16)
