"""Qwen2-VL and Qwen2.5-VL language models: the Qwen2 decoder with M-RoPE.

The layers are Qwen2's (`llama.py`); what differs is where tokens sit. Each token has three
positions (temporal, height, width), computed once per prompt from its media items' patch grids
(`grid_thw` in the item's meta, as the frontend's geometry sent it) by
`protocol/geometry/mrope.py`, and the rotary frequencies turn in three sections, one per position
row (`layers/rope.py`, from the config's `mrope_section`). The checkpoint's vision tower belongs
to encoder_worker/; the Llama loader skips its `visual.*` weights.
"""

from __future__ import annotations

import copy

import numpy as np

from llm_worker.input_batch import PositionScheme
from llm_worker.layers.rope import rope_parameters
from llm_worker.models.llama import Qwen2ForCausalLM
from protocol.geometry.mrope import MediaSpan, mrope_positions
from protocol.messages import MMItem

# What transformers' Qwen2-VL rotary falls back to when a config names no sections (head_dim 128).
_DEFAULT_MROPE_SECTION = [16, 24, 24]


class Qwen2VLPositions(PositionScheme):
    """M-RoPE positions from the items' grids; a video's temporal index steps by one grid."""

    rows = 3
    time_scaled = False  # Qwen2.5-VL: a video's temporal index counts time

    def __init__(self, hf_config):
        vision = hf_config.vision_config
        self.merge = int(vision.spatial_merge_size)
        self.tokens_per_second = float(vision.tokens_per_second) if self.time_scaled else None

    def prompt_positions(self, num_prompt_tokens: int,
                         mm_items: list[MMItem]) -> tuple[np.ndarray, int]:
        spans = [_span(item) for item in mm_items]
        positions, delta = mrope_positions(num_prompt_tokens, spans, self.merge,
                                           self.tokens_per_second)
        return np.ascontiguousarray(positions.T), delta  # token-major, as the input batch is


class Qwen2_5_VLPositions(Qwen2VLPositions):
    time_scaled = True


def _span(item: MMItem) -> MediaSpan:
    grid = item.meta.get("grid_thw")
    if not grid:
        raise ValueError(f"media item {item.key} has no grid_thw in its meta: M-RoPE places "
                         "the item's tokens by its patch grid")
    # A video sent without its timing spans one second per grid step, as transformers assumes.
    seconds = item.meta.get("seconds_per_grid_t", 1.0) if item.modality == "video" else None
    return MediaSpan(item.offset, item.length, tuple(grid), seconds)


def _with_mrope_section(cfg):
    """The text config with its M-RoPE sections named (transformers' default if it has none),
    so the rotary embedding built from it is M-RoPE."""
    params = rope_parameters(cfg)
    if params.get("mrope_section") is not None:
        return cfg
    cfg = copy.copy(cfg)
    cfg.rope_parameters = {**params, "mrope_section": _DEFAULT_MROPE_SECTION}
    return cfg


class Qwen2VLForConditionalGeneration(Qwen2ForCausalLM):
    """Qwen2-VL's language model: Qwen2 (q/k/v bias) over [T, 3] M-RoPE positions."""

    position_scheme: type[PositionScheme] = Qwen2VLPositions

    def __init__(self, hf_config, **kwargs):
        super().__init__(_with_mrope_section(hf_config), **kwargs)


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL's language model: Qwen2-VL's, with videos placed in time."""

    position_scheme = Qwen2_5_VLPositions
