"""Whisper's audio encoder (the tower of Qwen2-Audio and Ultravox), over batches of log-mel windows.

Two convolutions (the second with stride 2: 100 frames/s -> 50 rows/s), GELU, learned absolute
positions, pre-norm transformer layers, a final LayerNorm. Padding frames of a window that the
clip does not fill are masked as attention keys, so a clip's rows do not depend on how much
silence pads it. Qwen2-Audio average-pools the rows in pairs before the final norm
(``pool=True``).

Parameter names match transformers' ``WhisperEncoder`` / ``Qwen2AudioEncoder``, so the
weights load as saved; the attention scales the query before the product as they do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


class WhisperAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scaling = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, dim]; mask [B, 1, 1, T] bool (True: a key to attend to) or None."""
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:  # [B, heads, T, head_dim]
            return y.view(b, t, self.num_heads, -1).transpose(1, 2)

        q = heads(self.q_proj(x) * self.scaling)
        out = F.scaled_dot_product_attention(q, heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             attn_mask=mask, scale=1.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class WhisperLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int, act: str):
        super().__init__()
        self.self_attn = WhisperAttention(dim, num_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.act = ACT2FN[act]
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """``config``: a Whisper / Qwen2-Audio encoder config (d_model, encoder_layers,
    encoder_attention_heads, encoder_ffn_dim, num_mel_bins, max_source_positions,
    activation_function)."""

    def __init__(self, config, pool: bool = False):
        super().__init__()
        dim = config.d_model
        self.dim = dim
        self.max_positions = config.max_source_positions
        self.conv1 = nn.Conv1d(config.num_mel_bins, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(self.max_positions, dim)
        self.layers = nn.ModuleList(
            WhisperLayer(dim, config.encoder_attention_heads, config.encoder_ffn_dim,
                         config.activation_function) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(dim)
        self.pool = pool

    @staticmethod
    def rows_of_frames(frames: int) -> int:
        """Rows after the stride-2 conv for ``frames`` log-mel frames."""
        return (frames - 1) // 2 + 1

    def forward(self, features: torch.Tensor, frames: list[int]) -> torch.Tensor:
        """features [B, n_mels, T] (T at most 2 * max_positions) with ``frames[i]`` valid
        frames in window i -> [B, T / 2 (/ 2 pooled), dim]."""
        x = F.gelu(self.conv1(features.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [B, T/2, dim]
        t = x.shape[1]
        if t > self.max_positions:
            raise ValueError(f"{t} encoder positions, more than the tower's {self.max_positions}")
        # (scale_embedding is in the configs but unused by transformers' encoders: so here too)
        x = x + self.embed_positions.weight[:t]
        rows = torch.tensor([self.rows_of_frames(f) for f in frames], device=x.device)
        valid = torch.arange(t, device=x.device)[None, :] < rows[:, None]  # [B, T/2]
        mask = None if bool(valid.all()) else valid[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        if self.pool:
            x = F.avg_pool1d(x.transpose(1, 2), 2, 2).transpose(1, 2)
        return self.layer_norm(x)
