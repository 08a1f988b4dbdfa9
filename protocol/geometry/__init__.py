"""Media geometry: what one media item becomes, computed once, torch-free.

Per architecture, one function maps the checkpoint's settings and an item's probed size to an
`ItemGeometry`: the placeholder count in the prompt, the patch grid the tower sees and the size
the preprocessing resizes to. The frontend computes it from the probed header (it sizes the
prompt), sends it in the EncodeRequest and the MMItem's meta, and the encoder and the decoder read
it from there (the encoder checks its own preprocessing against it); no role recomputes it.

`GEOMETRY` maps the HF ``architectures`` name to "module:class" of a `MediaGeometry` subclass
(protocol/models.py's geometry column); values are import paths so that a role imports only its
model's module.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.checkpoint import (
    audio_processor_config,
    image_processor_config,
    video_processor_config,
)
from protocol.models import column

if TYPE_CHECKING:
    from collections.abc import Mapping


@dataclass(frozen=True)
class ItemGeometry:
    num_tokens: int  # placeholder tokens (= embedding rows) of the item in the prompt
    grid_thw: tuple[int, int, int] | None = None  # patches (t, h, w) before any merge; None: fixed
    resized_hw: tuple[int, int] | None = None  # (height, width) the preprocessing resizes to
    # A video's seconds per temporal grid step (Qwen2.5-VL's M-RoPE places its frames in time).
    seconds_per_grid_t: float | None = None
    # A preprocessing variant the geometry chose, which the encoder follows and the cache key
    # includes (LLaVA-OneVision: "base", an image of a multi-image prompt gets its base tile).
    variant: str | None = None
    # An audio clip's length in samples at the model's rate, from its header: the encoder fits
    # the decoded, resampled clip to it (a header's count and a decode can differ by a frame).
    num_samples: int | None = None

    def to_meta(self) -> dict[str, Any]:
        """The form that travels in message metadata (msgspec-encodable); an image's meta has
        no ``seconds_per_grid_t`` key (the decoder reads a missing one as one second)."""
        meta: dict[str, Any] = {
            "num_tokens": self.num_tokens,
            "grid_thw": list(self.grid_thw) if self.grid_thw else None,
            "resized_hw": list(self.resized_hw) if self.resized_hw else None}
        if self.seconds_per_grid_t is not None:
            meta["seconds_per_grid_t"] = self.seconds_per_grid_t
        if self.variant is not None:
            meta["variant"] = self.variant
        if self.num_samples is not None:
            meta["num_samples"] = self.num_samples
        return meta

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ItemGeometry:
        grid, hw = meta.get("grid_thw"), meta.get("resized_hw")
        seconds = meta.get("seconds_per_grid_t")
        samples = meta.get("num_samples")
        return cls(int(meta["num_tokens"]), tuple(grid) if grid else None,
                   tuple(hw) if hw else None, None if seconds is None else float(seconds),
                   meta.get("variant"), None if samples is None else int(samples))


class ProcessorKwargError(ValueError):
    """A refused ``mm_processor_kwargs`` entry; ``key`` is its path inside them (e.g.
    ``max_pixels``, ``size.longest_edge``; "" for the whole value), for a 400 naming the field."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


class MediaGeometry:
    """One architecture's media arithmetic, built from its config.json and processor settings.

    ``image(width, height)`` raises ValueError (a message for the client, naming no field) for
    a size the model cannot take. ``fixed_image`` is the geometry when it does not depend on the
    size (then an item sent by uuid alone can be placed), else None. Models that take videos
    set ``takes_video`` and implement ``video``. Models whose processing has settings a request
    may change (``mm_processor_kwargs``) override ``with_processor_kwargs`` and
    ``processor_settings``.
    """

    fixed_image: ItemGeometry | None = None
    takes_video: bool = False
    # Audio models implement ``audio``; their settings are the feature extractor's.
    takes_audio: bool = False
    # The decoder places an item's rows by its grid (M-RoPE): embeddings need theirs.
    positions_need_grid: bool = False
    # The rate videos are sampled at, set by mm_processor_kwargs' fps; None: the server's
    # media_io_kwargs rule. (In-memory frames, all kept, are taken as frames at this rate.)
    sample_fps: float | None = None

    def __init__(self, config: dict[str, Any], processor: dict[str, Any]):
        self.config = config
        self.processor = processor

    def with_processor_kwargs(self, kwargs: Mapping[str, Any]) -> MediaGeometry:
        """This geometry with ``mm_processor_kwargs`` (server-wide or one request's) applied
        over its settings, as a new object; `ProcessorKwargError` for a key the model does not
        use or a bad value. This model uses none."""
        for key in kwargs:
            raise ProcessorKwargError(str(key), f"mm_processor_kwargs.{key} is not a setting "
                                      "this model uses (it takes no mm_processor_kwargs)")
        return self

    def processor_settings(self, modality: str) -> dict[str, Any]:
        """The settings of ``modality``'s processing that mm_processor_kwargs changed from the
        checkpoint's (msgspec-encodable); they enter the item's cache key, since the same bytes
        processed otherwise are another embedding (or other positions). Empty: none changed."""
        return {}

    def image(self, width: int, height: int, images_in_prompt: int = 1) -> ItemGeometry:
        """``images_in_prompt``: how many images the item's prompt holds (LLaVA-OneVision
        processes the images of a multi-image prompt differently)."""
        raise NotImplementedError

    def embeds(self, num_rows: int, grid_thw: tuple[int, int, int] | None) -> ItemGeometry:
        """User-supplied embeddings of ``num_rows`` rows (and their grid, where the model's
        positions need one); ValueError as ``image`` when the grid is missing or does not
        make that many rows."""
        return ItemGeometry(num_rows)

    def sample_frames(self, total: int, fps: float, num_frames: int | None = None,
                      sample_fps: float | None = None) -> list[int]:
        """Indices of the frames a video of ``total`` frames at ``fps`` is sampled to (to
        ``num_frames`` frames, or ``sample_fps`` per second); ValueError as ``image``."""
        raise ValueError("this model does not accept video input")

    def video(self, width: int, height: int, num_frames: int, fps: float) -> ItemGeometry:
        """What ``num_frames`` frames of ``width`` x ``height`` pixels, sampled at ``fps``
        frames per second (after frame sampling), become; ValueError as ``image``."""
        raise ValueError("this model does not accept video input")

    def audio(self, num_samples: int, sample_rate: int) -> ItemGeometry:
        """What a clip of ``num_samples`` samples (per channel) at ``sample_rate`` Hz, as its
        header declares them, becomes; ValueError as ``image``."""
        raise ValueError("this model does not accept audio input")


GEOMETRY: dict[str, str] = column("geometry")  # the geometry column of protocol/models.py


def load_geometry(model_dir: str | Path) -> MediaGeometry | None:
    """The geometry of the checkpoint in ``model_dir``; None when its architecture takes no
    media."""
    folder = Path(model_dir)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for arch in config.get("architectures") or []:
        if arch in GEOMETRY:
            module, name = GEOMETRY[arch].split(":")
            cls = getattr(importlib.import_module(module), name)
            if cls.takes_audio:  # the feature extractor's settings
                return cls(config, audio_processor_config(folder) or {})
            if cls.takes_video:  # its own video settings, where the checkpoint has them
                return cls(config, image_processor_config(folder) or {},
                           video_processor_config(folder))
            return cls(config, image_processor_config(folder) or {})
    return None
