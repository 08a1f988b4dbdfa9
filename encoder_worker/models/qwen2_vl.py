"""Qwen2-VL and Qwen2.5-VL, encoder slice: dynamic-resolution preprocessing, the vision tower
and its patch merger (the merger is the projector: it maps 2x2 patch windows to LM embeddings).

Images of different sizes run as one forward: their patches are concatenated ([sum N_i,
patch_dim]) and per-segment lengths (cu_seqlens, as a list) say where each image starts, so
every layer but attention runs over the whole pack and attention stays within each image.
Positions are 2-D rotary ones: each patch rotates half of each head by its row and the other
half by its column in the grid. Qwen2.5-VL's tower differs in its parts (RMSNorm, gated MLP) and
in attending within windows of the image in most blocks.

Only ``visual.*`` is read from the checkpoint (the LM is the decoder's). Parameter names match
transformers' so the weights load as saved.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoConfig
from transformers.activations import ACT2FN

from encoder_worker.models.base import EncoderModel, Patches
from encoder_worker.models.qwen2_vl_image import Qwen2VLImageProcessor
from encoder_worker.models.segments import SegmentPlan
from encoder_worker.models.weights import copy_into, load_weights
from encoder_worker.video import Video
from mmkernels.reference import rms_norm
from protocol.geometry import ItemGeometry

NORM_EPS = 1e-6  # the tower's norms (fixed in transformers, not in the config)


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d, whose stride equals its kernel: on pre-cut patches it is one
    matmul, [N, C * t * p * p] @ [C * t * p * p, embed]."""

    def __init__(self, embed_dim: int, channels: int, temporal: int, patch: int):
        super().__init__()
        self.proj = nn.Conv3d(channels, embed_dim, (temporal, patch, patch), bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return F.linear(patches, self.proj.weight.flatten(1))  # [N, embed]


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                segments: SegmentPlan) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # each [N, heads, hd]
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        # Block-diagonal: each frame (or Qwen2.5-VL window) attends within itself.
        return self.proj(segments.attention(q, k, v).reshape(n, -1))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, head_dim] rotated by angles whose cos/sin are [N, head_dim]; in fp32, as
    transformers computes it, then back to x's dtype."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class VisionMlp(nn.Module):
    """Qwen2-VL: fc1 -> act (QuickGELU) -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMlp(nn.Module):
    """Qwen2.5-VL: down(act(gate(x)) * up(x)), with biases."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden)
        self.up_proj = nn.Linear(dim, hidden)
        self.act = ACT2FN[act]
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    """Qwen2.5-VL's norms: statistics in fp32, as transformers computes them."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, norm: type[nn.Module], mlp: nn.Module):
        super().__init__()
        self.norm1 = norm(dim, eps=NORM_EPS)
        self.attn = VisionAttention(dim, num_heads)
        self.norm2 = norm(dim, eps=NORM_EPS)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                segments: SegmentPlan) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm, then each window of merge^2 consecutive patches as one row through an MLP."""

    def __init__(self, dim: int, out_dim: int, merge: int, norm: type[nn.Module]):
        super().__init__()
        self.window_dim = dim * merge ** 2
        self.ln_q = norm(dim, eps=NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(self.window_dim, self.window_dim), nn.GELU(),
                                 nn.Linear(self.window_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.window_dim))  # [N / merge^2, out_dim]


