"""Media for the offline `LLM`: the same parse/resolve/expand steps as the server, with the
encoder slice run in-process and embeddings handed straight to the in-process engine core.

The engine core's embedding cache doubles as the store here, so `multi_modal_uuids` and
`"image_url": null` + uuid reuse an item across calls of the same `LLM`.

In-memory video frames are encoded losslessly (`frontend.media.video.frames_to_video`) and then
take the fetched-video path: one key, probe and decode path for both, and all the given frames
are kept (they are taken as already sampled). In-memory audio clips ``(array, sampling_rate)``
likewise become float32 WAV bytes (`frontend.media.audio.clip_to_wav`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import torch
from PIL import Image

from frontend.config import FrontendConfig
from frontend.errors import RequestError
from frontend.media.embeds import validate_image_embeds
from frontend.media.fetch import MediaFetcher
from frontend.media.parse import (
    MediaRef,
    ResolvedItem,
    SeenItems,
    check_uuid,
    embeds_item,
    mm_limit,
    parse_media,
    resolve,
)
from frontend.models import (
    MediaPlaceholders,
    load_placeholders,
    require_image_support,
    require_modality,
    with_processor_kwargs,
)


class OfflineMedia:
    def __init__(self, config: FrontendConfig, device: str, dtype: str):
        self.config = config
        # Under LLM(mm_processor_kwargs=...); a prompt's own apply over them (`_resolve`).
        self.placeholders = load_placeholders(config.model, config.mm_processor_kwargs)
        self.device, self.dtype = device, dtype
        self.seen = SeenItems()
        self._encoder = None  # loaded on first use: text-only calls never pay for the tower

    def encoder(self):
        """The encoder core (`encoder_worker/core.py`) over the checkpoint's encoder slice."""
        if self._encoder is None:
            from encoder_worker.core import EncoderCore
            from encoder_worker.models import load_encoder

            device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available()
                                  else ("cpu" if self.device == "auto" else self.device))
            dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) \
                if self.dtype == "auto" else getattr(torch, self.dtype)
            self._encoder = EncoderCore(load_encoder(self.config.model, device, dtype),
                                        max_image_pixels=self.config.max_image_pixels)
        return self._encoder

    # -- items from the two offline request shapes -----------------------------------------------

    def from_multi_modal_data(self, data: Any, uuids: Any, param: str,
                              processor_kwargs: Any = None) -> list[ResolvedItem]:
        """``{"image": ..., "video": ..., "audio": ...}`` of one prompt -> items (images, then
        videos, then audio; the prompt's placeholders say where each goes), checked like
        vLLM's, processed under the prompt's ``processor_kwargs`` (its mm_processor_kwargs).
        See `_image_data`, `_video_data` and `_audio_data` for the values each takes."""
        where_data = f"{param}.multi_modal_data"
        model = with_processor_kwargs(self.placeholders, processor_kwargs,
                                      f"{param}.mm_processor_kwargs")
        _check_modalities(data, "multi_modal_data", "{'image': ...}", where_data)
        return (self._image_data(data.get("image"), uuids, param, model)
                + self._video_data(data.get("video"), uuids, param, model)
                + self._audio_data(data.get("audio"), uuids, param, model))

    def _audio_data(self, clips: Any, uuids: Any, param: str,
                    sized_by: MediaPlaceholders | None) -> list[ResolvedItem]:
        """A clip is ``(array, sampling_rate)`` (the array [samples] or [channels, samples],
        floating point), a [feature, hidden] embedding tensor, or None (reuse the item of its
        uuid); several clips are a list of those."""
        where_data = f"{param}.multi_modal_data"
        if clips is None:
            self._check_uuids(uuids, 0, param, "audio")
            return []
        model = require_modality(self.placeholders, "audio", where_data)
        several = isinstance(clips, list) or (isinstance(clips, tuple) and not _is_clip(clips))
        items = list(clips) if several else [clips]
        limit = mm_limit(self.config.limit_mm_per_prompt, "audio")
        if len(items) > limit:
            raise RequestError(f"at most {limit} audio(s) may be provided in one prompt, got "
                               f"{len(items)}", where_data)
        ids = self._check_uuids(uuids, len(items), param, "audio")
        refs, embeds_at = [], {}
        for i, (item, uid) in enumerate(zip(items, ids)):
            where = f"{where_data}.audio[{i}]" if several else f"{where_data}.audio"
            if item is None:
                if not uid:
                    raise RequestError("a None audio needs its uuid (to reuse a cached item)",
                                       where)
                refs.append(MediaRef("audio", "uuid", None, uid, where))
            elif _is_embeds(item):
                embeds_at[i] = embeds_item(MediaRef("audio", "embeds", item, uid, where), model,
                                           self.config.max_media_bytes)
                refs.append(None)
            elif _is_clip(item):
                refs.append(MediaRef("audio", "clip", item, uid, where))
            else:
                raise RequestError("an audio clip must be a tuple (array, sampling_rate), a "
                                   "[feature, hidden] embedding tensor or None, got "
                                   f"{type(item).__name__}", where)
        resolved = iter(self._resolve([r for r in refs if r is not None], sized_by))
        return [embeds_at[i] if r is None else next(resolved) for i, r in enumerate(refs)]

    def _video_data(self, videos: Any, uuids: Any, param: str,
                    sized_by: MediaPlaceholders | None) -> list[ResolvedItem]:
        """A video is a uint8 array or tensor [T, H, W, 3] (a tensor may be [T, 3, H, W]), a
        list of frames (PIL images or [H, W, 3] arrays), or None (reuse the item of its uuid);
        several videos are a list of those."""
        where_data = f"{param}.multi_modal_data"
        if videos is None:
            self._check_uuids(uuids, 0, param, "video")
            return []
        require_modality(self.placeholders, "video", where_data)
        several = isinstance(videos, (list, tuple)) and bool(videos) and all(
            v is None or _is_video(v) for v in videos)
        items = list(videos) if several else [videos]
        limit = mm_limit(self.config.limit_mm_per_prompt, "video")
        if len(items) > limit:
            raise RequestError(f"at most {limit} video(s) may be provided in one prompt, got "
                               f"{len(items)}", where_data)
        ids = self._check_uuids(uuids, len(items), param, "video")
        refs = []
        for i, (item, uid) in enumerate(zip(items, ids)):
            where = f"{where_data}.video[{i}]" if several else f"{where_data}.video"
            if item is None:
                if not uid:
                    raise RequestError("a None video needs its uuid (to reuse a cached item)",
                                       where)
                refs.append(MediaRef("video", "uuid", None, uid, where))
            else:
                refs.append(MediaRef("video", "frames", item, uid, where))
        return self._resolve(refs, sized_by)

    def _image_data(self, images: Any, uuids: Any, param: str,
                    sized_by: MediaPlaceholders | None) -> list[ResolvedItem]:
        """The image value is a PIL image, a numpy array ([H, W] / [H, W, C] one image,
        [N, H, W, C] several), a tensor ([feature, hidden] / [num_items, feature, hidden]
        embeddings, [N, C, H, W] images), a dict of ``image_embeds`` and ``image_grid_thw``
        (embeddings with the grid a Qwen2-VL model places them by), or a list of: PIL, numpy,
        2-D tensor (embeddings), 3-D tensor ([C, H, W] image), such a dict, or None (reuse the
        item of its uuid)."""
        where_data = f"{param}.multi_modal_data"
        if images is None:
            self._check_uuids(uuids, 0, param)
            return []
        model = require_image_support(self.placeholders, where_data)
        limit = mm_limit(self.config.limit_mm_per_prompt, "image")
        # Counted from the shape first: a tensor over the limit is refused before it is copied.
        count = _count(images)
        if count > limit:
            raise RequestError(f"at most {limit} image(s) may be provided in one prompt, got "
                               f"{count}", where_data)
        items, indexed = self._image_items(images, f"{where_data}.image", model.hidden_size,
                                           limit)
        ids = self._check_uuids(uuids, len(items), param)
        refs, embeds_at = [], {}
        for i, (item, uid) in enumerate(zip(items, ids)):
            where = f"{where_data}.image[{i}]" if indexed else f"{where_data}.image"
            if item is None:
                if not uid:
                    raise RequestError("a None image needs its uuid (to reuse a cached item)",
                                       where)
                refs.append(MediaRef("image", "uuid", None, uid, where))
            elif _is_embeds(item) or isinstance(item, dict):  # the server's rules
                embeds_at[i] = embeds_item(MediaRef("image", "embeds", item, uid, where), model,
                                           self.config.max_media_bytes)
                refs.append(None)
            else:
                refs.append(MediaRef("image", "pil", item, uid, where))
        resolved = iter(self._resolve([r for r in refs if r is not None], sized_by))
        return [embeds_at[i] if r is None else next(resolved) for i, r in enumerate(refs)]

    @staticmethod
    def _image_items(images: Any, param: str, hidden_size: int,
                     limit: int) -> tuple[list[Any], bool]:
        """The image value as a list of items (each None, an image or a [feature, hidden]
        embedding tensor), and whether the value was indexable (errors name ``image[i]``);
        anything else is a RequestError naming where it is."""
        if isinstance(images, torch.Tensor):
            if images.ndim == 2:
                return list(validate_image_embeds(images, hidden_size, param)), False
            if images.ndim == 3:  # embeddings, vLLM's meaning of a 3-D tensor
                return list(validate_image_embeds(images, hidden_size, param,
                                                  max_images=limit)), True
            if images.ndim == 4:
                return list(images.unbind(0)), True  # [N, C, H, W]: N images
            raise RequestError("an image tensor must be [feature, hidden] or [num_items, "
                               "feature, hidden] embeddings, or [N, C, H, W] images, got "
                               f"shape {list(images.shape)}", param)
        if isinstance(images, np.ndarray):
            if images.ndim == 4:
                return list(images), True  # [N, H, W, C]: N images
            return [images], False
        if isinstance(images, (list, tuple)):
            items = list(images)
            for i, item in enumerate(items):
                if (item is not None and not _is_image(item) and not _is_embeds(item)
                        and not isinstance(item, dict)):
                    raise RequestError(_not_an_image(item), f"{param}[{i}]")
            return items, True
        if isinstance(images, (Image.Image, dict)):  # a dict: embeddings with their grid
            return [images], False
        raise RequestError(_not_an_image(images), param)

    @staticmethod
    def _check_uuids(uuids: Any, n: int, param: str,
                     modality: str = "image") -> list[str | None]:
        """``multi_modal_uuids`` -> one uuid (or None) per item of ``modality``, vLLM's
        accepted shapes."""
        where = f"{param}.multi_modal_uuids"
        if uuids is None:
            return [None] * n
        _check_modalities(uuids, "multi_modal_uuids", "{'image': [...]}", where)
        ids = uuids.get(modality)
        if ids is None:
            return [None] * n
        if isinstance(ids, str):
            ids = [ids]  # vLLM allows one string for one item
        if not isinstance(ids, (list, tuple)):
            raise RequestError(f"multi_modal_uuids.{modality} must be a list of str or None",
                               where)
        if len(ids) != n:
            raise RequestError(f"multi_modal_uuids has {len(ids)} {modality} uuids for {n} "
                               f"{modality}s", where)
        return [None if u is None else check_uuid(u, f"{where}.{modality}[{i}]")
                for i, u in enumerate(ids)]

    def from_chat(self, messages: Any, processor_kwargs: Any = None
                  ) -> tuple[Any, list[ResolvedItem]]:
        model = with_processor_kwargs(self.placeholders, processor_kwargs)
        parsed = parse_media(messages, self.config.limit_mm_per_prompt)
        return parsed.messages, self._resolve(parsed.refs, model)

    def _resolve(self, refs: list[MediaRef],
                 sized_by: MediaPlaceholders | None) -> list[ResolvedItem]:
        """``refs`` sized and keyed by ``sized_by`` (the slice under the prompt's processor
        kwargs)."""
        if not refs:
            return []

        async def run() -> list[ResolvedItem]:
            fetcher = MediaFetcher(self.config)
            try:
                return await resolve(refs, fetcher, sized_by, self.config, self.seen)
            finally:
                await fetcher.close()

        return asyncio.run(run())

    # -- embeddings into the engine ----------------------------------------------------------------

    def provide(self, engine, items: list[ResolvedItem]) -> None:
        """Make sure the engine core holds every item's embedding (encoding misses in-process)."""
        from encoder_worker.decode import MediaError

        todo: dict[str, ResolvedItem] = {}
        for it in items:
            if it.key in engine.embeds or it.key in todo:
                continue
            if it.embeds is not None:
                err = engine.add_embedding(it.key, it.embeds)
                if err is not None:
                    raise RequestError(err, it.param)
            elif it.data is None:
                raise RequestError(f"no cached item has uuid {it.key.removeprefix('uuid:')!r}: "
                                   f"send the {it.modality} itself", it.param)
            else:
                todo[it.key] = it
        if not todo:
            return
        core = self.encoder()
        inputs = []
        for it in todo.values():
            try:  # preprocessing bounds its intermediates: MediaError
                inputs.append(core.prepare(it.data, it.kwargs, (it.meta or {}).get("geometry"),
                                           it.modality))
            except MediaError as e:
                raise RequestError(e.message, it.param) from None
        for it, emb in zip(todo.values(), core.encode(inputs)):
            err = engine.add_embedding(it.key, emb)
            if err is not None:
                raise RequestError(err, it.param)


