"""protocol/models.py is the one table of architectures: every role's registry is its column,
and every path in it imports the kind of class its role expects (so adding an architecture is
its model files plus one line there)."""

from __future__ import annotations

import importlib

import pytest

from protocol.models import MODELS, column


def _load(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def test_every_role_reads_its_column():
    from encoder_worker.models import ENCODER_REGISTRY
    from frontend.models import MEDIA_SLICES
    from llm_worker.models import DECODERS
    from protocol.geometry import GEOMETRY

    assert ENCODER_REGISTRY == column("encoder") and GEOMETRY == column("geometry")
    assert {a: s for a, s in MEDIA_SLICES.items() if s} == column("placeholders")
    assert set(MEDIA_SLICES) == set(DECODERS) == set(MODELS)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_paths_import_the_right_kinds(arch):
    from encoder_worker.models.base import EncoderModel
    from frontend.models import MediaPlaceholders
    from protocol.geometry import MediaGeometry

    parts = MODELS[arch]
    decoders = parts.decoder.values() if isinstance(parts.decoder, dict) else [parts.decoder]
    for path in decoders:
        assert hasattr(_load(path), "forward")
    media = (parts.geometry, parts.placeholders, parts.encoder)
    assert all(media) or not any(media), "a media model needs all three parts"
    if parts.geometry:
        assert issubclass(_load(parts.geometry), MediaGeometry)
        assert issubclass(_load(parts.placeholders), MediaPlaceholders)
        assert issubclass(_load(parts.encoder), EncoderModel)
