"""Tensor-parallel linear layers (Megatron style) that hold only their rank's shard.

Column-parallel splits the output features across ranks (no communication); row-parallel splits
the input features and all-reduces the partial sums. Pairing them (qkv/gate_up -> o/down) keeps
one all-reduce per block. With tp_size == 1 nothing touches torch.distributed.

The matmul is the `linear` kernel: on CUDA a Triton GEMV for decode's few rows (it reads the
weight faster than cuBLAS's M=1 path), cuBLAS for everything larger. `forward_normed` and
`forward_gated` take the op before the projection into the same kernel (RMSNorm, SiLU-and-mul),
and the row-parallel layers' ``residual`` the residual stream's add after it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import mmkernels


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    """Copy a replicated tensor as is (norm weights, ...), casting to the parameter's dtype."""
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"shape mismatch: param {tuple(param.shape)} vs {tuple(loaded_weight.shape)}"
        )
    param.data.copy_(loaded_weight)


def _param(*shape: int) -> nn.Parameter:
    # Uninitialised on purpose: every value is overwritten by the checkpoint, and random init of
    # a multi-GB model would cost seconds. Device and dtype come from the caller's defaults.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _divide(n: int, tp_size: int, what: str) -> int:
    if n % tp_size:
        raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={tp_size}")
    return n // tp_size


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split across ranks; y stays sharded."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.output_size_per_rank = _divide(output_size, tp_size, "output_size")
        self.weight = _param(self.output_size_per_rank, input_size)  # [out / tp, in]
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(self.output_size_per_rank) if bias else None  # [out / tp]
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader
        self._linear = mmkernels.DeviceOp("linear")
        self._norm_linear = mmkernels.DeviceOp("norm_linear")

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        """Take this rank's rows of the full HF weight (or bias)."""
        n = param.shape[0]
        default_weight_loader(param, loaded_weight[self.tp_rank * n : (self.tp_rank + 1) * n])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out / tp]
        return self._linear(x, self.weight, self.bias)

    def forward_normed(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """self(norm(x)), `norm` an `RMSNorm`: one `norm_linear`, which for decode's few rows
        is a single GEMV with the norm in its prologue."""
        return self._norm_linear(x, norm.weight, norm.eps, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stacked in one matmul (gate_proj + up_proj).

    Each logical output is sharded separately, so rank r holds [gate_r | up_r] and the activation
    can split its local output in half.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        *,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        self.shard_sizes = [_divide(s, tp_size, "output_size") for s in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias=bias, tp_rank=tp_rank, tp_size=tp_size)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        """Load logical output `shard_id` (0 = gate, 1 = up) from its full HF weight."""
        if not isinstance(shard_id, int):
            raise ValueError(f"{type(self).__name__} needs an integer shard_id, got {shard_id!r}")
        offset, n = sum(self.shard_sizes[:shard_id]), self.shard_sizes[shard_id]
        rows = loaded_weight[self.tp_rank * n : (self.tp_rank + 1) * n]
        default_weight_loader(param.narrow(0, offset, n), rows)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul, sharded by attention head.

    When there are fewer KV heads than ranks, each KV head is replicated on tp_size / num_kv_heads
    ranks (every rank needs the KV head its query heads attend to).
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        *,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        self.head_dim = head_dim
        self.num_heads = _divide(total_num_heads, tp_size, "num_attention_heads")
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.kv_replicas = _divide(tp_size, total_num_kv_heads, "tensor_parallel_size")
        else:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size, "num_key_value_heads")
            self.kv_replicas = 1
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        # offset (in this rank's output) and size of each logical projection
        self.shards = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}
        super().__init__(
            hidden_size, (q + 2 * kv) * tp_size, bias=bias, tp_rank=tp_rank, tp_size=tp_size
        )

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        """Load q_proj / k_proj / v_proj (shard_id "q", "k", "v") from its full HF weight."""
        if shard_id not in self.shards:
            raise ValueError(
                f"QKVParallelLinear shard_id must be 'q', 'k' or 'v', got {shard_id!r}"
            )
        offset, n = self.shards[shard_id]
        head_rank = self.tp_rank if shard_id == "q" else self.tp_rank // self.kv_replicas
        rows = loaded_weight[head_rank * n : (head_rank + 1) * n]
        default_weight_loader(param.narrow(0, offset, n), rows)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, (Hq + 2 Hkv) * D] -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D] (views)."""
        sizes = [n for _, n in self.shards.values()]
        q, k, v = qkv.split(sizes, dim=-1)
        d = self.head_dim
        return q.unflatten(-1, (-1, d)), k.unflatten(-1, (-1, d)), v.unflatten(-1, (-1, d))


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split across ranks; partial sums are all-reduced.

    The input arrives already sharded (the output of a column-parallel layer).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.input_size_per_rank = _divide(input_size, tp_size, "input_size")
        self.weight = _param(output_size, self.input_size_per_rank)  # [out, in / tp]
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(output_size) if bias else None  # [out], replicated
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader
        self._linear = mmkernels.DeviceOp("linear")
        self._silu_mul_linear = mmkernels.DeviceOp("silu_mul_linear")

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        """Take this rank's input columns of the weight; the bias is replicated."""
        if param.dim() == 2:
            n = param.shape[1]
            loaded_weight = loaded_weight[:, self.tp_rank * n : (self.tp_rank + 1) * n]
        default_weight_loader(param, loaded_weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """[T, in / tp] -> [T, out], plus ``residual`` [T, out] when given (the residual
        stream's add, in the GEMV's epilogue for decode's few rows)."""
        return self._reduced(self._linear, x, residual)

    def forward_gated(self, gate_up: torch.Tensor, residual: torch.Tensor | None = None
                      ) -> torch.Tensor:  # [T, 2 in / tp] -> [T, out]
        """self(silu(gate) * up) (+ residual) from the merged [gate | up] shard: one
        `silu_mul_linear`, which for decode's few rows applies the activation in the GEMV's
        prologue."""
        return self._reduced(self._silu_mul_linear, gate_up, residual)

    def _reduced(self, op, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if self.tp_size == 1:
            return op(x, self.weight, self.bias, residual)
        out = op(x, self.weight)
        dist.all_reduce(out)
        # Bias and residual after the reduce, else they would be counted tp_size times.
        if self.bias is not None:
            out = out + self.bias
        return out if residual is None else out + residual
