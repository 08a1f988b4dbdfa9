"""Media geometry (protocol/geometry): the registry, the wire form, LLaVA's fixed geometry, and
the frontend's and the encoder's counts coming from it (one source)."""

from __future__ import annotations

import json

import msgspec
import pytest

from protocol.geometry import ItemGeometry, load_geometry
from protocol.geometry.llava import LlavaGeometry

LLAVA = {"architectures": ["LlavaForConditionalGeneration"],
         "vision_config": {"image_size": 336, "patch_size": 14}}


def test_meta_round_trips_through_msgspec():
    g = ItemGeometry(12, (1, 4, 12), (56, 168))
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(g.to_meta()))
    assert ItemGeometry.from_meta(wire) == g
    assert ItemGeometry.from_meta(ItemGeometry(5).to_meta()) == ItemGeometry(5)


def test_llava_is_fixed():
    g = LlavaGeometry(LLAVA, {})
    assert g.fixed_image == g.image(1000, 10) == ItemGeometry(576, None, (336, 336))
    assert LlavaGeometry({**LLAVA, "vision_feature_select_strategy": "full"}, {}).fixed_image \
        .num_tokens == 577  # CLS kept
    crop = LlavaGeometry(LLAVA, {"crop_size": {"height": 168, "width": 112}})
    assert crop.image(5, 5) == ItemGeometry(12 * 8, None, (168, 112))
    with pytest.raises(ValueError, match="select_strategy"):
        LlavaGeometry({**LLAVA, "vision_feature_select_strategy": "cls"}, {})


def test_registry(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAVA))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"crop_size": 224}))
    assert load_geometry(tmp_path).fixed_image.num_tokens == 256
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert load_geometry(tmp_path) is None


def test_frontend_and_encoder_count_from_it(tiny_llava):
    import torch

    from encoder_worker.models.llava import LlavaEncoder
    from frontend.models import load_placeholders

    geometry = load_geometry(tiny_llava)
    encoder = LlavaEncoder(tiny_llava, torch.device("cpu"), torch.float32)
    assert load_placeholders(tiny_llava).fixed_image_geometry == geometry.fixed_image
    assert encoder.num_tokens(7, 9) == geometry.fixed_image.num_tokens
