"""LLaVA-NeXT (LLaVA-1.6), encoder slice: the anyres encoder of LLaVA-OneVision
(`encoder_worker.models.llava_onevision.AnyresEncoder`: one tower batch of every image's tiles,
then per-image packing: unpad cut, image newline rows, base tile first) over LLaVA-1.5's CLIP
tower and projector (`encoder_worker.models.llava`).

What differs is read from `protocol.geometry.llava_next`: the "default" strategy (CLIP's CLS
token dropped from every tile), no anyres_max shrink, every image of a prompt tiled. Only
``vision_tower.*``, ``multi_modal_projector.*`` and ``image_newline`` are loaded; the tower runs
up to the deepest ``vision_feature_layer`` (-2 in the released checkpoints), so its last layer
and post-layernorm never run.
"""

from __future__ import annotations

from typing import Any

from encoder_worker.models.clip_image import image_processor_config
from encoder_worker.models.llava import ClipTower
from encoder_worker.models.llava_onevision import AnyresEncoder
from encoder_worker.models.llava_onevision_image import AnyresImageProcessor
from protocol.geometry.llava_next import LlavaNextGeometry


class LlavaNextEncoder(AnyresEncoder):
    tower_cls = ClipTower
    tower_type = "clip_vision_model"
    tower_parts = ("embeddings.", "pre_layrnorm.")  # CLIP's pre-layernorm runs before the layers

    def image_processor(self, model_dir: str, model_config: dict[str, Any]
                        ) -> AnyresImageProcessor:
        cfg = image_processor_config(model_dir)
        # The per-tile resize (shortest edge) and center crop leave a tile of the tower's own
        # side as it is, which the geometry checks; so they need no step of their own here.
        return AnyresImageProcessor.from_config(
            model_config, cfg, geometry=LlavaNextGeometry(model_config, cfg))
