"""``mm_processor_kwargs`` as a model with pixel bounds and video sampling reads them, checked.

The spellings are transformers' (what vLLM hands to the HF processor): flat ``min_pixels`` /
``max_pixels`` / ``size`` {``shortest_edge``, ``longest_edge``} (areas, despite the names) apply to
images and videos alike, as transformers routes a flat kwarg to every processor that takes it;
``images_kwargs`` / ``videos_kwargs`` hold the same keys for one modality only; ``fps`` (flat or in
``videos_kwargs``) is the rate videos are sampled at. One bound given twice in one dict (flat and
nested, or as ``max_pixels`` and ``size.longest_edge``) is refused, as transformers refuses a
kwarg passed two ways.

Every refusal is a `ProcessorKwargError` whose ``key`` is the path inside mm_processor_kwargs
(``max_pixels``, ``videos_kwargs.size.longest_edge``), so the frontend's 400 names the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from protocol.geometry import ProcessorKwargError

# The largest pixel bound a request may ask for: the encoder's cap on one resized image (and on
# a video's frames together), encoder_worker/models/clip_image.py MAX_RESIZE_PIXELS; a bound past
# it could only make inputs the encoder refuses.
MAX_PIXELS = 1 << 25
MAX_FPS = 1000.0  # media_io_kwargs' bound on a sampling rate (frontend/config.py)

IMAGE_KEYS = ("min_pixels", "max_pixels", "size")
VIDEO_KEYS = (*IMAGE_KEYS, "fps")
_NESTED = {"images_kwargs": ("image", IMAGE_KEYS), "videos_kwargs": ("video", VIDEO_KEYS)}
_SIZE_KEYS = {"shortest_edge": "min_pixels", "longest_edge": "max_pixels"}


class Setting(NamedTuple):
    value: Any
    key: str  # where in mm_processor_kwargs it was given, for errors


def parse_processor_kwargs(kwargs: Any, takes_video: bool = True
                           ) -> dict[str, dict[str, Setting]]:
    """``{"image": {name: Setting}, "video": {...}}`` with names min_pixels, max_pixels (and
    fps for video); ProcessorKwargError for an unknown key, a wrong type, a value out of range or
    a bound given twice. ``takes_video``: False refuses the video-only keys as unused."""
    if not isinstance(kwargs, Mapping):
        raise ProcessorKwargError("", "mm_processor_kwargs must be an object")
    out: dict[str, dict[str, Setting]] = {"image": {}, "video": {}}
    modalities = ("image", "video") if takes_video else ("image",)
    nested = []
    for key, value in kwargs.items():
        key = str(key)
        if key in _NESTED and (takes_video or key == "images_kwargs"):
            nested.append((key, value))
            continue
        used = [m for m in modalities if key in (IMAGE_KEYS if m == "image" else VIDEO_KEYS)]
        if not used:
            raise _unknown(key, _allowed(takes_video))
        for modality in used:
            _put(out[modality], key, value, key)
    for key, value in nested:  # after the flat keys, so a clash names the nested spelling
        modality, allowed = _NESTED[key]
        if not isinstance(value, Mapping):
            raise ProcessorKwargError(key, f"{key} must be an object")
        for sub, v in value.items():
            if str(sub) not in allowed:
                raise _unknown(f"{key}.{sub}", allowed)
            _put(out[modality], str(sub), v, f"{key}.{sub}")
    return out


def _allowed(takes_video: bool) -> tuple[str, ...]:
    return (*VIDEO_KEYS, *_NESTED) if takes_video else (*IMAGE_KEYS, "images_kwargs")


def _unknown(key: str, allowed: tuple[str, ...] | list[str]) -> ProcessorKwargError:
    return ProcessorKwargError(key, f"mm_processor_kwargs.{key} is not a setting this model "
                               f"uses (it takes: {', '.join(allowed)})")


def _put(settings: dict[str, Setting], name: str, value: Any, key: str) -> None:
    if name == "size":
        if not isinstance(value, Mapping) or not value:
            raise ProcessorKwargError(key, f"{key} must be an object with shortest_edge and/or "
                                      "longest_edge (pixel areas)")
        for edge, v in value.items():
            if str(edge) not in _SIZE_KEYS:
                raise _unknown(f"{key}.{edge}", tuple(_SIZE_KEYS))
            _put(settings, _SIZE_KEYS[str(edge)], v, f"{key}.{edge}")
        return
    if name in settings:
        raise ProcessorKwargError(key, f"mm_processor_kwargs gives {name} twice: as "
                                  f"{settings[name].key} and as {key}")
    if name == "fps":
        if type(value) not in (int, float) or not 0 < value <= MAX_FPS:
            raise ProcessorKwargError(key, f"mm_processor_kwargs.{key} must be a number in "
                                      f"(0, {MAX_FPS:g}], got {value!r}")
        settings[name] = Setting(float(value), key)
        return
    if type(value) is not int or not 1 <= value <= MAX_PIXELS:
        raise ProcessorKwargError(key, f"mm_processor_kwargs.{key} must be an integer number of "
                                  f"pixels in [1, {MAX_PIXELS}], got {value!r}")
    settings[name] = Setting(value, key)


def apply_bounds(low: int, high: int, given: dict[str, Setting]) -> tuple[int, int]:
    """(min_pixels, max_pixels) once ``given`` replaces what it names; a min above the max is a
    ProcessorKwargError naming the bound the request gave (the min, when it gave both)."""
    new_low = given["min_pixels"].value if "min_pixels" in given else low
    new_high = given["max_pixels"].value if "max_pixels" in given else high
    if new_low > new_high:
        blame = given.get("min_pixels") or given["max_pixels"]
        raise ProcessorKwargError(blame.key, f"mm_processor_kwargs.{blame.key}: min_pixels "
                                  f"({new_low}) must be <= max_pixels ({new_high})")
    return new_low, new_high