def _count(images: Any) -> int:
    """Items in an image value, from its length or shape alone."""
    if isinstance(images, (list, tuple)):
        return len(images)
    if (isinstance(images, torch.Tensor) and images.ndim in (3, 4)
            or isinstance(images, np.ndarray) and images.ndim == 4):
        return int(images.shape[0])
    return 1


def _is_image(item: Any) -> bool:
    """PIL, numpy, or a 3-D tensor ([C, H, W]: vLLM's list-of-images form)."""
    return (isinstance(item, (Image.Image, np.ndarray))
            or isinstance(item, torch.Tensor) and item.ndim == 3)


def _is_video(item: Any) -> bool:
    """One video in a list of videos: a 4-D array or tensor, or a list of frames."""
    return (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4
            or isinstance(item, (list, tuple)))


def _is_clip(item: Any) -> bool:
    """One offline clip: (array or tensor, sampling rate)."""
    return (isinstance(item, (tuple, list)) and len(item) == 2
            and isinstance(item[0], (np.ndarray, torch.Tensor))
            and isinstance(item[1], (int, float, np.integer)) and not isinstance(item[1], bool))


def _is_embeds(item: Any) -> bool:
    return isinstance(item, torch.Tensor) and item.ndim == 2  # [feature, hidden]


def _not_an_image(item: Any) -> str:
    hint = " (open files with PIL.Image.open)" if isinstance(item, (str, bytes)) else ""
    return ("an image must be a PIL image, a numpy array, a tensor or None, got "
            f"{type(item).__name__}{hint}")


def _check_modalities(value: Any, name: str, example: str, where: str) -> None:
    """A dict keyed by modalities this build serves (images, videos and audio)."""
    if not isinstance(value, dict):
        raise RequestError(f"{name} must be a dict like {example}", where)
    unknown = set(value) - {"image", "video", "audio"}
    if unknown:
        raise RequestError(f"unsupported modalities {sorted(map(str, unknown))} "
                           "(supported: image, video, audio)", where)
