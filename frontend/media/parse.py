"""Media parts of chat messages (vLLM's request shapes) -> template parts + resolved items.

Two steps, so nothing is fetched for a request that fails validation:
1. ``parse_media`` (sync, cheap): each media part becomes ``{"type": "image"}`` (or
   ``"video"``) in place (the chat template prints the model's placeholder token there, so text
   and media interleave in any order) and a ``MediaRef`` in prompt order; per-prompt limits are
   enforced here.
2. ``resolve`` (async): fetch + probe or load each ref concurrently -> ``ResolvedItem`` with its
   cache key and placeholder count (request life cycle step 3 in ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import io
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from frontend.config import DEFAULT_LIMIT_MM_PER_PROMPT, FrontendConfig
from frontend.errors import RequestError
from frontend.media import audio as audio_media
from frontend.media.probe import probe_image, to_pil_image
from frontend.media.video import frames_to_video, limits_of, probe_video
from frontend.models import MediaPlaceholders, require_image_support, require_modality
from protocol.hashing import content_key, kwargs_tag, uuid_key
from protocol.messages import MMItem

if TYPE_CHECKING:
    import torch

    from frontend.media.fetch import MediaFetcher

MAX_UUID_CHARS = 256
# Past this many bytes, hashing/probing/decoding moves to a worker thread (event loop stays free).
_THREAD_BYTES = 1 << 20
TEXT_PARTS = ("text",)


class MediaRef(NamedTuple):
    modality: str  # "image" | "video" | "audio"
    kind: str  # "url" | "uuid" | "embeds" | "pil" | "frames" | "b64" | "clip"
    # URL string, base64 string, PIL image, video frames, (base64, format) of input_audio,
    # (array, rate) of an offline clip; None for "uuid"
    value: Any
    uuid: str | None
    param: str  # JSON path of the part's payload, for error messages


class ParsedMessages(NamedTuple):
    messages: list[Any]  # copies; media parts replaced by {"type": "image"}
    refs: list[MediaRef]  # one per media part, in prompt order


class ResolvedItem(NamedTuple):
    modality: str
    key: str  # "uuid:<id>" or "blake3:<hex>"
    data: bytes | None  # raw media bytes for the encoder; None: uuid-only or embeds
    embeds: torch.Tensor | None  # [num_tokens, hidden] float32 for user-supplied embeddings
    num_tokens: int
    kwargs: dict[str, Any]  # media_io_kwargs that shape the embedding (also in the key)
    param: str
    # Probed width, height, format (fetched/PIL images) and the item's geometry
    # (`ItemGeometry.to_meta()`: num_tokens, grid_thw, resized_hw), which travels to the encoder
    # and the decoder.
    meta: dict[str, Any] | None = None


# -- parse --------------------------------------------------------------------------------------

def check_uuid(uuid: object, param: str) -> str:
    """A uuid as a cache key: a short printable string (control characters and lone surrogates
    would break logs and the UTF-8 wire encoding of the key)."""
    if (not isinstance(uuid, str) or not 1 <= len(uuid) <= MAX_UUID_CHARS
            or not uuid.isprintable() or any("\ud800" <= c <= "\udfff" for c in uuid)):
        raise RequestError(f"{param} must be a non-empty string of at most {MAX_UUID_CHARS} "
                           "printable characters", param)
    return uuid


def _uuid(part: dict[str, Any], where: str) -> str | None:
    uuid = part.get("uuid")
    return None if uuid is None else check_uuid(uuid, f"{where}.uuid")


def _media_url(part: dict[str, Any], where: str, field: str, modality: str) -> MediaRef:
    param = f"{where}.{field}"
    if field not in part:
        raise RequestError(f"{param} is required", param)
    value, uuid = part[field], _uuid(part, where)
    if isinstance(value, dict):
        url = value.get("url")
        if not isinstance(url, str) or not url:
            raise RequestError(f"{param}.url must be a non-empty string", f"{param}.url")
        value = url
    if value is None:
        if uuid is None:
            raise RequestError(f"{param} is null: give a uuid to reuse a cached {modality}",
                               param)
        return MediaRef(modality, "uuid", None, uuid, param)
    if not isinstance(value, str) or not value:
        raise RequestError(f"{param} must be an object with a url, or a url string", param)
    return MediaRef(modality, "url", value, uuid, param)


def _image_url(part: dict[str, Any], where: str) -> MediaRef:
    return _media_url(part, where, "image_url", "image")


def _video_url(part: dict[str, Any], where: str) -> MediaRef:
    return _media_url(part, where, "video_url", "video")


def _audio_url(part: dict[str, Any], where: str) -> MediaRef:
    return _media_url(part, where, "audio_url", "audio")


def _input_audio(part: dict[str, Any], where: str) -> MediaRef:
    """OpenAI's ``{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}``;
    null + a uuid reuses a clip already sent."""
    param = f"{where}.input_audio"
    if "input_audio" not in part:
        raise RequestError(f"{param} is required", param)
    value, uuid = part["input_audio"], _uuid(part, where)
    if value is None:
        if uuid is None:
            raise RequestError(f"{param} is null: give a uuid to reuse a cached audio", param)
        return MediaRef("audio", "uuid", None, uuid, param)
    if not isinstance(value, dict):
        raise RequestError(f"{param} must be an object with data (base64) and format", param)
    unknown = set(value) - {"data", "format"}
    if unknown:
        raise RequestError(f"{param}.{sorted(map(str, unknown))[0]} is not a known field",
                           f"{param}.{sorted(map(str, unknown))[0]}")
    data = value.get("data")
    if not isinstance(data, str) or not data:
        raise RequestError(f"{param}.data must be a non-empty base64 string", f"{param}.data")
    fmt = audio_media.parse_format(value.get("format"), f"{param}.format")
    return MediaRef("audio", "b64", (data, fmt), uuid, param)


def _image_embeds(part: dict[str, Any], where: str) -> MediaRef:
    param = f"{where}.image_embeds"
    value, uuid = part.get("image_embeds"), _uuid(part, where)
    if value is None:
        if uuid is None:
            raise RequestError(f"{param} is null: give a uuid to reuse cached embeddings", param)
        return MediaRef("image", "uuid", None, uuid, param)
    # A tensor only comes from the offline API (JSON has none); validate_image_embeds checks it.
    # A dict carries the embeddings with their grid ({"image_embeds", "image_grid_thw"}).
    if not isinstance(value, (str, dict)) and not _is_tensor(value):
        raise RequestError(f"{param} must be the base64 of torch.save(tensor), or an object "
                           "with image_embeds and image_grid_thw (or, offline, tensors)", param)
    return MediaRef("image", "embeds", value, uuid, param)


def _image_pil(part: dict[str, Any], where: str) -> MediaRef:
    from PIL import Image

    param = f"{where}.image_pil"
    value, uuid = part.get("image_pil"), _uuid(part, where)
    if value is None:
        if uuid is None:
            raise RequestError(f"{param} is null: give a uuid to reuse a cached image", param)
        return MediaRef("image", "uuid", None, uuid, param)
    # vLLM hands image_pil to the HF processor, which takes numpy arrays as well.
    if not isinstance(value, Image.Image) and type(value).__module__ != "numpy":
        raise RequestError(f"{param} must be a PIL.Image.Image or a numpy array, got "
                           f"{type(value).__name__}", param)
    return MediaRef("image", "pil", value, uuid, param)


def _is_tensor(value: object) -> bool:
    # Only the offline API can pass a tensor; checking the module avoids importing torch here.
    return type(value).__module__.startswith("torch")


# Part type -> parser. Other modalities add theirs here.
PART_PARSERS: dict[str, Callable[[dict[str, Any], str], MediaRef]] = {
    "image_url": _image_url,
    "input_image": _image_url,
    "image_embeds": _image_embeds,
    "image_pil": _image_pil,
    "video_url": _video_url,
    "audio_url": _audio_url,
    "input_audio": _input_audio,
}


def mm_limit(limit_mm_per_prompt: dict[str, int], modality: str) -> int:
    """Items of ``modality`` one prompt may carry (configured, else the default)."""
    return limit_mm_per_prompt.get(modality, DEFAULT_LIMIT_MM_PER_PROMPT.get(modality, 0))


def parse_media(messages: Any, limit_mm_per_prompt: dict[str, int]) -> ParsedMessages:
    """Replace media parts by template parts and collect their refs; structural checks of
    messages themselves stay with ``frontend.chat.validate_messages``."""
    if not isinstance(messages, list):
        raise RequestError("messages must be a non-empty list", "messages")
    counts: dict[str, int] = {}
    refs: list[MediaRef] = []
    out: list[Any] = []
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(part, str) or kind in TEXT_PARTS or not isinstance(kind, str):
                parts.append(part)  # text, or malformed: validate_messages words that error
                continue
            parser = PART_PARSERS.get(kind)
            if parser is None:
                raise RequestError(f"{where}.type: unknown content part type {kind!r}",
                                   f"{where}.type")
            ref = parser(part, where)
            counts[ref.modality] = counts.get(ref.modality, 0) + 1
            limit = mm_limit(limit_mm_per_prompt, ref.modality)
            if counts[ref.modality] > limit:
                raise RequestError(f"at most {limit} {ref.modality}(s) may be provided in one "
                                   "prompt", "messages")
            refs.append(ref)
            parts.append({"type": ref.modality})
        out.append({**msg, "content": parts})
    return ParsedMessages(out, refs)


# -- resolve ------------------------------------------------------------------------------------

class SeenItems:
    """The meta of the last items this frontend resolved with a uuid (LRU): a model whose
    placeholder count depends on the item's size (Qwen2-VL) can place a later part that names
    only the uuid. A uuid this replica has not seen is asked of the encoder pool (``remote``:
    key -> the geometry the owner's store holds it with), since another replica may have sent
    it; one nobody holds is still a 400 asking for the media."""

    def __init__(self, capacity: int = 4096,
                 remote: Callable[[str], Awaitable[dict[str, Any] | None]] | None = None):
        self.capacity = capacity
        self.remote = remote
        self._meta: OrderedDict[str, dict[str, Any]] = OrderedDict()

    async def find(self, modality: str, key: str) -> dict[str, Any] | None:
        meta = self.get(modality, key)
        if meta is None and self.remote is not None:
            geometry = await self.remote(key)
            if geometry is not None:
                meta = {"geometry": geometry}
                self.put(modality, key, meta)
        return meta

    def get(self, modality: str, key: str) -> dict[str, Any] | None:
        meta = self._meta.get(f"{modality}:{key}")
        if meta is not None:
            self._meta.move_to_end(f"{modality}:{key}")
        return meta

    def put(self, modality: str, key: str, meta: dict[str, Any]) -> None:
        self._meta[f"{modality}:{key}"] = meta
        self._meta.move_to_end(f"{modality}:{key}")
        if len(self._meta) > self.capacity:
            self._meta.popitem(last=False)


async def resolve(refs: list[MediaRef], fetcher: MediaFetcher,
                  placeholders: MediaPlaceholders | None,
                  config: FrontendConfig, seen: SeenItems | None = None) -> list[ResolvedItem]:
    """Fetch/load every ref concurrently; the first failure cancels the rest and is raised."""
    if not refs:
        return []
    model = require_image_support(placeholders, refs[0].param, refs[0].modality)
    for r in refs:
        require_modality(model, r.modality, r.param)
    images = sum(r.modality == "image" for r in refs)  # some models size by the prompt's count
    tasks = [asyncio.ensure_future(_resolve_one(r, fetcher, model, config, seen, images))
             for r in refs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()  # don't keep fetching for a request that already failed
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _resolve_one(ref: MediaRef, fetcher: MediaFetcher, model: MediaPlaceholders,
                       config: FrontendConfig, seen: SeenItems | None,
                       images_in_prompt: int = 1) -> ResolvedItem:
    kwargs = dict(config.media_io_kwargs.get(ref.modality, {}))
    if ref.modality == "video" and model.geometry.sample_fps is not None:
        # mm_processor_kwargs' fps replaces the server's sampling rule (num_frames or fps).
        kwargs = {k: v for k, v in kwargs.items() if k not in ("num_frames", "fps")}
        kwargs["fps"] = model.geometry.sample_fps
    if ref.kind == "frames":  # offline in-memory video frames: all of them, as given
        kwargs = {"num_frames": len(ref.value)}
    settings = model.geometry.processor_settings(ref.modality)
    if ref.kind == "uuid":
        key = _settings_tagged(uuid_key(ref.uuid or ""), settings)
        fixed = model.fixed_image_geometry if ref.modality == "image" else None
        meta = {"geometry": fixed.to_meta()} if fixed is not None else (
            await seen.find(ref.modality, key) if seen is not None else None)
        if meta is None:
            raise RequestError(f"this model needs the {ref.modality} to size it, and no "
                               f"{ref.modality} with this uuid was sent to this server yet: send "
                               "it along with the uuid", ref.param)
        return ResolvedItem(ref.modality, key, None, None, int(meta["geometry"]["num_tokens"]),
                            kwargs, ref.param, meta)
    if ref.kind == "embeds":
        return await _from_embeds(ref, model, config)
    if ref.kind == "pil":
        data = await asyncio.to_thread(_encode_png, ref.value, ref.param, config.max_image_pixels)
    elif ref.kind == "frames":
        data = await asyncio.to_thread(frames_to_video, ref.value, ref.param, limits_of(config))
    elif ref.kind == "clip":
        data = await asyncio.to_thread(audio_media.clip_to_wav, ref.value, ref.param,
                                       audio_media.limits_of(config), config.max_media_bytes)
    elif ref.kind == "b64":
        data = await fetcher.fetch_base64(ref.value[0], f"{ref.param}.data", "audio")
        audio_media.check_format(data, ref.value[1], f"{ref.param}.format")
    else:
        data = await fetcher.fetch(ref.value, ref.param, ref.modality)
    if len(data) > _THREAD_BYTES or ref.modality == "video":
        meta, key = await asyncio.to_thread(_probe_and_key, data, ref, kwargs, config, model,
                                            images_in_prompt, settings)
    else:
        meta, key = _probe_and_key(data, ref, kwargs, config, model, images_in_prompt, settings)
    if ref.uuid and seen is not None:
        seen.put(ref.modality, key, meta)
    return ResolvedItem(ref.modality, key, data, None, int(meta["geometry"]["num_tokens"]),
                        kwargs, ref.param, meta)


def _probe_and_key(data: bytes, ref: MediaRef, kwargs: dict[str, Any], config: FrontendConfig,
                   model: MediaPlaceholders, images_in_prompt: int = 1,
                   settings: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """The item's meta (probed header + geometry) and its cache key; ``settings``: what
    mm_processor_kwargs changed in the processing of this modality (they enter the key)."""
    if ref.modality == "video":
        video = probe_video(data, ref.param, limits_of(config))
        fps = video.fps
        if ref.kind == "frames" and model.geometry.sample_fps is not None:
            fps = model.geometry.sample_fps  # in-memory frames: taken as frames at that rate
        geometry = model.video_geometry(video.width, video.height, video.num_frames, fps,
                                        kwargs, ref.param)
        meta = {"width": video.width, "height": video.height,
                "format": video.format, "codec": video.codec, "num_frames": video.num_frames,
                "fps": video.fps, "geometry": geometry.to_meta()}
    elif ref.modality == "audio":
        param = f"{ref.param}.data" if ref.kind == "b64" else ref.param
        clip = audio_media.probe_audio(data, param, audio_media.limits_of(config))
        geometry = model.audio_geometry(clip.num_samples, clip.sample_rate, param)
        meta = {"sample_rate": clip.sample_rate, "channels": clip.channels,
                "samples": clip.num_samples, "format": clip.format, "codec": clip.codec,
                "geometry": geometry.to_meta()}
    else:
        info = probe_image(data, ref.param, config.max_image_pixels)
        geometry = model.image_geometry(info.width, info.height, ref.param, images_in_prompt)
        meta = {"width": info.width, "height": info.height, "format": info.format,
                "geometry": geometry.to_meta()}
    # The kwargs enter the hash: another rgba_background_color (or frame sampling, or pixel
    # bounds) is another embedding. A uuid is the user's name for the bytes: tagged instead.
    if ref.uuid:
        key = _settings_tagged(uuid_key(ref.uuid), settings)
    else:
        key = content_key(data, {**kwargs, "processor": settings} if settings else kwargs)
    if geometry.variant is not None:  # another preprocessing of the same bytes
        key = f"{key}#{geometry.variant}"
    return meta, key


def _settings_tagged(key: str, settings: dict[str, Any] | None) -> str:
    """``key`` of an item processed under ``settings`` (changed from the checkpoint's): the
    same uuid at other pixel bounds or another frame rate is another embedding, or other
    positions, so another cache entry (and a uuid-only reuse finds only its own settings')."""
    return f"{key}#kw:{kwargs_tag(settings)}" if settings else key


async def _from_embeds(ref: MediaRef, model: MediaPlaceholders,
                       config: FrontendConfig) -> ResolvedItem:
    value = ref.value.get("image_embeds") if isinstance(ref.value, dict) else ref.value
    if isinstance(value, str) and len(value) > _THREAD_BYTES:
        return await asyncio.to_thread(embeds_item, ref, model, config.max_media_bytes)
    return embeds_item(ref, model, config.max_media_bytes)


def embeds_item(ref: MediaRef, model: MediaPlaceholders, max_bytes: int) -> ResolvedItem:
    """User embeddings -> an item: a tensor, the base64 of torch.save(tensor), or a dict of
    ``image_embeds`` and its ``image_grid_thw`` (a list of 3 ints, a tensor, or the base64 of
    torch.save(tensor)), which a grid model (M-RoPE) needs. Checked against the geometry."""
    from frontend.media.embeds import load_image_embeds, load_tensor, validate_image_embeds

    value, grid = ref.value, None
    grid_param = f"{ref.param}.image_grid_thw" if isinstance(value, dict) else ref.param
    if isinstance(value, dict):
        unknown = set(value) - {"image_embeds", "image_grid_thw"}
        if unknown or "image_embeds" not in value:
            raise RequestError(f"{ref.param} must hold image_embeds (and image_grid_thw), got "
                               f"keys {sorted(map(str, value))}", ref.param)
        grid = _grid(value.get("image_grid_thw"), grid_param, max_bytes, load_tensor)
        value = value["image_embeds"]
    where = f"{ref.param}.image_embeds" if isinstance(ref.value, dict) else ref.param
    # max_images=1: one part renders one placeholder; a batch would not line up with the prompt.
    if isinstance(value, str):
        tensors = load_image_embeds(value, model.hidden_size, where, max_bytes, max_images=1)
    elif _is_tensor(value):
        tensors = validate_image_embeds(value, model.hidden_size, where, max_images=1)
    else:
        raise RequestError(f"{where} must be the base64 of torch.save(tensor) (or, offline, a "
                           "tensor)", where)
    t = tensors[0]  # [feature_size, hidden] float32, contiguous
    try:
        geometry = model.geometry.embeds(int(t.shape[0]), grid)
    except ValueError as e:
        raise RequestError(str(e), grid_param) from None
    kwargs = {"embeds": True} if grid is None else {"embeds": True, "grid_thw": list(grid)}
    key = uuid_key(ref.uuid) if ref.uuid else content_key(memoryview(t.numpy()).cast("B"), kwargs)
    return ResolvedItem(ref.modality, key, None, t, geometry.num_tokens, {}, ref.param,
                        {"geometry": geometry.to_meta()})


def _grid(value: Any, param: str, max_bytes: int, load_tensor) -> tuple[int, ...] | None:
    """image_grid_thw as ints: a list (JSON), a tensor (offline) or base64 of torch.save (vLLM's
    wire form); [3] or [1, 3]."""
    if value is None:
        return None
    if isinstance(value, str):
        value = load_tensor(value, param, max_bytes)
    if _is_tensor(value):
        if value.is_floating_point() or value.is_complex() or value.numel() != 3:
            raise RequestError(f"{param} must be 3 integers (t, h, w), got a {value.dtype} "
                               f"tensor of shape {list(value.shape)}", param)
        return tuple(int(v) for v in value.flatten().tolist())
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], list)):
        value = value[0]  # [[t, h, w]], as transformers returns image_grid_thw
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise RequestError(f"{param} must be 3 integers (t, h, w)", param)
    return tuple(value)


