"""Gated activations: the SiLU-and-mul of the Llama-family MLP."""

from __future__ import annotations

import torch
from torch import nn

import mmkernels


class SiluAndMul(nn.Module):
    """silu(gate) * up on the merged gate_up output: [T, 2 * I / tp] -> [T, I / tp]."""

    def __init__(self):
        super().__init__()
        self._silu_and_mul = mmkernels.DeviceOp("silu_and_mul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._silu_and_mul(x)


# HF `hidden_act` name -> module; each expects the merged [gate | up] input.
ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": SiluAndMul}


def get_act_and_mul(hidden_act: str) -> nn.Module:
    if hidden_act not in ACTIVATIONS:
        raise NotImplementedError(
            f"hidden_act={hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[hidden_act]()