class VisionTower(nn.Module):
    """Patch embedding, blocks and merger over packed images; the subclasses pick the parts."""

    def __init__(self, vision, dim: int, out_dim: int, norm: type[nn.Module],
                 make_mlp: Callable[[], nn.Module]):
        super().__init__()
        self.merge = vision.spatial_merge_size
        self.out_dim = out_dim  # the LM's embedding width
        self.patch_embed = PatchEmbed(dim, vision.in_channels, vision.temporal_patch_size,
                                      vision.patch_size)
        self.blocks = nn.ModuleList(VisionBlock(dim, vision.num_heads, norm, make_mlp())
                                    for _ in range(vision.depth))
        self.merger = PatchMerger(dim, out_dim, self.merge, norm)
        self.head_dim = dim // vision.num_heads
        self.theta = float((getattr(vision, "rope_parameters", None) or {}).get("rope_theta",
                                                                               10000.0))

    def rotary(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, head_dim] of every packed patch, in the merge-window order of the
        patches: angle = row * inv_freq on the first quarter, column * inv_freq on the second,
        both repeated over the second half (rotate-half pairs dimension i with i + head_dim/2)."""
        device, m = self.patch_embed.proj.weight.device, self.merge
        # head_dim / 4 frequencies, shared by rows and columns; fp32 whatever the tower's dtype.
        quarter = torch.arange(0, self.head_dim // 2, 2, dtype=torch.float, device=device)
        inv_freq = 1.0 / self.theta ** (quarter / (self.head_dim // 2))
        rows, cols = [], []
        for t, h, w in grids:
            # [h/m, w/m, m, m] windows, flattened in the order the patches are laid out
            r = torch.arange(h, device=device).view(h // m, 1, m, 1).expand(-1, w // m, -1, m)
            c = torch.arange(w, device=device).view(1, w // m, 1, m).expand(h // m, -1, m, -1)
            rows.append(r.flatten().repeat(t))
            cols.append(c.flatten().repeat(t))
        angles = torch.cat((torch.cat(rows)[:, None] * inv_freq,
                            torch.cat(cols)[:, None] * inv_freq), dim=-1)
        angles = torch.cat((angles, angles), dim=-1)  # [N, head_dim]
        return angles.cos(), angles.sin()


def _frames(grids: list[tuple[int, int, int]]) -> list[int]:
    """Patches per attention segment: each frame (an image is one) attends within itself; a
    video's frames meet only in the LM."""
    return [h * w for t, h, w in grids for _ in range(t)]


class Qwen2VisionTower(VisionTower):
    """Qwen2-VL: LayerNorm, fc1/fc2 MLP; every block attends over whole frames."""

    def __init__(self, vision):
        dim = vision.embed_dim
        super().__init__(vision, dim, vision.hidden_size, nn.LayerNorm, lambda: VisionMlp(
            dim, int(dim * vision.mlp_ratio), vision.hidden_act))

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """[N, patch_dim] packed patches of ``grids`` -> [N / merge^2, out_dim] merged tokens."""
        frames, rotary = SegmentPlan(_frames(grids), patches.device), self.rotary(grids)
        x = self.patch_embed(patches)
        for block in self.blocks:
            x = block(x, rotary, frames)
        return self.merger(x)


