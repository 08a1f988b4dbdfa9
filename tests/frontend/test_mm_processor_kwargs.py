"""mm_processor_kwargs in the frontend: each refused value is a 400 naming its field, the
accepted ones move the geometry exactly as transformers' processor built with them resizes, the
server-wide settings sit under a request's, and the cache key follows the settings (the same
image at other pixel bounds is another key; the same settings, spelled otherwise, the same)."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import transformers
from PIL import Image

from frontend.config import FrontendConfig
from frontend.errors import RequestError
from frontend.media.inputs import MediaInputs
from frontend.models import load_placeholders, with_processor_kwargs
from frontend.models.llava import LlavaPlaceholders
from frontend.models.qwen2_vl import Qwen2VLPlaceholders
from protocol.geometry.llava import LlavaGeometry
from protocol.geometry.processor_kwargs import MAX_PIXELS
from protocol.geometry.qwen2_vl import Qwen2VLGeometry

P = 28 * 28  # one merge window of pixels
QWEN = Qwen2VLPlaceholders(  # checkpoint bounds [4, 64] windows for images, [2, 32] for videos
    {"image_token_id": 5, "video_token_id": 6, "hidden_size": 8},
    Qwen2VLGeometry({}, {"min_pixels": 4 * P, "max_pixels": 64 * P},
                    {"min_pixels": 2 * P, "max_pixels": 32 * P}))
LLAVA = LlavaPlaceholders(3, LlavaGeometry({"vision_config": {"image_size": 32,
                                                              "patch_size": 8}}, {}), 8)

BAD = [  # (mm_processor_kwargs, the field the 400 names, words of the message)
    ({"max_pixel": 5000}, "max_pixel", "not a setting this model uses"),
    ({"num_frames": 8}, "num_frames", "not a setting"),  # a media_io_kwargs key, not this
    ({"max_pixels": "5000"}, "max_pixels", "integer"),
    ({"max_pixels": 5000.0}, "max_pixels", "integer"),
    ({"max_pixels": True}, "max_pixels", "integer"),
    ({"min_pixels": 0}, "min_pixels", r"\[1, "),
    ({"min_pixels": 9 * P, "max_pixels": 8 * P}, "min_pixels", "must be <= max_pixels"),
    ({"max_pixels": 2 * P}, "max_pixels", "must be <= max_pixels"),  # under the checkpoint's min
    ({"max_pixels": MAX_PIXELS + 1}, "max_pixels", str(MAX_PIXELS)),
    ({"size": {"longest_edge": 0}}, "size.longest_edge", "integer"),
    ({"size": {"height": 224}}, "size.height", "not a setting"),
    ({"size": 224}, "size", "shortest_edge"),
    ({"max_pixels": 8 * P, "size": {"longest_edge": 9 * P}}, "size.longest_edge", "twice"),
    ({"fps": 0}, "fps", r"\(0, 1000\]"),
    ({"fps": -2.0}, "fps", "number"),
    ({"fps": "2"}, "fps", "number"),
    ({"videos_kwargs": {"fps": 0}}, "videos_kwargs.fps", "number"),
    ({"videos_kwargs": {"max_pixels": P}}, "videos_kwargs.max_pixels", "<= max_pixels"),
    ({"videos_kwargs": 3}, "videos_kwargs", "object"),
    ({"images_kwargs": {"fps": 2}}, "images_kwargs.fps", "not a setting"),
    ({"fps": 2, "videos_kwargs": {"fps": 3}}, "videos_kwargs.fps", "twice"),
]


@pytest.mark.parametrize("kwargs,field,words", BAD)
def test_each_refusal_names_its_field(kwargs, field, words):
    with pytest.raises(RequestError, match=words) as e:
        QWEN.with_processor_kwargs(kwargs)
    assert e.value.param == f"mm_processor_kwargs.{field}" and e.value.status == 400


def test_models_without_those_settings_refuse_every_key():
    for placeholders in (LLAVA, None):  # a fixed-size model, a text-only one
        with pytest.raises(RequestError, match="not a setting this model uses") as e:
            with_processor_kwargs(placeholders, {"max_pixels": 5000})
        assert e.value.param == "mm_processor_kwargs.max_pixels"
        assert with_processor_kwargs(placeholders, {}) is placeholders
    with pytest.raises(RequestError, match="must be an object") as e:
        with_processor_kwargs(QWEN, [("max_pixels", 5000)], "prompts[0].mm_processor_kwargs")
    assert e.value.param == "prompts[0].mm_processor_kwargs"


@pytest.mark.parametrize("low,high", [(4 * P, 8 * P), (40 * P, 64 * P), (P, 200 * P)])
def test_geometry_follows_transformers_processor_built_with_the_bounds(tiny_qwen2_vl, low,
                                                                         high):
    ph = load_placeholders(tiny_qwen2_vl)
    under = ph.with_processor_kwargs({"min_pixels": low, "max_pixels": high})
    hf = transformers.Qwen2VLImageProcessorPil.from_pretrained(tiny_qwen2_vl, min_pixels=low,
                                                               max_pixels=high)
    sizes = [(37, 90), (120, 50), (300, 200), (31, 200)]  # (width, height)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)) for w, h in sizes]
    want = hf(images=images, return_tensors="np")["image_grid_thw"].tolist()
    assert [list(under.image_geometry(w, h, "x").grid_thw) for w, h in sizes] == want
    assert ph.geometry.min_pixels != low or ph.geometry.max_pixels != high  # really moved


def test_items_past_the_encoders_cap_are_refused_in_the_frontend():
    from encoder_worker.models.clip_image import MAX_RESIZE_PIXELS

    assert MAX_PIXELS == MAX_RESIZE_PIXELS  # the bound a request may ask for is the encoder's
    big = QWEN.with_processor_kwargs({"min_pixels": MAX_PIXELS // 2, "max_pixels": MAX_PIXELS})
    assert big.image_geometry(4000, 4000, "x").num_tokens > 20_000  # one image still fits
    with pytest.raises(RequestError, match="more than .* pixels in all") as e:
        big.video_geometry(4000, 4000, 64, 30.0, {"num_frames": 8}, "messages[0].content[0]")
    assert e.value.param == "messages[0].content[0]"


def test_flat_keys_move_images_and_videos_nested_ones_one_modality():
    flat = QWEN.with_processor_kwargs({"max_pixels": 16 * P}).geometry
    assert (flat.max_pixels, flat.video_max_pixels) == (16 * P, 16 * P)
    nested = QWEN.with_processor_kwargs({"videos_kwargs": {"size": {"longest_edge": 8 * P}},
                                         "images_kwargs": {"min_pixels": 10 * P}}).geometry
    assert (nested.min_pixels, nested.max_pixels) == (10 * P, 64 * P)
    assert (nested.video_min_pixels, nested.video_max_pixels) == (2 * P, 8 * P)
    assert QWEN.geometry.max_pixels == 64 * P  # the checkpoint's slice is left as it was


def test_request_settings_apply_over_the_server_wide_ones():
    server = QWEN.with_processor_kwargs({"max_pixels": 16 * P, "fps": 1})
    request = server.with_processor_kwargs({"size": {"shortest_edge": 10 * P}}).geometry
    assert (request.min_pixels, request.max_pixels, request.sample_fps) == (10 * P, 16 * P, 1.0)
    assert request.processor_settings("image") == {"min_pixels": 10 * P, "max_pixels": 16 * P}
    assert request.processor_settings("video") == {"min_pixels": 10 * P, "max_pixels": 16 * P,
                                                   "fps": 1.0}
    # Settings equal to the checkpoint's change nothing, so they leave the key alone.
    same = QWEN.with_processor_kwargs({"min_pixels": 4 * P, "max_pixels": 64 * P}).geometry
    assert same.processor_settings("image") == {} == QWEN.geometry.processor_settings("video")


def test_server_wide_settings_are_checked_at_startup(tiny_qwen2_vl):
    with pytest.raises(ValueError, match="mm_processor_kwargs.max_pixels"):
        load_placeholders(tiny_qwen2_vl, {"max_pixels": "big"})
    with pytest.raises(ValueError, match="must be a dict"):
        FrontendConfig(model=tiny_qwen2_vl, mm_processor_kwargs=["max_pixels"])
    ph = load_placeholders(tiny_qwen2_vl, {"max_pixels": 8 * P})
    assert ph.geometry.max_pixels == 8 * P


def _png(w: int, h: int) -> str:
    buf = io.BytesIO()
    rng = np.random.default_rng(w * h)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _parse(media: MediaInputs, parts: list[dict], kwargs=None):
    messages = [{"role": "user", "content": parts}]
    return asyncio.run(media.parse(messages, kwargs))[1]


def test_keys_follow_the_settings(tiny_qwen2_vl):
    media = MediaInputs(FrontendConfig(model=tiny_qwen2_vl), None)
    url = _png(300, 200)
    part = {"type": "image_url", "image_url": {"url": url}}
    plain, = _parse(media, [part])
    small, = _parse(media, [part], {"max_pixels": 8 * P})
    spelled, = _parse(media, [part], {"size": {"longest_edge": 8 * P}})
    assert plain.num_tokens > small.num_tokens == spelled.num_tokens == 6
    assert len({plain.key, small.key}) == 2 and small.key == spelled.key
    assert small.meta["geometry"]["resized_hw"] == [56, 84]  # what the encoder resizes to
    # A uuid names the bytes; other settings make it another key, and a uuid-only part finds
    # the item only under the settings it was sent with.
    named = {**part, "uuid": "cat"}
    a, = _parse(media, [named])
    b, = _parse(media, [named], {"max_pixels": 8 * P})
    assert a.key == "uuid:cat" and b.key.startswith("uuid:cat#kw:") and a.key != b.key
    reuse = {"type": "image_url", "image_url": None, "uuid": "cat"}
    assert _parse(media, [reuse], {"max_pixels": 8 * P})[0].num_tokens == 6
    assert _parse(media, [reuse])[0].num_tokens == plain.num_tokens
    with pytest.raises(RequestError, match="no image with this uuid"):
        _parse(media, [reuse], {"max_pixels": 4 * P})
    # Checked before any media is fetched, and with no media at all.
    with pytest.raises(RequestError) as e:
        _parse(media, [{"type": "text", "text": "hi"}], {"fps": 0})
    assert e.value.param == "mm_processor_kwargs.fps"
    asyncio.run(media.close())
