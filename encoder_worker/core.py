"""The encoder core: decode -> preprocess -> batch -> tower, with no sockets and no threads.

The encoder process (`encoder_worker/server.py`) runs `prepare` on its decode pool and `encode`
on its busy loop, and owns the queueing, the store and the replies; the offline `LLM`
(`frontend/offline/media.py`) runs both in-process and hands the embeddings to its engine core.
So both paths batch, replay graphs and check geometry the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from encoder_worker.audio import decode_audio
from encoder_worker.decode import decode_image
from encoder_worker.graphs import TowerGraphs
from encoder_worker.models.base import AudioFeatures, EncoderModel, Patches
from encoder_worker.transfer import HostCopier, PixelUploader
from encoder_worker.video import decode_video
from protocol.geometry import ItemGeometry

# One item's model input (CPU): [3, H, W] float32, patches, or an audio clip's features.
Inputs = torch.Tensor | Patches | AudioFeatures


class EncoderCore:
    def __init__(self, model: EncoderModel, *, max_image_pixels: int, min_image_side: int = 2,
                 cuda_graphs: bool = False):
        self.model = model
        self.max_image_pixels = max_image_pixels
        self.min_image_side = min_image_side
        self.to_device = PixelUploader(model.device)
        self.to_host = HostCopier()
        self.graphs: TowerGraphs | None = None
        shape = model.graph_input_shape()
        if cuda_graphs and model.device.type == "cuda" and shape is not None:
            self.graphs = TowerGraphs(model, shape)
            self.graphs.capture()

    def prepare(self, data: bytes, kwargs: dict[str, Any],
                geometry: dict[str, Any] | None = None, modality: str = "image") -> Inputs:
        """Bytes of an image, a video or an audio clip -> the model's input, checked against the
        frontend's
        ``geometry`` (any thread). MediaError for what the user sent; ValueError when the roles
        disagree on geometry."""
        # The frontend's geometry is what the prompt was sized by (with the request's processor
        # settings): preprocess to it, then check the result makes that many rows.
        geo = None if geometry is None else ItemGeometry.from_meta(geometry)
        if modality == "audio":
            samples = decode_audio(data, self.model.sampling_rate,
                                   None if geo is None else geo.num_samples)
            inputs = self.model.preprocess_audio(samples, geo)
        elif modality == "video":
            video = decode_video(
                data, lambda total, fps: self.model.video_frames(total, fps, kwargs),
                max_pixels=self.max_image_pixels)
            inputs = (self.model.preprocess_video(video) if geo is None
                      else self.model.preprocess_video_to(video, geo))
        else:
            image = decode_image(data, kwargs, max_pixels=self.max_image_pixels,
                                 min_side=self.min_image_side)
            inputs = (self.model.preprocess(image) if geo is None
                      else self.model.preprocess_to(image, geo))
        if geo is not None:
            check_geometry(inputs, geo)
        return inputs

    def batches(self, inputs: list[Inputs]) -> list[list[int]]:
        """Indices of ``inputs`` that run as one forward: all of them for a model that packs
        variable sizes, else one group per input shape (only equal shapes stack)."""
        if self.model.packs_variable_sizes:
            return [list(range(len(inputs)))]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(inputs):
            by_shape.setdefault(tuple(x.shape), []).append(i)
        return list(by_shape.values())

    def encode_batch(self, inputs: list[Inputs]) -> list[torch.Tensor]:
        """One forward over one batch (see `batches`) -> each item's [n, hidden] embedding, on
        the CPU, owning its memory."""
        return self.to_host(self.encode_batch_device(inputs))

    def encode_batch_device(self, inputs: list[Inputs]) -> list[torch.Tensor]:
        """`encode_batch` left on the model's device: a graph replay's outputs are its static
        buffers, valid until the next forward (`to_host` copies them out)."""
        if self.model.packs_variable_sizes:
            return self.model.encode_packed(inputs)
        return (self.graphs or self.model).encode(self.to_device(inputs))

    def encode(self, inputs: list[Inputs]) -> list[torch.Tensor]:
        """Every input's embedding, in order, in as few forwards as `batches` allows."""
        out: list[torch.Tensor | None] = [None] * len(inputs)
        for group in self.batches(inputs):
            for i, tensor in zip(group, self.encode_batch([inputs[i] for i in group])):
                out[i] = tensor
        return out


def check_geometry(inputs: Inputs, geo: ItemGeometry) -> None:
    """The frontend sized the prompt by ``geo``: an input of another grid or size would make
    another number of embedding rows. A mismatch means the roles read the checkpoint's settings
    differently, so it is a ValueError (answered 500), not the user's fault."""
    if isinstance(inputs, AudioFeatures):
        got, want = (inputs.num_tokens,), (geo.num_tokens,)
    elif isinstance(inputs, Patches):
        got, want = inputs.grid_thw, geo.grid_thw
    else:
        got, want = tuple(inputs.shape[-2:]), geo.resized_hw
    if want is not None and tuple(got) != tuple(want):
        raise ValueError(f"preprocessing made {tuple(got)}, the request's geometry says "
                         f"{tuple(want)}")
