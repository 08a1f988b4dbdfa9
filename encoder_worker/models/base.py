"""What the encoder process needs from a model's encoder slice (one subclass per architecture)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    import numpy as np
    import torch
    from PIL import Image

    from encoder_worker.video import Video
    from protocol.geometry import ItemGeometry


class Patches(NamedTuple):
    """One variable-size input (dynamic-resolution towers such as Qwen2-VL's): its patches (or
    tiles), in the order the tower reads them, and their grid."""

    values: torch.Tensor  # [t * h * w, patch_dim] (or [tiles, 3, side, side]) float32, CPU
    grid_thw: tuple[int, int, int]  # patches (tiles) along time, height, width
    # (height, width) of the source image, for a packing that depends on it (LLaVA-OneVision
    # cuts its tiles' padding by the image's aspect ratio)
    image_hw: tuple[int, int] | None = None


class AudioFeatures(NamedTuple):
    """One audio clip's model input: its log-mel features (padded to the model's window, or cut
    into windows) and how many embedding rows the clip makes."""

    values: torch.Tensor  # [windows, n_mels, frames] float32, CPU
    frames: tuple[int, ...]  # valid (non-padding) log-mel frames of each window
    num_tokens: int  # embedding rows of the whole clip


class EncoderModel(ABC):
    """Preprocessing + tower + projector of one architecture, loaded from an HF checkpoint.

    ``preprocess`` runs in the decode thread pool (CPU, any thread); ``encode`` (or
    ``encode_packed``) runs on the server's busy loop, on the model's device.

    Fixed-size models return [3, H, W] pixels and the server stacks equal shapes into one
    ``encode`` batch. Models that set ``packs_variable_sizes`` return `Patches` instead, and the
    server hands every ready item of a step to one ``encode_packed`` call: their tower attends
    within each item over the concatenated patches, so sizes need not match.

    ``modalities`` are the item kinds the model encodes; one with "video" implements
    ``video_frames`` and ``preprocess_video`` (its frames go through the same tower); one with
    "audio" sets ``sampling_rate`` and implements ``preprocess_audio`` (and ``encode_packed``
    over `AudioFeatures`; an audio-only model refuses images in ``preprocess``).
    """

    modalities: tuple[str, ...] = ("image",)
    packs_variable_sizes: bool = False
    hidden_size: int  # width of the LM input embeddings it produces
    dtype: torch.dtype  # of the embeddings it produces (user-supplied ones are cast to it)
    device: torch.device  # where ``encode`` runs (the server uploads each batch there first)
    sampling_rate: int = 0  # Hz clips are resampled to (audio models)

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor | Patches:
        """One decoded RGB image -> pixel values [3, H, W] float32 on the CPU, or its `Patches`
        (``packs_variable_sizes``)."""

    def preprocess_variant(self, image: Image.Image, variant: str) -> torch.Tensor | Patches:
        """``preprocess`` in a variant the item's geometry chose (`ItemGeometry.variant`)."""
        raise ValueError(f"{type(self).__name__} has no preprocessing variant {variant!r}")

    def preprocess_to(self, image: Image.Image, geometry: ItemGeometry) -> torch.Tensor | Patches:
        """``preprocess`` to the item's geometry, which the frontend computed (under the
        request's processor settings) and the prompt was sized by. This default follows its
        variant only; a model whose sizes a request can change resizes to the geometry's."""
        if geometry.variant is None:
            return self.preprocess(image)
        return self.preprocess_variant(image, geometry.variant)

    def video_frames(self, total: int, fps: float, kwargs: Mapping[str, Any]) -> list[int]:
        """Indices of the frames a video of ``total`` frames at ``fps`` is sampled to, under
        the item's media_io_kwargs; ValueError (for the client) if it can't be sampled."""
        raise NotImplementedError

    def preprocess_video(self, video: Video) -> torch.Tensor | Patches:
        """The decoded, sampled frames -> the model's input (as ``preprocess``)."""
        raise NotImplementedError

    def preprocess_video_to(self, video: Video, geometry: ItemGeometry) -> torch.Tensor | Patches:
        """``preprocess_video`` to the item's geometry (as ``preprocess_to``)."""
        return self.preprocess_video(video)

    def preprocess_audio(self, samples: np.ndarray, geometry: ItemGeometry | None
                         ) -> AudioFeatures:
        """A decoded mono clip ([samples] float32 at ``sampling_rate``) -> its features."""
        raise NotImplementedError

    @abstractmethod
    def num_tokens(self, width: int, height: int) -> int:
        """Embedding rows produced for an input image of ``width`` x ``height`` pixels."""

    def encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] float32 (CPU or on the model's device) -> B tensors
        [num_tokens, hidden_size] on the model's device (fixed-size models)."""
        raise NotImplementedError

    def encode_packed(self, items: list[Patches]) -> list[torch.Tensor]:
        """Items of any sizes (CPU) -> one [num_tokens_i, hidden_size] tensor each, on the
        model's device, from one tower forward (``packs_variable_sizes`` models)."""
        raise NotImplementedError

    def graph_input_shape(self) -> tuple[int, ...] | None:
        """The shape every preprocessed input has, when it is fixed: then small batches run as
        CUDA graphs (`encoder_worker/graphs.py`) through ``encode_batch``. None: shapes vary."""
        return None

    def graph_input_dtype(self) -> torch.dtype:
        """The dtype of what ``preprocess`` makes, held by the graphs' input buffer."""
        return self.dtype

    def encode_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``encode`` as one [B, num_tokens, hidden_size] tensor (models with a fixed input)."""
        raise NotImplementedError


class AudioEncoderModel(EncoderModel):
    """An audio-only slice: clips through ``preprocess_audio`` and ``encode_packed``, images
    refused."""

    modalities = ("audio",)
    packs_variable_sizes = True

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        raise ValueError("this model does not accept image input")

    def num_tokens(self, width: int, height: int) -> int:
        raise ValueError("this model does not accept image input")
