"""Frontend slices of each architecture: how many placeholder tokens a media item becomes and
where they go in the prompt. Registry from the HF ``architectures`` name to the slice class;
text-only architectures map to None (the server then refuses media parts)."""

from __future__ import annotations

import copy
import importlib
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from frontend.errors import RequestError
from protocol.geometry import ItemGeometry, MediaGeometry, ProcessorKwargError
from protocol.models import MODELS


class MediaPlaceholders(ABC):
    """Placeholder arithmetic of one multimodal architecture (pure: no weights, no tokenizer).

    Each image token in the rendered prompt stands for one image item, in order, each video
    token (models with a ``video_token_id``) for one video item and each audio token (models
    with an ``audio_token_id``) for one audio clip; ``expand`` widens it to
    that item's feature count. The counts come from the architecture's geometry
    (`protocol.geometry`), which the encoder and the decoder read from the item's metadata.
    """

    image_token_id: int | None  # None: the model takes no images (an audio-only model)
    video_token_id: int | None = None  # None: the model takes no video
    audio_token_id: int | None = None  # None: the model takes no audio
    hidden_size: int  # of the embeddings that replace the placeholders (the LM's hidden size)
    geometry: MediaGeometry

    @classmethod
    @abstractmethod
    def from_pretrained(cls, model_dir: str | Path) -> MediaPlaceholders:
        """Read what the arithmetic needs from the checkpoint's config files."""

    def image_geometry(self, width: int, height: int, param: str,
                       images_in_prompt: int = 1) -> ItemGeometry:
        """What one image of this size (pixels, before preprocessing), in a prompt of
        ``images_in_prompt`` images, becomes; 400 naming ``param`` for a size the model
        refuses."""
        try:
            return self.geometry.image(width, height, images_in_prompt)
        except ValueError as e:
            raise RequestError(str(e), param) from None

    def video_geometry(self, width: int, height: int, total_frames: int, fps: float,
                       kwargs: dict[str, Any], param: str) -> ItemGeometry:
        """What a video of this size, frame count and rate (its header's) becomes once sampled
        under its media_io_kwargs (``num_frames`` or ``fps``); 400 naming ``param`` for a video
        the model refuses."""
        try:
            n = len(self.geometry.sample_frames(total_frames, fps, kwargs.get("num_frames"),
                                                kwargs.get("fps")))
            # The sampled frames' rate, as the encoder computes it (`encoder_worker/video.py`).
            return self.geometry.video(width, height, n, n / total_frames * fps)
        except ValueError as e:
            raise RequestError(str(e), param) from None

    def audio_geometry(self, num_samples: int, sample_rate: int, param: str) -> ItemGeometry:
        """What a clip of this length and rate (its header's) becomes; 400 naming ``param``
        for a clip the model refuses."""
        try:
            return self.geometry.audio(num_samples, sample_rate)
        except ValueError as e:
            raise RequestError(str(e), param) from None

    def with_processor_kwargs(self, kwargs: dict[str, Any] | None,
                              param: str = "mm_processor_kwargs") -> MediaPlaceholders:
        """This slice under ``mm_processor_kwargs``: a copy whose geometry applies them (self
        when there are none); 400 naming ``param.<key>`` for one the model refuses."""
        if not _check_kwargs(kwargs, param):
            return self
        try:
            geometry = self.geometry.with_processor_kwargs(kwargs)
        except ProcessorKwargError as e:
            raise RequestError(e.message, f"{param}.{e.key}" if e.key else param) from None
        out = copy.copy(self)
        out.geometry = geometry
        return out

    @property
    def modalities(self) -> tuple[str, ...]:
        """The media kinds this model's prompts can hold."""
        tokens = (("image", self.image_token_id), ("video", self.video_token_id),
                  ("audio", self.audio_token_id))
        return tuple(kind for kind, tok in tokens if tok is not None)

    def token_id(self, modality: str) -> int:
        tok = {"image": self.image_token_id, "video": self.video_token_id,
               "audio": self.audio_token_id}.get(modality)
        if tok is None:
            raise ValueError(f"this model has no {modality} placeholder token")
        return tok

    def num_image_tokens(self, width: int, height: int) -> int:
        """Placeholder tokens for one image of this size."""
        return self.geometry.image(width, height).num_tokens

    @property
    def fixed_image_geometry(self) -> ItemGeometry | None:
        """The geometry when it does not depend on the image size, else None (then an item
        known only by its uuid cannot be placed)."""
        return self.geometry.fixed_image

    @property
    def fixed_num_image_tokens(self) -> int | None:
        fixed = self.geometry.fixed_image
        return None if fixed is None else fixed.num_tokens

    def placeholder_text(self, tokenizer: Any, modality: str = "image") -> str:
        """What a string-content chat template gets where a media part was."""
        return tokenizer.convert_ids_to_tokens(self.token_id(modality))

    def text_placeholders(self, tokenizer: Any) -> dict[str, int]:
        """placeholder text -> its id, for each placeholder the tokenizer has no single token
        for: the prompt then spells it as ordinary tokens (Ultravox's ``<|audio|>`` in Llama
        3's vocabulary, whose ``audio_token_index`` is one past the last id). Empty when every
        placeholder is a token of its own (the slice's `placeholder_text` must then be
        plain text for the id)."""
        return {self.placeholder_text(tokenizer, kind): self.token_id(kind)
                for kind in self.modalities if self.token_id(kind) >= len(tokenizer)}

    def substitute_text_placeholders(self, prompt_ids: list[int], tokenizer: Any,
                                     kinds: list[str]) -> list[int]:
        """The prompt with each placeholder written as text (`text_placeholders`) turned into
        its id, so `expand` can widen it; ``kinds``: the modalities of the request's items.

        The text is found in the decoded prompt, not as one fixed run of ids: BPE merges across
        its edges (Llama 3 spells " <|audio|>" as " <|", "audio", "|>"). Each stretch between two
        placeholders is encoded again on its own, which is how a tokenizer that has the
        placeholder as a special token splits the text around it. Ids already equal to a
        placeholder id stay where they are (a client may send them)."""
        texts = {t: i for t, i in self.text_placeholders(tokenizer).items()
                 if any(self.token_id(k) == i for k in set(kinds))}
        if not texts:
            return prompt_ids
        pattern = re.compile("|".join(re.escape(t) for t in texts))
        placeholder_ids = set(texts.values())
        out: list[int] = []
        run: list[int] = []
        for t in [*prompt_ids, None]:
            if t is not None and t not in placeholder_ids:
                run.append(t)
                continue
            out.extend(_substitute(run, tokenizer, pattern, texts))
            run = []
            if t is not None:
                out.append(t)
        return out

    def expand(self, prompt_ids: list[int], item_tokens: list[int], param: str,
               modalities: list[str] | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        """Replace the k-th placeholder token of each modality by the k-th item of that
        modality's ``item_tokens`` copies of it (``modalities``: each item's, default all
        images), so images and videos interleave in any order.

        Returns the new ids and each item's (offset, length) in them, in item order. Every
        single placeholder token is one item: a prompt pre-expanded by the client is a count
        mismatch (400), as it can't be told apart from many items.
        """
        kinds = modalities or ["image"] * len(item_tokens)
        queues: dict[int, list[int]] = {}  # placeholder token -> its items, in order
        for i, kind in enumerate(kinds):
            queues.setdefault(self.token_id(kind), []).append(i)
        for kind in self.modalities:
            tok = self.token_id(kind)
            want, found = len(queues.get(tok, [])), prompt_ids.count(tok)
            if found != want:
                raise RequestError(f"the prompt has {found} {kind} placeholder(s) but {want} "
                                   f"{kind}(s) were given", param)
        out: list[int] = []
        ranges: list[tuple[int, int]] = [(0, 0)] * len(kinds)
        taken = dict.fromkeys(queues, 0)
        for t in prompt_ids:
            if t in queues:
                i = queues[t][taken[t]]
                taken[t] += 1
                ranges[i] = (len(out), item_tokens[i])
                out.extend([t] * item_tokens[i])
            else:
                out.append(t)
        return out, ranges


class AudioPlaceholders(MediaPlaceholders):
    """An audio-only slice: the config's ``audio_token_index``, widened to each clip's run as
    the architecture's ``geometry_class`` sizes it from the probed header."""

    image_token_id = None
    geometry_class: type[MediaGeometry]  # built from (config, feature extractor settings)

    def __init__(self, config: dict[str, Any], geometry: MediaGeometry):
        text = config.get("text_config") or config
        try:
            self.audio_token_id = int(config.get("audio_token_index",
                                                 config.get("audio_token_id")))
            self.hidden_size = int(text["hidden_size"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("config.json needs audio_token_index and the LM's hidden_size"
                             ) from None
        self.geometry = geometry

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> AudioPlaceholders:
        from protocol.checkpoint import audio_processor_config

        folder = Path(model_dir)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return cls(config, cls.geometry_class(config, audio_processor_config(folder) or {}))


def _substitute(ids: list[int], tokenizer: Any, pattern: re.Pattern,
                texts: dict[str, int]) -> list[int]:
    """``ids`` (no placeholder id among them) with each match of ``pattern`` in their text
    replaced by its placeholder id; ``ids`` themselves when there is none, or when one is no
    token id (the caller's check answers that with a 400)."""
    n = len(tokenizer)
    if not ids or not all(type(t) is int and 0 <= t < n for t in ids):
        return ids
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    out: list[int] = []
    pos = 0
    for m in pattern.finditer(text):
        out.extend(_encode(tokenizer, text[pos:m.start()]))
        out.append(texts[m.group()])
        pos = m.end()
    if pos == 0:
        return ids
    out.extend(_encode(tokenizer, text[pos:]))
    return out


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


# HF architecture -> "module:class" of its slice (protocol/models.py's placeholders column), or
# None for a text-only model. Modules are imported on use so the frontend loads only its model's.
MEDIA_SLICES: dict[str, str | None] = {arch: p.placeholders for arch, p in MODELS.items()}


def load_placeholders(model_dir: str | Path,
                      processor_kwargs: dict[str, Any] | None = None) -> MediaPlaceholders | None:
    """The frontend slice of the checkpoint in ``model_dir``, under the server-wide
    ``processor_kwargs`` (--mm-processor-kwargs); None for a text-only model. Unknown
    architectures and refused processor kwargs are a startup error (ValueError), not a silent
    text-only mode."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in MEDIA_SLICES:
            entry = MEDIA_SLICES[arch]
            if entry is None:
                return with_processor_kwargs(None, processor_kwargs)
            module, name = entry.split(":")
            slice_ = getattr(importlib.import_module(module), name).from_pretrained(model_dir)
            return with_processor_kwargs(slice_, processor_kwargs)
    raise ValueError(f"{model_dir}: unsupported architecture {archs!r} "
                     f"(known: {', '.join(MEDIA_SLICES)})")


def placeholder_texts(placeholders: MediaPlaceholders | None, tokenizer: Any) -> dict[str, str]:
    """modality -> the placeholder token's text (what a string-content chat template needs
    where a media part was), e.g. {"image": "<image>"}; empty for a text-only model."""
    if placeholders is None:
        return {}
    return {kind: placeholders.placeholder_text(tokenizer, kind)
            for kind in placeholders.modalities}


def with_processor_kwargs(placeholders: MediaPlaceholders | None, kwargs: dict[str, Any] | None,
                          param: str = "mm_processor_kwargs") -> MediaPlaceholders | None:
    """``placeholders`` under ``kwargs`` (see `MediaPlaceholders.with_processor_kwargs`); a
    text-only model uses no processor kwargs, so any key is a 400 naming it."""
    if placeholders is not None:
        return placeholders.with_processor_kwargs(kwargs, param)
    if _check_kwargs(kwargs, param):
        key = next(iter(kwargs))
        raise RequestError(f"{param}.{key} is not a setting this model uses (a text-only model "
                           "takes no mm_processor_kwargs)", f"{param}.{key}")
    return None


def _check_kwargs(kwargs: Any, param: str) -> bool:
    """Whether there are processor kwargs to apply (None and {} are none); 400 if not a dict."""
    if kwargs is None:
        return False
    if not isinstance(kwargs, dict):
        raise RequestError(f"{param} must be an object (a dict of settings)", param)
    return bool(kwargs)


def require_image_support(placeholders: MediaPlaceholders | None, param: str,
                          modality: str = "image") -> MediaPlaceholders:
    """400 for a media part sent to a text-only model."""
    if placeholders is None:
        raise RequestError(f"this model does not accept {modality} input", param)
    return placeholders


def require_modality(placeholders: MediaPlaceholders | None, modality: str,
                     param: str) -> MediaPlaceholders:
    """400 for a media part of a kind the model does not take."""
    if placeholders is None or modality not in placeholders.modalities:
        raise RequestError(f"this model does not accept {modality} input", param)
    return placeholders
