"""Media in a chat request, from content parts to mm items and encoder work (steps 3-5).

parse (content parts -> refs, messages for the template) -> resolve (fetch, probe, key) ->
expand (one placeholder token per item -> its run of embedding positions) -> dispatch (one
EncodeRequest per item to the encoder that owns its key; embeddings go encoder -> decoder, never
through here, except the user's own image_embeds, which ride along to the encoder's store).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from frontend.config import FrontendConfig
from frontend.errors import EngineUnavailable
from frontend.media.encoder_pool import EncoderPool
from frontend.media.fetch import MediaFetcher
from frontend.media.parse import ResolvedItem, SeenItems, expand_items, parse_media, resolve
from frontend.models import MediaPlaceholders, load_placeholders, with_processor_kwargs
from protocol.codec import tensor_ref
from protocol.messages import EncodeRequest, MMItem, Ready


class MediaInputs:
    def __init__(self, config: FrontendConfig, pool: EncoderPool | None):
        self.config = config
        # Under the server-wide mm_processor_kwargs; a request's own apply over them (`parse`).
        self.placeholders: MediaPlaceholders | None = load_placeholders(
            config.model, config.mm_processor_kwargs)
        self.fetcher = MediaFetcher(config)
        # Items sent with a uuid, so a later part can name it alone (here or, found in the
        # encoders' store, through another frontend).
        self.seen = SeenItems(remote=pool.lookup if pool is not None else None)
        self.pool = pool

    async def close(self) -> None:
        await self.fetcher.close()

    async def parse(self, messages: Any, processor_kwargs: dict[str, Any] | None = None
                    ) -> tuple[Any, list[ResolvedItem]]:
        """Messages for the chat template (media parts -> {"type": "image"}) and the items,
        sized and keyed under the request's ``processor_kwargs`` (mm_processor_kwargs; checked
        before anything is fetched, also when the request holds no media)."""
        model = with_processor_kwargs(self.placeholders, processor_kwargs)
        parsed = parse_media(messages, self.config.limit_mm_per_prompt)
        items = await resolve(parsed.refs, self.fetcher, model, self.config, self.seen)
        return parsed.messages, items

    def expand(self, prompt_ids: list[int], items: list[ResolvedItem], tokenizer: Any,
               param: str = "messages") -> tuple[list[int], list[MMItem]]:
        return expand_items(self.placeholders, prompt_ids, items, param, tokenizer)

    async def dispatch(self, request_id: str, items: list[ResolvedItem], engine: Ready,
                       reply_to: str, sent: asyncio.Event | None = None) -> None:
        """Have every item's embedding pushed to ``engine``'s inbox (its Unix socket for an
        encoder on its machine); raises the first failure (RequestError for a bad image or a
        uuid cache miss, EngineUnavailable). ``sent`` is set once every item is on its way."""
        if not items:
            return
        if self.pool is None:
            raise EngineUnavailable("this server runs no encoder workers")
        unique = {it.key: it for it in items}  # the same image twice is encoded once
        left = [len(unique)]

        def one_sent() -> None:
            left[0] -= 1
            if left[0] == 0 and sent is not None:
                sent.set()

        await asyncio.gather(*(self._encode(request_id, it, engine, reply_to, one_sent)
                               for it in unique.values()))

    def settle(self, request_id: str) -> None:
        """The request is over (answered or failed): forget its dispatched items."""
        if self.pool is not None:
            self.pool.settle(request_id)

    async def _encode(self, request_id: str, item: ResolvedItem, engine: Ready,
                      reply_to: str, on_sent: Callable[[], None]) -> None:
        buffers: list[Any] = []
        embeds = None
        if item.embeds is not None:
            embeds, buf = tensor_ref(item.embeds, frame=2)
            buffers.append(buf)
        req = EncodeRequest(key=item.key, modality=item.modality, data=item.data,
                            kwargs=item.kwargs, deliver_to=[engine.embed_addr],
                            reply_to=reply_to, request_id=request_id, embeds=embeds,
                            geometry=(item.meta or {}).get("geometry"),
                            deliver_local=({engine.embed_addr: engine.embed_local}
                                           if engine.embed_local else {}),
                            deliver_host=engine.host,
                            deliver_gpus=({engine.embed_local: engine.gpus}
                                          if engine.embed_local and engine.gpus else {}))
        assert self.pool is not None
        await self.pool.encode(req, buffers, on_sent)
