"""LLaVA-OneVision, encoder slice: anyres tiling, the SigLIP vision tower, the MLP projector and
the packing of each image's tiles into the LM's rows (unpad, anyres_max shrink, image newline);
a video's frames, one tile each, pooled 2x2 and followed by one newline row.

Tiles all have the tower's size, so the tiles of every image and the frames of every video of a
step run as one tower batch ([sum tiles, 3, side, side]) and are split per item only for the
packing, which follows the image's `AnyresLayout` (`protocol.geometry.llava_onevision`): the
row count is the one the frontend put in the prompt.

Only ``vision_tower.*``, ``multi_modal_projector.*`` and ``image_newline`` are read from the
checkpoint (the LM is the decoder's). The tower reuses transformers' SigLIP embedding and
encoder-layer modules and runs only up to the deepest ``vision_feature_layer``; the features are
the layers' outputs before SigLIP's post-layernorm (as transformers selects them), so that norm
never runs and is never loaded.

`AnyresEncoder` is the part LLaVA-NeXT shares (`encoder_worker/models/llava_next.py`: a CLIP
tower, CLS dropped, no shrink): loading, one tower batch per step, the per-image packing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipVisionEmbeddings

from encoder_worker.models.base import EncoderModel, Patches
from encoder_worker.models.llava import (
    absolute_layers,
    build_tower_and_projector,
    load_tower_and_projector,
    tower_local_name,
)
from encoder_worker.models.llava_onevision_image import AnyresImageProcessor
from encoder_worker.video import Video
from protocol.geometry.llava_onevision import AnyresGeometry


class SiglipTower(nn.Module):
    """SigLIP ViT truncated after ``num_layers`` encoder layers; returns chosen hidden states."""

    def __init__(self, config, num_layers: int):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(num_layers))

    def forward(self, pixel_values: torch.Tensor, keep: list[int]) -> list[torch.Tensor]:
        """[B, 3, side, side] -> hidden states [B, patches, vision_hidden] at indices ``keep``
        (0 = embeddings, i = output of layer i, as HF's hidden_states)."""
        hidden = self.embeddings(pixel_values)
        states = [hidden]
        for layer in self.layers:
            hidden = layer(hidden, None)  # no mask: every tile has the same patch count
            states.append(hidden)
        return [states[i] for i in keep]


class AnyresEncoder(EncoderModel):
    """An anyres tower + projector + packing; a subclass names its tower (class, model_type,
    the parts before its layers that run) and builds its image processor."""

    packs_variable_sizes = True
    tower_cls: type[nn.Module]
    tower_type: str  # vision_config.model_type
    tower_parts: tuple[str, ...]  # checkpoint parts of the tower besides its layers that run
    geometry: AnyresGeometry

    def __init__(self, model_dir: str, device: torch.device, dtype: torch.dtype):
        hf = AutoConfig.from_pretrained(model_dir)
        vision = hf.vision_config
        if vision.model_type != self.tower_type:
            raise ValueError(f"{model_dir}: vision tower {vision.model_type!r} is not supported "
                             f"(only {self.tower_type!r})")
        vision._attn_implementation = "sdpa"  # fused attention; equal to eager up to rounding
        model_config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        self.processor = self.image_processor(model_dir, model_config)
        self.geometry = self.processor.geometry  # refuses strategies and sizes we can't pack
        self.drop_cls = self.geometry.strategy == "default"  # CLIP's first token
        self.feature_layers = absolute_layers(hf.vision_feature_layer, vision.num_hidden_layers)
        self.num_tower_layers = max(self.feature_layers)
        self.hidden_size = hf.text_config.hidden_size
        self.device, self.dtype = torch.device(device), dtype
        self.tower, self.projector = build_tower_and_projector(
            self.tower_cls, vision, hf, self.num_tower_layers, len(self.feature_layers), dtype,
            self.device)
        rest = load_tower_and_projector(model_dir, self._local_name, self.tower, self.projector)
        if "newline" not in rest:
            raise ValueError(f"{model_dir}: the checkpoint has no image_newline")
        self.newline = rest["newline"].to(self.device, dtype)  # [hidden_size]

    def image_processor(self, model_dir: str, model_config: dict[str, Any]
                        ) -> AnyresImageProcessor:
        raise NotImplementedError

    def _local_name(self, name: str) -> str | None:
        if name.removeprefix("model.") == "image_newline":
            return "newline"
        return tower_local_name(name, self.num_tower_layers, self.tower_parts)

    def preprocess(self, image: Image.Image) -> Patches:
        return self.processor(image)

    def num_tokens(self, width: int, height: int) -> int:
        return self.geometry.image(width, height).num_tokens

    @torch.inference_mode()
    def encode_packed(self, items: list[Patches]) -> list[torch.Tensor]:
        # Cast after the upload, on the device: moving fp32 bytes beats a CPU cast of the pack.
        tiles = torch.cat([item.values for item in items]).to(self.device).to(self.dtype)
        states = self.tower(tiles, self.feature_layers)  # each [sum tiles, tokens, vision_hidden]
        if self.drop_cls:
            states = [s[:, 1:] for s in states]  # -> [sum tiles, side^2, vision_hidden]
        features = self.projector(states[0] if len(states) == 1 else torch.cat(states, dim=-1))
        per_item = features.split([item.values.shape[0] for item in items])
        return [self._rows(f, item) for f, item in zip(per_item, items)]

    def _rows(self, features: torch.Tensor, item: Patches) -> torch.Tensor:
        """One item's projected tiles -> its LM rows."""
        return self._pack(features, item.image_hw[1], item.image_hw[0])

    def _pack(self, features: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """One image's [1 + tiles, side^2, hidden] -> its LM rows [num_tokens, hidden]: the base
        tile's features, then the tiles' map (padding cut, shrunk past the budget) row by row,
        each row followed by the newline embedding."""
        if features.shape[0] == 1:  # base tile only (a multi-image prompt's image)
            return torch.cat((features[0], self.newline[None]))
        plan = self.geometry.layout(width, height)
        side, (rows, cols) = self.geometry.side, plan.tiles_hw
        if features.shape[0] != 1 + rows * cols:
            raise ValueError(f"image of {width}x{height} came as {features.shape[0] - 1} tiles, "
                             f"its layout has {rows}x{cols}")
        # [rows, cols, side, side, hidden] -> one map [hidden, rows * side, cols * side]
        grid = features[1:].view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3)
        grid = grid.reshape(-1, rows * side, cols * side)
        kept_h, kept_w = plan.kept_hw
        top, left = (rows * side - kept_h) // 2, (cols * side - kept_w) // 2
        grid = grid[:, top:top + kept_h, left:left + kept_w]
        if plan.packed_hw != plan.kept_hw:
            grid = F.interpolate(grid[None], list(plan.packed_hw), mode="bilinear")[0]
        newline = self.newline[:, None, None].expand(-1, grid.shape[1], 1)
        grid = torch.cat((grid, newline), dim=-1)  # [hidden, packed_h, packed_w + 1]
        return torch.cat((features[0], grid.flatten(1).T))


class LlavaOnevisionEncoder(AnyresEncoder):
    modalities = ("image", "video")
    tower_cls = SiglipTower
    tower_type = "siglip_vision_model"
    # SigLIP has no pre-layernorm; its post-layernorm feeds only the pooled output.
    tower_parts = ("embeddings.",)

    def image_processor(self, model_dir: str, model_config: dict[str, Any]
                        ) -> AnyresImageProcessor:
        return AnyresImageProcessor.from_pretrained(model_dir, model_config)

    def preprocess_variant(self, image: Image.Image, variant: str) -> Patches:
        """"base": an image of a multi-image prompt, its base tile only (grid (1, 0, 0))."""
        if variant != "base":
            return super().preprocess_variant(image, variant)
        return self.processor.base_tile(image)

    def video_frames(self, total: int, fps: float, kwargs: Mapping[str, Any]) -> list[int]:
        return self.geometry.sample_frames(total, fps, kwargs.get("num_frames"),
                                           kwargs.get("fps"))

    def preprocess_video(self, video: Video) -> Patches:
        return self.processor.video(video.frames)

    def _rows(self, features: torch.Tensor, item: Patches) -> torch.Tensor:
        if item.image_hw is None:  # a video: its frames carry no image size
            return self._pool_video(features)
        return super()._rows(features, item)

    def _pool_video(self, features: torch.Tensor) -> torch.Tensor:
        """A video's [frames, side^2, hidden] -> [frames * pooled^2 + 1, hidden]: each frame's
        map shrunk bilinearly to ceil(side / 2) a side (transformers' apply_pooling), frames in
        order, then one newline row for the whole video."""
        side, pooled = self.geometry.side, self.geometry.pooled
        # [frames, hidden, side, side], contiguous as transformers has it (a channels-last
        # input would take another interpolation kernel)
        grid = features.view(-1, side, side, features.shape[-1]).permute(0, 3, 1, 2).contiguous()
        grid = F.interpolate(grid, size=[pooled, pooled], mode="bilinear")
        rows = grid.permute(0, 2, 3, 1).reshape(-1, features.shape[-1])
        return torch.cat((rows, self.newline[None]))
