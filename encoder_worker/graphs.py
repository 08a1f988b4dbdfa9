"""CUDA graphs of the tower for small batches of fixed-size inputs.

At batch 1 a ViT-L tower is ~400 kernel launches for ~0.6 ms of GPU math; launched eagerly from
Python it took 8-12 ms on the H200 host (bench/encoder.py), which every fresh image pays in its
time to first token. Models whose preprocessed inputs all share one shape (LLaVA-1.5: [3, 336,
336]) declare it (`EncoderModel.graph_input_shape`); the tower and projector are then captured
for batches of 1, 2, 4 and 8, and a batch replays the smallest graph that holds it (extra rows
keep stale pixels: images never see each other in the tower). Larger batches are compute-bound
and run eagerly.
"""

from __future__ import annotations

import logging
import time

import torch

from encoder_worker.models.base import EncoderModel
from mmkernels.cuda_graphs import capture_graph

log = logging.getLogger(__name__)

GRAPH_BATCHES = (1, 2, 4, 8)


class TowerGraphs:
    def __init__(self, model: EncoderModel, input_shape: tuple[int, ...],
                 batches: tuple[int, ...] = GRAPH_BATCHES):
        self.model = model
        self.input_shape = tuple(input_shape)
        self.batches = sorted(batches)
        # The graphs read their inputs here, on the model's device, in the dtype preprocessing
        # makes (uint8 planes for LLaVA: the graph normalizes them).
        self.pixels = torch.zeros(self.batches[-1], *self.input_shape,
                                  dtype=model.graph_input_dtype(), device=model.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # [batch, num_tokens, hidden] each
        self.num_replays = 0

    @torch.inference_mode()
    def capture(self) -> float:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.batches):  # largest first: the smaller ones reuse its memory
            self.graphs[b], self.outputs[b] = capture_graph(
                lambda b=b: self.model.encode_batch(self.pixels[:b]), pool)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        log.info("captured tower graphs for batches %s in %.1f s",
                 ",".join(map(str, self.batches)), elapsed)
        return elapsed

    def encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """As `EncoderModel.encode`; the returned views live in graph memory until the next
        replay (the server copies them to the host before its next batch)."""
        n = pixel_values.shape[0]
        size = next((b for b in self.batches if b >= n), None)
        if (size is None or tuple(pixel_values.shape[1:]) != self.input_shape
                or pixel_values.dtype != self.pixels.dtype):
            return self.model.encode(pixel_values)
        with torch.inference_mode():
            self.pixels[:n].copy_(pixel_values)
            self.graphs[size].replay()
        self.num_replays += 1
        return list(self.outputs[size][:n].unbind(0))
