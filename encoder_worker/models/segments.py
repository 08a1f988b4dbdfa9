"""Block-diagonal attention over packed patches, batched by segment length.

A packed vision forward holds many images (or frames, or Qwen2.5-VL windows) back to back, and
each attends only within itself. One SDPA call per segment is simple but launch-bound on a GPU:
a 1280x720 image alone is ~230 Qwen2.5-VL windows, so a 32-block tower made ~7,000 calls. Most
segments share a length (every full window, every frame of a video, images of one size), so the
plan here gathers all segments of one length into one [B, heads, L, head_dim] batch: one SDPA
per distinct length and layer, plus a gather and a scatter. The plan is built once per forward
and reused by every block; no [N, N] mask is ever built.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class _Group(NamedTuple):
    length: int  # patches per segment
    count: int  # segments of this length
    rows: torch.Tensor | None  # [count * length] int64 packed rows, in segment order; None: all


class SegmentPlan:
    def __init__(self, seqlens: list[int], device: torch.device):
        if any(n < 1 for n in seqlens):
            raise ValueError(f"segment lengths must be >= 1, got {seqlens}")
        self.num_rows = sum(seqlens)
        starts: dict[int, list[int]] = {}
        offset = 0
        for n in seqlens:
            starts.setdefault(n, []).append(offset)
            offset += n
        if len(starts) == 1:  # every segment the same length: a view, no gather
            (n, s), = starts.items()
            self.groups = [_Group(n, len(s), None)]
            return
        self.groups = []
        for n, s in starts.items():
            rows = (torch.tensor(s)[:, None] + torch.arange(n)[None, :]).flatten()
            self.groups.append(_Group(n, len(s), rows.to(device)))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [N, heads, head_dim] -> [N, heads, head_dim], each row attending to the rows
        of its own segment only."""
        if q.shape[0] != self.num_rows:
            raise ValueError(f"the plan covers {self.num_rows} rows, got {q.shape[0]}")
        out = None if self.groups[0].rows is None else torch.empty_like(q)
        for g in self.groups:
            def batch(t: torch.Tensor, g: _Group = g) -> torch.Tensor:  # [B, heads, L, hd]
                t = t if g.rows is None else t[g.rows]
                return t.view(g.count, g.length, *t.shape[1:]).transpose(1, 2)

            o = F.scaled_dot_product_attention(batch(q), batch(k), batch(v))
            o = o.transpose(1, 2).reshape(g.count * g.length, *q.shape[1:])
            if out is None:
                return o
            out[g.rows] = o
        return out
