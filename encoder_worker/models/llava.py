"""LLaVA-1.5, encoder slice: CLIP preprocessing, the CLIP vision tower and the MLP projector.

Only ``vision_tower.*`` and ``multi_modal_projector.*`` are read from the checkpoint (the LM is
the decoder's). The tower reuses transformers' CLIP embedding and encoder-layer modules but runs
only up to the deepest ``vision_feature_layer``: LLaVA-1.5 takes layer -2, so the last layer and
the post-layernorm never run (and are never loaded).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig
from transformers.activations import ACT2FN
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionEmbeddings

from encoder_worker.models.base import EncoderModel
from encoder_worker.models.clip_image import ClipImageProcessor, normalize
from encoder_worker.models.weights import copy_into, load_weights
from protocol.checkpoint import image_processor_config
from protocol.geometry.llava import LlavaGeometry


class ClipTower(nn.Module):
    """CLIP ViT truncated after ``num_layers`` encoder layers; returns chosen hidden states."""

    def __init__(self, config, num_layers: int):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # HF's typo
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(num_layers))

    def forward(self, pixel_values: torch.Tensor, keep: list[int]) -> list[torch.Tensor]:
        """[B, 3, H, W] -> hidden states [B, 1 + patches, vision_hidden] at indices ``keep``
        (0 = embeddings after pre_layrnorm, i = output of layer i, as HF's hidden_states)."""
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [hidden]
        for layer in self.layers:
            hidden = layer(hidden, None)  # no mask: every image has the same patch count
            states.append(hidden)
        return [states[i] for i in keep]


class LlavaProjector(nn.Module):
    """linear -> act -> linear; parameter names match HF's ``multi_modal_projector``."""

    def __init__(self, in_features: int, hidden: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def absolute_layers(feature_layer: int | list[int], num_layers: int) -> list[int]:
    """Indices into the L + 1 hidden states (negative ones count from the end, as in Python)."""
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    if not layers:
        raise ValueError("vision_feature_layer is an empty list")
    out = []
    for i in layers:
        if not -(num_layers + 1) <= i <= num_layers:
            raise ValueError(f"vision_feature_layer {i} is outside a {num_layers}-layer tower")
        out.append(i if i >= 0 else num_layers + 1 + i)
    return out


def build_tower_and_projector(tower_cls, vision, hf, num_layers: int, num_feature_layers: int,
                              dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """A LLaVA-family tower truncated after ``num_layers`` layers and its projector, built on the
    meta device and allocated once in ``dtype`` on ``device``: no random init of a tower of
    hundreds of millions of parameters that the checkpoint overwrites anyway."""
    with torch.device("meta"):
        tower = tower_cls(vision, num_layers)
        projector = LlavaProjector(vision.hidden_size * num_feature_layers,
                                   hf.text_config.hidden_size, hf.projector_hidden_act,
                                   getattr(hf, "multimodal_projector_bias", True))
    tower = tower.to(dtype).to_empty(device=device).eval()
    projector = projector.to(dtype).to_empty(device=device).eval()
    # A non-persistent buffer: not in the checkpoint, so to_empty left it uninitialized.
    pos = tower.embeddings.position_ids
    pos.copy_(torch.arange(pos.shape[-1], device=device).expand_as(pos))
    return tower, projector


def load_tower_and_projector(model_dir: str, local_name, tower: nn.Module,
                             projector: nn.Module) -> dict[str, torch.Tensor]:
    """Copy the checkpoint's ``tower.*`` / ``projector.*`` weights (``local_name`` maps
    checkpoint names to those) into the modules; returns the other weights it kept."""
    weights = load_weights(model_dir, local_name)
    copy_into(tower, {k[6:]: v for k, v in weights.items() if k.startswith("tower.")},
              f"{model_dir} vision_tower")
    copy_into(projector, {k[10:]: v for k, v in weights.items() if k.startswith("projector.")},
              f"{model_dir} projector")
    return {k: v for k, v in weights.items() if not k.startswith(("tower.", "projector."))}


def tower_local_name(name: str, num_layers: int, kept: tuple[str, ...]) -> str | None:
    """Checkpoint name -> ``tower.*`` / ``projector.*``, or None for weights the truncated
    tower never uses (layers past ``num_layers``, and any top-level part not in ``kept``).

    Accepts transformers 4 names (``vision_tower.vision_model.*``), transformers 5 names
    (``vision_tower.*``) and either behind a ``model.`` prefix.
    """
    name = name.removeprefix("model.")
    if name.startswith("multi_modal_projector."):
        return "projector." + name.removeprefix("multi_modal_projector.")
    if not name.startswith("vision_tower."):
        return None
    rest = name.removeprefix("vision_tower.").removeprefix("vision_model.")
    if rest.startswith("encoder.layers."):
        if int(rest.split(".")[2]) >= num_layers:
            return None  # past the deepest feature layer: never runs
        rest = rest.removeprefix("encoder.")
    elif not rest.startswith(kept):
        return None  # post-layernorm (and any head) only feed the pooled output
    return "tower." + rest


class LlavaEncoder(EncoderModel):
    def __init__(self, model_dir: str, device: torch.device, dtype: torch.dtype):
        hf = AutoConfig.from_pretrained(model_dir)
        vision = hf.vision_config
        if vision.model_type != "clip_vision_model":
            raise ValueError(f"{model_dir}: vision tower {vision.model_type!r} is not supported "
                             "(only CLIP)")
        vision._attn_implementation = "sdpa"  # fused attention; equal to eager up to rounding
        self.select_strategy = hf.vision_feature_select_strategy
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {self.select_strategy!r} is not "
                             "'default' or 'full'")
        self.feature_layers = absolute_layers(hf.vision_feature_layer, vision.num_hidden_layers)
        self.processor = ClipImageProcessor.from_pretrained(model_dir)
        side = vision.image_size
        if self.processor.output_hw() != (side, side):
            raise ValueError(f"{model_dir}: the image processor makes {self.processor.output_hw()} "
                             f"images but the tower takes {side}x{side}")
        self.geometry = LlavaGeometry(json.loads(Path(model_dir, "config.json").read_text()),
                                      image_processor_config(model_dir) or {})
        self._num_tokens = self.geometry.fixed_image.num_tokens
        self.hidden_size = hf.text_config.hidden_size
        self.device, self.dtype = torch.device(device), dtype
        self.lut = torch.from_numpy(self.processor.lut).to(self.device)  # [3, 256] float32
        self.num_tower_layers = max(self.feature_layers)
        self.tower, self.projector = build_tower_and_projector(
            ClipTower, vision, hf, self.num_tower_layers, len(self.feature_layers), dtype,
            self.device)
        load_tower_and_projector(model_dir, self._local_name, self.tower, self.projector)

    def _local_name(self, name: str) -> str | None:
        # CLIP's pre-layernorm runs before the layers; its post-layernorm never does.
        return tower_local_name(name, self.num_tower_layers, ("embeddings.", "pre_layrnorm."))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        # uint8: normalized on the device in encode_batch (a quarter of the bytes to upload,
        # no float pass on the decode pool's CPU).
        return self.processor.planes(image)  # [3, side, side] uint8

    def num_tokens(self, width: int, height: int) -> int:
        return self._num_tokens  # resize + center crop: independent of the input size

    def graph_input_shape(self) -> tuple[int, ...]:
        side = self.processor.output_hw()[0]
        return (3, side, side)  # resize + center crop: every image the same

    def graph_input_dtype(self) -> torch.dtype:
        return torch.uint8

    @torch.inference_mode()
    def encode_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, side, side] uint8 planes (`preprocess`) or float32 pixel values."""
        pixel_values = pixel_values.to(self.device)
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize(pixel_values, self.lut)
        pixel_values = pixel_values.to(self.dtype)
        states = self.tower(pixel_values, self.feature_layers)  # each [B, 1 + P, vision_hidden]
        if self.select_strategy == "default":
            states = [s[:, 1:] for s in states]  # drop CLS
        features = states[0] if len(states) == 1 else torch.cat(states, dim=-1)
        return self.projector(features)  # [B, num_tokens, hidden_size]

    def encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return list(self.encode_batch(pixel_values).unbind(0))
