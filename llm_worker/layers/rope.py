"""Rotary position embedding: the cos/sin cache built from an HF config, and the module using it.

Supports rope_type default, linear, llama3 and yarn. The frequencies mirror transformers'
`modeling_rope_utils`, so parity tests hold. Reads both config layouts: transformers 5 keeps
everything (rope_theta included) in `rope_parameters`; transformers 4 has `rope_scaling` plus a
top-level `rope_theta`.

A config with an `mrope_section` (Qwen2-VL) gets M-RoPE: each token has three positions
(temporal, height, width), and the frequencies are split into three sections, each rotated by
its own position.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

import mmkernels


def rope_parameters(hf_config) -> dict[str, Any]:
    """The config's RoPE settings as one flat dict with `rope_type` and `rope_theta` set."""
    raw = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    params = dict(raw or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise NotImplementedError("per-layer-type rope_parameters are not supported")
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params["rope_type"] == "mrope":  # Qwen2-VL's old name: default frequencies, in sections
        params["rope_type"] = "default"
    theta = params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0
    params["rope_theta"] = float(theta)
    return params


def build_cos_sin_cache(hf_config, head_dim: int, max_position: int) -> torch.Tensor:
    """[max_position, head_dim] float32: cos | sin of each position (head_dim // 2 each).

    Any attention factor (yarn's mscale) is folded in, as HF scales its cos/sin.
    """
    params = rope_parameters(hf_config)
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not supported")
    rope_type = params["rope_type"]
    if rope_type == "dynamic":
        raise NotImplementedError(
            "rope_type='dynamic' (dynamic NTK) rescales with the running sequence length, which a "
            "static cos/sin cache cannot express; it is not supported"
        )
    if rope_type not in _INV_FREQ:
        raise NotImplementedError(
            f"rope_type={rope_type!r} is not supported (supported: {sorted(_INV_FREQ)})"
        )
    inv_freq, attention_factor = _INV_FREQ[rope_type](hf_config, params, head_dim)
    positions = torch.arange(max_position, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # [max_position, head_dim // 2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_factor


def _base_inv_freq(params: dict[str, Any], head_dim: int) -> torch.Tensor:  # [head_dim // 2]
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (params["rope_theta"] ** exponents)


def _original_max_position(hf_config, params: dict[str, Any]) -> int:
    # Like HF: a top-level original_max_position_embeddings (Phi-3 style) wins over the dict.
    return int(
        getattr(hf_config, "original_max_position_embeddings", None)
        or params.get("original_max_position_embeddings")
        or hf_config.max_position_embeddings
    )


def _default(hf_config, params, head_dim) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(params, head_dim), 1.0


def _linear(hf_config, params, head_dim) -> tuple[torch.Tensor, float]:
    # Scaling positions by 1/factor equals scaling the frequencies by 1/factor.
    return _base_inv_freq(params, head_dim) / params["factor"], 1.0


def _llama3(hf_config, params, head_dim) -> tuple[torch.Tensor, float]:
    inv_freq = _base_inv_freq(params, head_dim)
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = _original_max_position(hf_config, params)
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled), 1.0


def _yarn(hf_config, params, head_dim) -> tuple[torch.Tensor, float]:
    base, dim = params["rope_theta"], head_dim
    old_len = _original_max_position(hf_config, params)
    factor = params.get("factor") or hf_config.max_position_embeddings / old_len

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (
            mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        )

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(old_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    # Dims rotating more than beta_fast times over the original context keep their frequency
    # (extrapolate); fewer than beta_slow times are interpolated; a linear ramp in between.
    low = correction_dim(params.get("beta_fast") or 32)
    high = correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


_INV_FREQ = {
    "default": _default,
    "linear": _linear,
    "llama3": _llama3,
    "yarn": _yarn,
}


def mrope_rows(mrope_section: list[int], head_dim: int) -> torch.Tensor:
    """int64 [head_dim]: which position row (0 t, 1 h, 2 w) each cos | sin column rotates by.

    The sections split the head_dim // 2 frequencies in order; cos and sin halves alike."""
    if len(mrope_section) != 3 or sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {mrope_section} must be 3 sections summing to "
                         f"head_dim // 2 = {head_dim // 2}")
    rows = torch.repeat_interleave(torch.arange(3), torch.tensor(mrope_section))
    return torch.cat((rows, rows)).to(torch.get_default_device())


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k from a precomputed cache indexed by position.

    Positions are [T] int64, or [T, 3] (t, h, w) when the config has an `mrope_section`."""

    def __init__(self, hf_config, head_dim: int, max_position: int):
        super().__init__()
        cache = build_cos_sin_cache(hf_config, head_dim, max_position)
        # Non-persistent: derived from the config, never in a checkpoint; built on the current
        # default device and kept fp32 so bf16 models still rotate with exact angles.
        self.register_buffer(
            "cos_sin_cache", cache.to(torch.get_default_device()), persistent=False
        )
        section = rope_parameters(hf_config).get("mrope_section")
        rows = None if section is None else mrope_rows(list(section), head_dim)
        # [head_dim] int64 for M-RoPE, else None.
        self.register_buffer("mrope_rows", rows, persistent=False)
        # The kernel for the device of the last input: resolved at first forward, not per call.
        self._apply_rope = mmkernels.DeviceOp("apply_rope")

    def forward(
        self,
        positions: torch.Tensor,  # [T] int64, or [T, 3] for M-RoPE
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(self.step(positions), q, k)

    def step(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, cos | sin table) the kernel reads for this step's tokens: the 1-D cache
        as it is, or for M-RoPE the step's own table. A model builds it once per forward and
        every layer applies it (`apply`)."""
        if self.mrope_rows is None:
            return positions, self.cos_sin_cache
        # M-RoPE: column c of token t's cos | sin row is the 1-D cache's column c at the token's
        # position in c's section. One gather builds the step's own table; token t then reads
        # row t of it, so the 1-D kernel (and a captured graph) runs M-RoPE unchanged.
        table = self.cos_sin_cache.gather(0, positions[:, self.mrope_rows])  # [T, D]
        return torch.arange(positions.shape[0], device=positions.device), table

    def apply(self, step: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor,
              k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions, table = step
        return self._apply_rope(q, k, positions, table)
