"""Batch moves between host and device: the pinned paths give back exactly what went in, and
what comes down owns its memory (the store must not keep a whole batch alive)."""

from __future__ import annotations

import pytest
import torch

from encoder_worker.transfer import HostCopier, PixelUploader


def _images(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 8, 8, generator=g) for _ in range(n)]  # each [3, H, W] float32


def test_cpu_upload_is_a_stack_and_download_owns_memory():
    images = _images(3, 0)
    batch = PixelUploader(torch.device("cpu"))(images)
    assert torch.equal(batch, torch.stack(images))
    outs = HostCopier()(list(batch.unbind(0)))
    assert all(torch.equal(o, i) for o, i in zip(outs, images))
    assert all(o.untyped_storage().nbytes() == o.nbytes for o in outs)


@pytest.mark.gpu
def test_cuda_pinned_paths_round_trip():
    up, down = PixelUploader(torch.device("cuda")), HostCopier()
    for n, seed in ((4, 0), (2, 1), (5, 2)):  # shrink, then grow the staging buffers
        images = _images(n, seed)
        batch = up(images)
        assert batch.device.type == "cuda" and batch.dtype == torch.float32
        # Overwrite the staging buffer at once: the earlier upload must have read it already.
        later = up(_images(n, seed + 10))
        assert torch.equal(batch.cpu(), torch.stack(images))
        outs = down(list(batch.to(torch.bfloat16).unbind(0)))
        assert all(o.device.type == "cpu" and o.untyped_storage().nbytes() == o.nbytes
                   for o in outs)
        assert all(torch.equal(o, i.to(torch.bfloat16)) for o, i in zip(outs, images))
        del later
