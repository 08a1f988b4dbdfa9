"""Qwen2-VL placeholders in the frontend: counts and grids from the probed size equal what
transformers' image processor makes of the same images, each image's pad token widens to its
own count, and an image known only by its uuid cannot be placed."""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from PIL import Image

from frontend.errors import RequestError
from frontend.models import load_placeholders, placeholder_texts
from frontend.models.qwen2_vl import Qwen2VLPlaceholders

SIZES = [(37, 90), (120, 50), (64, 64), (31, 200)]  # (width, height), odd ones included


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def test_counts_and_grids_match_transformers(tiny_qwen2_vl):
    ph = load_placeholders(tiny_qwen2_vl)
    assert isinstance(ph, Qwen2VLPlaceholders) and ph.fixed_image_geometry is None
    hf = transformers.Qwen2VLImageProcessorPil.from_pretrained(tiny_qwen2_vl)
    images = [_image(w, h, i) for i, (w, h) in enumerate(SIZES)]
    grids = hf(images=images, return_tensors="np")["image_grid_thw"].tolist()
    ours = [ph.image_geometry(w, h, "x") for w, h in SIZES]
    assert [list(g.grid_thw) for g in ours] == grids
    assert [g.num_tokens for g in ours] == [t * h * w // 4 for t, h, w in grids]
    assert len({g.num_tokens for g in ours}) > 1  # the sizes really differ


def test_expand_widens_each_pad_to_its_own_count(tiny_qwen2_vl):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_vl)
    ph = load_placeholders(tiny_qwen2_vl)
    text = placeholder_texts(ph, tok)["image"]
    assert text == "<|vision_start|><|image_pad|><|vision_end|>"
    ids = tok.encode(f"a {text} b {text} c", add_special_tokens=False)
    counts = [ph.num_image_tokens(w, h) for w, h in SIZES[:2]]
    out, spans = ph.expand(ids, counts, "messages")
    pad = ph.image_token_id
    assert [n for _, n in spans] == counts
    for (off, n), start in zip(spans, (ph.vision_start_token_id,) * 2):
        assert out[off - 1] == start and out[off:off + n] == [pad] * n
        assert out[off + n] == ph.vision_end_token_id
    assert len(out) == len(ids) - 2 + sum(counts)


def test_refusals(tiny_qwen2_vl):
    ph = load_placeholders(tiny_qwen2_vl)
    with pytest.raises(RequestError, match="aspect ratio") as e:
        ph.image_geometry(1, 300, "messages[0].content[1].image_url")
    assert e.value.param == "messages[0].content[1].image_url" and e.value.status == 400
