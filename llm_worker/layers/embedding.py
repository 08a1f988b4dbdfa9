"""Vocab-parallel token embedding and LM head.

The vocabulary is split into tp_size contiguous ranges (padded so they divide evenly). A lookup
zeroes ids outside this rank's range and all-reduces; the LM head computes its range's logits and
all-gathers them, so every rank ends with the full vocab.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llm_worker.layers.linear import default_weight_loader


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, *, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.vocab_size, self.tp_rank, self.tp_size = vocab_size, tp_rank, tp_size
        self.vocab_per_rank = -(-vocab_size // tp_size)
        self.vocab_start = tp_rank * self.vocab_per_rank
        self.vocab_end = min(self.vocab_start + self.vocab_per_rank, vocab_size)
        # Uninitialised: the checkpoint overwrites it (the padding rows are zeroed at load).
        self.weight = nn.Parameter(
            torch.empty(self.vocab_per_rank, hidden_size), requires_grad=False
        )  # [vocab / tp (padded), hidden]
        self.weight.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        """Take this rank's vocab rows of the full [vocab, hidden] weight; zero the padding."""
        n = self.vocab_end - self.vocab_start
        default_weight_loader(
            param.narrow(0, 0, n), loaded_weight[self.vocab_start : self.vocab_end]
        )
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        # Out-of-range ids look up row 0 and are zeroed, so the all-reduce sums exactly one row.
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)  # [T]
        local_ids = (input_ids - self.vocab_start) * in_range
        out = F.embedding(local_ids, self.weight) * in_range.unsqueeze(-1).to(self.weight.dtype)
        dist.all_reduce(out)
        return out


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection hidden -> vocab, sharded like the embedding (so it can be tied)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is not a lookup; call compute_logits(hidden)")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        logits = F.linear(hidden, self.weight)  # [N, vocab / tp (padded)]
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)  # [N, vocab (padded)]
        # float32 for sampling: softmax/top-p on bf16 logits loses probability mass.
        return logits[:, : self.vocab_size].float()
