"""RMSNorm module over the rms_norm kernel (fused residual add when a residual is passed)."""

from __future__ import annotations

import torch
from torch import nn

import mmkernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        # Replicated on every rank; uninitialised because the checkpoint overwrites it.
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)  # [hidden]
        self._rms_norm = mmkernels.DeviceOp("rms_norm")

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        residual: torch.Tensor | None = None,  # [T, hidden]
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or (norm(x + residual), x + residual) when a residual is given."""
        return self._rms_norm(x, self.weight, self.eps, residual)
