"""What the encoder process needs from a model's encoder slice (one subclass per architecture)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image


class EncoderModel(ABC):
    """Preprocessing + tower + projector of one architecture, loaded from an HF checkpoint.

    ``preprocess`` runs in the decode thread pool (CPU, any thread); ``encode`` runs on the
    server's busy loop, on the model's device.
    """

    modality: str = "image"
    hidden_size: int  # width of the LM input embeddings it produces
    dtype: torch.dtype  # of the embeddings it produces (user-supplied ones are cast to it)
    device: torch.device  # where ``encode`` runs (the server uploads each batch there first)

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One decoded RGB image -> pixel values [3, H, W] float32 on the CPU."""

    @abstractmethod
    def num_tokens(self, width: int, height: int) -> int:
        """Embedding rows produced for an input image of ``width`` x ``height`` pixels."""

    @abstractmethod
    def encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] float32 (CPU or on the model's device) -> B tensors
        [num_tokens, hidden_size] on the model's device."""

    def graph_input_shape(self) -> tuple[int, ...] | None:
        """The shape every preprocessed input has, when it is fixed: then small batches run as
        CUDA graphs (`encoder_worker/graphs.py`) through ``encode_batch``. None: shapes vary."""
        return None

    def encode_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``encode`` as one [B, num_tokens, hidden_size] tensor (models with a fixed input)."""
        raise NotImplementedError
