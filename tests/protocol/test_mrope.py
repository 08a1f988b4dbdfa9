"""M-RoPE positions of a prompt equal transformers' `get_rope_index` (Qwen2-VL, Qwen2.5-VL):
several images of different grids, text between, media at the start and the end, videos."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

from protocol.geometry.mrope import MediaSpan, mrope_positions

MERGE = 2
TOKEN_TYPE = {"image": 1, "video": 2}  # transformers' mm_token_type_ids


def hf_rope_index(model_cls, prompt_len, items, tokens_per_second=None):
    """transformers' positions and delta for the prompt, its method run on a bare config."""
    vision = SimpleNamespace(spatial_merge_size=MERGE, tokens_per_second=tokens_per_second)
    host = SimpleNamespace(config=SimpleNamespace(vision_config=vision))
    host.get_vision_position_ids = model_cls.get_vision_position_ids.__get__(host)
    types = torch.zeros(1, prompt_len, dtype=torch.int64)
    grids = {"image": [], "video": []}
    seconds = []
    for modality, span in items:
        types[0, span.offset : span.offset + span.length] = TOKEN_TYPE[modality]
        grids[modality].append(span.grid_thw)
        if modality == "video":
            seconds.append(span.seconds_per_grid_t)
    kwargs = {f"{m}_grid_thw": torch.tensor(g) if g else None for m, g in grids.items()}
    if model_cls is Qwen2_5_VLModel and seconds:
        kwargs["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
    pos, delta = model_cls.get_rope_index(host, torch.zeros(1, prompt_len, dtype=torch.int64),
                                          types, **kwargs)
    return pos[:, 0].numpy(), int(delta)


def image(offset, t, h, w):
    return "image", MediaSpan(offset, t * (h // MERGE) * (w // MERGE), (t, h, w))


def video(offset, t, h, w, seconds):
    return "video", MediaSpan(offset, t * (h // MERGE) * (w // MERGE), (t, h, w), seconds)


# Media items are separated by text: transformers groups adjacent runs of one modality into one
# item (real prompts put vision start/end tokens around each). Temporal indices stay within
# max(h, w) / merge, where transformers places the following text as Qwen's reference does (see
# the long-video test below).
QWEN2_VL = {  # name -> (prompt_len, items)
    "two images, text between": (24, [image(3, 1, 4, 6), image(12, 1, 6, 4)]),
    "image at start and end": (20, [image(0, 1, 4, 6), image(8, 1, 2, 2), image(14, 1, 4, 6)]),
    "tall and wide": (40, [image(2, 1, 2, 16), image(11, 1, 12, 2), image(20, 1, 8, 8)]),
    "video and image": (40, [video(1, 2, 4, 6, None), image(16, 1, 6, 6), video(27, 2, 4, 4, None)]),
    "image only": (6, [image(0, 1, 4, 6)]),
}


@pytest.mark.parametrize("case", QWEN2_VL)
def test_qwen2_vl_equals_transformers(case):
    prompt_len, items = QWEN2_VL[case]
    got = mrope_positions(prompt_len, [s for _, s in items], MERGE)
    want, delta = hf_rope_index(Qwen2VLModel, prompt_len, items)
    assert got.positions.dtype == np.int64 and got.positions.shape == (3, prompt_len)
    np.testing.assert_array_equal(got.positions, want)
    assert got.delta == delta


QWEN2_5_VL = {  # (prompt_len, items, tokens_per_second)
    "images are not time-scaled": (24, [image(3, 1, 4, 6), image(12, 1, 6, 4)], 4),
    "video, one grid step per second": (30, [video(2, 2, 4, 4, 0.5), image(12, 1, 4, 6)], 2),
    "video, fractional steps": (60, [video(0, 3, 8, 8, 0.75), image(50, 1, 4, 4)], 2),
    "two videos": (50, [video(1, 2, 6, 6, 1.0), video(25, 2, 8, 4, 0.5)], 2),
}


@pytest.mark.parametrize("case", QWEN2_5_VL)
def test_qwen2_5_vl_equals_transformers(case):
    prompt_len, items, tps = QWEN2_5_VL[case]
    got = mrope_positions(prompt_len, [s for _, s in items], MERGE, tokens_per_second=tps)
    want, delta = hf_rope_index(Qwen2_5_VLModel, prompt_len, items, tokens_per_second=tps)
    np.testing.assert_array_equal(got.positions, want)
    assert got.delta == delta


def test_text_after_a_long_video_continues_past_its_last_frame():
    """Text after a video whose temporal index outruns its height and width starts at the
    video's largest position + 1, as Qwen's reference code and vLLM place it (transformers 5.3+
    restarts it at start + max(h, w) / merge, below the video's last frames, while its decode
    delta still counts from the largest position)."""
    span = MediaSpan(1, 4 * 2 * 2, (4, 4, 4), 2.0)  # 4 grid steps, 2 s each, 2 tokens/s: 0,4,8,12
    got = mrope_positions(20, [span], MERGE, tokens_per_second=2)
    assert got.positions[0, 1:17].tolist() == [1] * 4 + [5] * 4 + [9] * 4 + [13] * 4
    assert got.positions[1, 1:5].tolist() == [1, 1, 2, 2]
    assert got.positions[2, 1:5].tolist() == [1, 2, 1, 2]
    np.testing.assert_array_equal(got.positions[:, 17:], np.tile([14, 15, 16], (3, 1)))
    assert got.delta == 17 - 20  # token 20, the first generated one, at 17
    # Qwen2-VL ignores time: its grid steps are 0..3.
    got = mrope_positions(20, [span], MERGE)
    assert got.positions[0, 13:17].tolist() == [4] * 4 and got.positions[0, 17] == 5


def test_text_only_is_1d():
    got = mrope_positions(7, [], MERGE)
    np.testing.assert_array_equal(got.positions, np.tile(np.arange(7), (3, 1)))
    assert got.delta == 0


@pytest.mark.parametrize("items", [
    [MediaSpan(2, 5, (1, 4, 6))],  # 6 tokens in the grid
    [MediaSpan(2, 6, (1, 4, 6)), MediaSpan(6, 6, (1, 6, 4))],  # overlap
    [MediaSpan(8, 6, (1, 4, 6))],  # past the prompt's end
    [MediaSpan(0, 6, (1, 3, 8))],  # not divisible by the merge
])
def test_inconsistent_items_are_refused(items):
    with pytest.raises(ValueError):
        mrope_positions(12, items, MERGE)