def _encode_png(value: Any, param: str, max_pixels: int) -> bytes:
    """Lossless bytes of an in-memory image (PIL, numpy array or tensor; its size checked
    first), so it hashes and travels like fetched bytes."""
    image = to_pil_image(value, param, max_pixels)
    buf = io.BytesIO()
    try:
        if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
            image = image.convert("RGB")  # e.g. CMYK, YCbCr: modes PNG can't store
        image.save(buf, format="PNG")
    except MemoryError:
        raise
    except Exception:
        # A lazily opened image reads its file here: truncated or odd files raise anything.
        raise RequestError("the image could not be encoded as PNG", param) from None
    return buf.getvalue()


# -- expand -------------------------------------------------------------------------------------

def expand_items(placeholders: MediaPlaceholders | None, prompt_ids: list[int],
                 items: list[ResolvedItem], param: str,
                 tokenizer: Any = None) -> tuple[list[int], list[MMItem]]:
    """Each item's placeholder token becomes its run of embedding positions -> wire mm items.
    With the ``tokenizer``, a placeholder it has no token for is found as text first
    (`MediaPlaceholders.substitute_text_placeholders`)."""
    if not items:
        return prompt_ids, []
    model = require_image_support(placeholders, param)
    for it in items:
        require_modality(model, it.modality, it.param)
    kinds = [it.modality for it in items]
    if tokenizer is not None:
        prompt_ids = model.substitute_text_placeholders(prompt_ids, tokenizer, kinds)
    ids, spans = model.expand(prompt_ids, [it.num_tokens for it in items], param, kinds)
    mm = [MMItem(it.key, it.modality, off, n, _item_meta(it.meta))
          for it, (off, n) in zip(items, spans)]
    return ids, sorted(mm, key=lambda m: m.offset)  # images and videos in prompt order


def _item_meta(meta: dict[str, Any] | None) -> dict[str, Any]:
    """An MMItem's meta: the probed size and the geometry's fields (grid_thw, ...) at the top
    level, where the decoder's position rule reads them."""
    flat = dict(meta or {})
    flat.update(flat.pop("geometry", None) or {})
    return flat