class Qwen25VisionTower(VisionTower):
    """Qwen2.5-VL: RMSNorm, gated MLP, and window attention in all blocks but a few: merged
    units are regrouped window by window (``window_size`` px squares of a frame), so each
    window is a contiguous attention segment, and put back in place after the merger."""

    def __init__(self, vision):
        dim = vision.hidden_size
        super().__init__(vision, dim, vision.out_hidden_size, RMSNorm, lambda: GatedMlp(
            dim, vision.intermediate_size, vision.hidden_act))
        self.window = vision.window_size // vision.spatial_merge_size // vision.patch_size
        self.full_blocks = set(vision.fullatt_block_indexes)

    def window_order(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[int]]:
        """The merged units in window order (windows row by row, units row by row inside, a
        frame's edge windows smaller) and each window's length in patches."""
        ws, m = self.window, self.merge
        order, lengths, offset = [], [], 0
        for t, h, w in grids:
            units = torch.arange(t * (h // m) * (w // m)).view(t, h // m, w // m) + offset
            for frame in units:
                for top in range(0, h // m, ws):
                    for left in range(0, w // m, ws):
                        window = frame[top:top + ws, left:left + ws].flatten()
                        order.append(window)
                        lengths.append(window.numel() * m * m)
            offset += units.numel()
        return torch.cat(order).to(self.patch_embed.proj.weight.device), lengths

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """[N, patch_dim] packed patches of ``grids`` -> [N / merge^2, out_dim] merged tokens."""
        order, windows = self.window_order(grids)
        unit = self.merge ** 2

        def by_window(t: torch.Tensor) -> torch.Tensor:  # [N, d], whole merge units moved
            return t.view(-1, unit, t.shape[-1])[order].view(t.shape)

        frames = SegmentPlan(_frames(grids), patches.device)
        windows = SegmentPlan(windows, patches.device)
        rotary = tuple(by_window(r) for r in self.rotary(grids))
        x = by_window(self.patch_embed(patches))
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, frames if i in self.full_blocks else windows)
        out = self.merger(x)  # [N / merge^2, out_dim], in window order
        merged = torch.empty_like(out)
        merged[order] = out  # back to the images' own order
        return merged


# vision_config.model_type -> tower
TOWERS: dict[str, type[VisionTower]] = {
    "qwen2_vl_vision": Qwen2VisionTower,
    "qwen2_5_vl_vision": Qwen25VisionTower,
}


class Qwen2VLEncoder(EncoderModel):
    modalities = ("image", "video")
    packs_variable_sizes = True

    def __init__(self, model_dir: str, device: torch.device, dtype: torch.dtype):
        hf = AutoConfig.from_pretrained(model_dir)
        vision = hf.vision_config
        model_config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        self.processor = Qwen2VLImageProcessor.from_pretrained(model_dir, model_config)
        geo = self.processor.geometry
        tower_settings = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
        if (geo.patch_size, geo.merge_size, geo.temporal_patch_size) != tower_settings:
            raise ValueError(f"{model_dir}: the image processor cuts (patch, merge, temporal) = "
                             f"{(geo.patch_size, geo.merge_size, geo.temporal_patch_size)} but "
                             f"the tower takes {tower_settings}")
        if vision.model_type not in TOWERS:
            raise ValueError(f"{model_dir}: vision tower {vision.model_type!r} is not supported "
                             f"(only {', '.join(TOWERS)})")
        self.device, self.dtype = torch.device(device), dtype
        # Built on the meta device, then allocated once in the target dtype on the target device:
        # no random init of weights the checkpoint overwrites anyway.
        with torch.device("meta"):
            self.tower = TOWERS[vision.model_type](vision)
        self.tower = self.tower.to(dtype).to_empty(device=self.device).eval()
        self.hidden_size = self.tower.out_dim
        weights = load_weights(model_dir, _local_name)
        copy_into(self.tower, weights, f"{model_dir} visual")

    def preprocess(self, image: Image.Image) -> Patches:
        return self.processor(image)

    def preprocess_to(self, image: Image.Image, geometry: ItemGeometry) -> Patches:
        # The frontend's size, not one from this checkpoint's bounds: a request may move them.
        return self.processor(image, geometry)

    def video_frames(self, total: int, fps: float, kwargs: Mapping[str, Any]) -> list[int]:
        return self.processor.geometry.sample_frames(total, fps, kwargs.get("num_frames"),
                                                     kwargs.get("fps"))

    def preprocess_video(self, video: Video) -> Patches:
        return self.processor.video(video.frames, video.fps)

    def preprocess_video_to(self, video: Video, geometry: ItemGeometry) -> Patches:
        return self.processor.video(video.frames, video.fps, geometry)

    def num_tokens(self, width: int, height: int) -> int:
        return self.processor.geometry.image(width, height).num_tokens

    @torch.inference_mode()
    def encode_packed(self, items: list[Patches]) -> list[torch.Tensor]:
        grids = [item.grid_thw for item in items]
        # Normalize and cast after the upload, on the device (uint8 rows: a quarter of the bytes).
        patches = torch.cat([item.values for item in items]).to(self.device)
        patches = self.processor.pixel_values(patches).to(self.dtype)
        merged = self.tower(patches, grids)  # [sum num_tokens_i, hidden_size]
        sizes = [t * h * w // self.tower.merge ** 2 for t, h, w in grids]
        return list(merged.split(sizes))


def _local_name(name: str) -> str | None:
    """Checkpoint name -> tower parameter, or None for the LM's weights. transformers 5 saves
    ``visual.*``; some transformers 4 versions saved ``model.visual.*``."""
    name = name.removeprefix("model.")
    return name.removeprefix("visual.") if name.startswith("visual.") else None
