"""M-RoPE positions (Qwen2-VL, Qwen2.5-VL) of one prompt, from its media items' grids.

Every token gets three positions (temporal, height, width). A text token has the same value in
all three, one more than everything before it; a media item's tokens get their merged grid
indices (t, h / merge, w / merge), each offset by the position the item starts at, and the text
after an item continues from the item's largest position + 1. Generated tokens are text: token i
(0-based from the prompt's start) sits at i + delta in all three rows.

Qwen2.5-VL spaces a video's temporal index by time: grid step k sits at
floor(k * tokens_per_second * seconds_per_grid_t), so the temporal row counts absolute time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class MediaSpan(NamedTuple):
    """One media item of the prompt, as M-RoPE sees it."""

    offset: int  # first placeholder token
    length: int  # placeholder tokens: t * (h / merge) * (w / merge)
    grid_thw: tuple[int, int, int]  # patches (t, h, w) before the spatial merge
    seconds_per_grid_t: float | None = None  # a video's seconds per temporal grid step


class MRopePositions(NamedTuple):
    positions: np.ndarray  # int64 [3, prompt_len]: temporal, height, width
    delta: int  # generated token i sits at i + delta


def mrope_positions(prompt_len: int, items: Sequence[MediaSpan], spatial_merge_size: int,
                    tokens_per_second: float | None = None) -> MRopePositions:
    """The prompt's positions. ``tokens_per_second`` is Qwen2.5-VL's time scale (None for
    Qwen2-VL, whose temporal index steps by one grid); it applies to items with
    ``seconds_per_grid_t`` set. Raises ValueError when an item's grid does not match its
    length or the items overlap or leave the prompt."""
    out = np.empty((3, prompt_len), dtype=np.int64)
    nxt = 0  # the position the next text token takes
    cursor = 0  # first token not yet placed
    for item in sorted(items, key=lambda m: m.offset):
        if item.offset < cursor or item.offset + item.length > prompt_len:
            raise ValueError(f"media item at {item.offset} (+{item.length}) overlaps another "
                             f"or leaves the {prompt_len}-token prompt")
        text = item.offset - cursor
        out[:, cursor : item.offset] = np.arange(nxt, nxt + text)
        nxt += text
        grid = _item_grid(item, spatial_merge_size, tokens_per_second)  # [3, length]
        out[:, item.offset : item.offset + item.length] = grid + nxt
        nxt += int(grid.max()) + 1
        cursor = item.offset + item.length
    out[:, cursor:] = np.arange(nxt, nxt + prompt_len - cursor)
    nxt += prompt_len - cursor
    return MRopePositions(out, nxt - prompt_len)


def _item_grid(item: MediaSpan, merge: int, tokens_per_second: float | None) -> np.ndarray:
    """The item's (t, h, w) indices from 0, row-major over (t, h, w) as the tower emits its
    merged patches: int64 [3, t * h * w]."""
    t, h, w = (int(v) for v in item.grid_thw)
    if h % merge or w % merge:
        raise ValueError(f"grid {item.grid_thw} is not divisible by the merge size {merge}")
    h, w = h // merge, w // merge
    if t * h * w != item.length:
        raise ValueError(f"grid {item.grid_thw} (merge {merge}) makes {t * h * w} tokens, "
                         f"the item has {item.length}")
    steps = np.arange(t)
    if tokens_per_second is not None and item.seconds_per_grid_t is not None:
        # In float32 and truncated, as transformers computes it: a step that lands just below
        # an integer must round down the same way here.
        interval = np.float32(tokens_per_second) * np.float32(item.seconds_per_grid_t)
        steps = (steps.astype(np.float32) * interval).astype(np.int64)
    tt, hh, ww = np.meshgrid(steps, np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
