"""EncoderConfig validates itself and resolves auto device/dtype."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from encoder_worker.config import EncoderConfig


def test_defaults_and_auto(tiny_llava):
    cfg = EncoderConfig(tiny_llava)
    assert cfg.store_bytes == 2 << 30 and cfg.min_image_side == 2
    cuda = torch.cuda.is_available()
    assert cfg.resolved_device() == ("cuda" if cuda else "cpu")
    assert cfg.resolved_dtype() == ("bfloat16" if cuda else "float32")
    assert EncoderConfig(tiny_llava, device="cpu", dtype="float16").resolved_dtype() == "float16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_batch_items = 3  # type: ignore[misc]


@pytest.mark.parametrize("bad", [
    {"dtype": "int8"}, {"device": "tpu"}, {"store_bytes": -1}, {"max_batch_items": 0},
    {"max_wait_ms": -1}, {"decode_threads": 0}, {"max_image_pixels": 0}, {"min_image_side": 0},
    {"heartbeat_s": 0},
])
def test_rejects_bad_values(tiny_llava, bad):
    with pytest.raises(ValueError):
        EncoderConfig(tiny_llava, **bad)


def test_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        EncoderConfig(str(tmp_path))
