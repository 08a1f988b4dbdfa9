"""SegmentPlan's batched block-diagonal attention equals one SDPA per segment, for equal and
mixed lengths in any order, and no row sees another segment."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from encoder_worker.models.segments import SegmentPlan


def per_segment(q, k, v, seqlens):
    outs = [F.scaled_dot_product_attention(a.transpose(0, 1), b.transpose(0, 1),
                                           c.transpose(0, 1)).transpose(0, 1)
            for a, b, c in zip(q.split(seqlens), k.split(seqlens), v.split(seqlens))]
    return torch.cat(outs)


@pytest.mark.parametrize("seqlens", [[7], [4, 4, 4], [16, 3, 16, 1, 3, 16], [2, 9]])
def test_plan_equals_one_sdpa_per_segment(seqlens):
    gen = torch.Generator().manual_seed(len(seqlens))
    q, k, v = (torch.randn(sum(seqlens), 3, 8, generator=gen) for _ in range(3))
    plan = SegmentPlan(seqlens, torch.device("cpu"))
    assert len(plan.groups) == len(set(seqlens))
    torch.testing.assert_close(plan.attention(q, k, v), per_segment(q, k, v, seqlens),
                               atol=1e-6, rtol=1e-6)


def test_segments_do_not_see_each_other():
    seqlens = [5, 3, 5]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(13, 2, 4, generator=gen) for _ in range(3))
    plan = SegmentPlan(seqlens, torch.device("cpu"))
    base = plan.attention(q, k, v)
    v2 = v.clone()
    v2[5:8] += 10.0  # only the middle segment's values move
    moved = plan.attention(q, k, v2)
    torch.testing.assert_close(moved[:5], base[:5])
    torch.testing.assert_close(moved[8:], base[8:])
    assert (moved[5:8] - base[5:8]).abs().min() > 1.0


def test_plan_checks_its_rows():
    with pytest.raises(ValueError, match=">= 1"):
        SegmentPlan([3, 0], torch.device("cpu"))
    with pytest.raises(ValueError, match="covers 6 rows"):
        SegmentPlan([3, 3], torch.device("cpu")).attention(*(torch.zeros(5, 1, 2),) * 3)
