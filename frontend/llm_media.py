"""Media for the offline `LLM`: the same parse/resolve/expand steps as the server, with the
encoder slice run in-process and embeddings handed straight to the in-process engine core.

The engine core's embedding cache doubles as the store here, so `multi_modal_uuids` and
`"image_url": null` + uuid reuse an item across calls of the same `LLM`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from frontend.config import FrontendConfig
from frontend.embeds import validate_image_embeds
from frontend.errors import RequestError
from frontend.media_fetch import MediaFetcher
from frontend.mm_parse import MediaRef, ResolvedItem, parse_media, resolve
from frontend.models import load_placeholders, require_image_support
from protocol.hashing import content_key, uuid_key


class OfflineMedia:
    def __init__(self, config: FrontendConfig, device: str, dtype: str):
        self.config = config
        self.placeholders = load_placeholders(config.model)
        self.device, self.dtype = device, dtype
        self._encoder = None  # loaded on first use: text-only calls never pay for the tower

    def encoder(self):
        if self._encoder is None:
            from encoder_worker.models import load_encoder

            device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available()
                                  else ("cpu" if self.device == "auto" else self.device))
            dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) \
                if self.dtype == "auto" else getattr(torch, self.dtype)
            self._encoder = load_encoder(self.config.model, device, dtype)
        return self._encoder

    # -- items from the two offline request shapes -----------------------------------------------

    def from_multi_modal_data(self, data: dict[str, Any], uuids: dict[str, Any] | None,
                              param: str) -> list[ResolvedItem]:
        unknown = set(data) - {"image"}
        if unknown:
            raise RequestError(f"unsupported modalities {sorted(unknown)} (supported: image)",
                               f"{param}.multi_modal_data")
        images = data.get("image")
        if images is None:
            return []
        model = require_image_support(self.placeholders, f"{param}.multi_modal_data")
        if isinstance(images, torch.Tensor):  # [num_items, feature, hidden] or [feature, hidden]
            items: list[Any] = list(validate_image_embeds(images, model.hidden_size,
                                                          f"{param}.multi_modal_data.image"))
        else:
            items = list(images) if isinstance(images, (list, tuple)) else [images]
        ids = (uuids or {}).get("image")
        if ids is None:
            ids = [None] * len(items)
        if len(ids) != len(items):
            raise RequestError(f"multi_modal_uuids has {len(ids)} image uuids for {len(items)} "
                               "images", f"{param}.multi_modal_uuids")
        refs, embeds_at = [], {}
        for i, (item, uid) in enumerate(zip(items, ids)):
            where = f"{param}.multi_modal_data.image[{i}]"
            if item is None:
                if not uid:
                    raise RequestError("a None image needs its uuid (to reuse a cached item)",
                                       where)
                refs.append(MediaRef("image", "uuid", None, uid, where))
            elif isinstance(item, torch.Tensor):
                embeds_at[i] = ResolvedItem(
                    "image", uuid_key(uid) if uid else content_key(
                        memoryview(item.contiguous().numpy()).cast("B"), {"embeds": True}),
                    None, item, int(item.shape[0]), {}, where)
                refs.append(None)
            else:
                refs.append(MediaRef("image", "pil", item, uid, where))
        resolved = iter(self._resolve([r for r in refs if r is not None]))
        return [embeds_at[i] if r is None else next(resolved) for i, r in enumerate(refs)]

    def from_chat(self, messages: Any) -> tuple[Any, list[ResolvedItem]]:
        parsed = parse_media(messages, self.config.limit_mm_per_prompt)
        return parsed.messages, self._resolve(parsed.refs)

    def _resolve(self, refs: list[MediaRef]) -> list[ResolvedItem]:
        if not refs:
            return []

        async def run() -> list[ResolvedItem]:
            fetcher = MediaFetcher(self.config)
            try:
                return await resolve(refs, fetcher, self.placeholders, self.config)
            finally:
                await fetcher.close()

        return asyncio.run(run())

    # -- embeddings into the engine ----------------------------------------------------------------

    def provide(self, engine, items: list[ResolvedItem]) -> None:
        """Make sure the engine core holds every item's embedding (encoding misses in-process)."""
        from encoder_worker.decode import MediaError, decode_image

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
                                   "send the image itself", it.param)
            else:
                todo[it.key] = it
        if not todo:
            return
        enc = self.encoder()
        pixels = []
        for it in todo.values():
            try:
                image = decode_image(it.data, it.kwargs, max_pixels=self.config.max_image_pixels)
            except MediaError as e:
                raise RequestError(str(e), it.param) from None
            pixels.append(enc.preprocess(image))
        for it, emb in zip(todo.values(), enc.encode(torch.stack(pixels))):
            err = engine.add_embedding(it.key, emb.cpu())
            if err is not None:
                raise RequestError(err, it.param)
