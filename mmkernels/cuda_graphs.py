"""CUDA-graph capture, shared by the decoder's step graphs and the encoder's tower graphs."""

from __future__ import annotations

from collections.abc import Callable

import torch


def capture_graph(run: Callable[[], torch.Tensor], pool) -> tuple[torch.cuda.CUDAGraph,
                                                                   torch.Tensor]:
    """Capture ``run`` into a graph in memory pool ``pool``; returns it and its output tensor
    (valid until the next replay of any graph in the pool). ``run`` goes once eagerly first
    (Triton compiles, cuBLAS picks its kernels) on a side stream, as capture requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return graph, out
