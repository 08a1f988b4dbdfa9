"""Media parts of chat messages: parsing (shapes, limits, interleaving) and resolving (keys,
placeholder counts, concurrency)."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import time

import pytest
import torch
from PIL import Image

from frontend.config import FrontendConfig
from frontend.errors import RequestError
from frontend.media.fetch import MediaFetcher
from frontend.media.parse import MediaRef, ResolvedItem, parse_media, resolve
from frontend.models import MediaPlaceholders
from frontend.models.llava import LlavaPlaceholders
from protocol.geometry import ItemGeometry, MediaGeometry
from protocol.geometry.llava import LlavaGeometry
from protocol.hashing import content_key, uuid_key

LIMITS = {"image": 8}
HIDDEN = 64
LLAVA = LlavaPlaceholders(  # 16 tokens per image
    3, LlavaGeometry({"vision_config": {"image_size": 32, "patch_size": 8}}, {}), HIDDEN)
LLAVA_GEOMETRY = {"num_tokens": 16, "grid_thw": None, "resized_hw": [32, 32]}  # what travels


def _png(w: int = 12, h: int = 10, color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _embeds_b64(t: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(t, buf)
    return base64.b64encode(buf.getvalue()).decode()


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _img(url, **kw) -> dict:
    return {"type": "image_url", "image_url": url, **kw}


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


# -- parse --------------------------------------------------------------------------------------

def test_interleaving_and_refs():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            _text("first"), _img({"url": "https://a.example/1.png", "detail": "low"}),
            _text("then"), _img("https://a.example/2.png", uuid="two"),
            {"type": "image_embeds", "image_embeds": "QUJD"}, "bare text",
        ]},
        {"role": "user", "content": [_img(None, uuid="cached"), _text("last")]},
    ]
    before = copy.deepcopy(messages)
    parsed = parse_media(messages, LIMITS)
    assert messages == before  # the request's own objects are left alone
    assert parsed.messages[0] == messages[0]
    assert parsed.messages[1]["content"] == [
        _text("first"), {"type": "image"}, _text("then"), {"type": "image"}, {"type": "image"},
        "bare text"]
    assert parsed.messages[2]["content"] == [{"type": "image"}, _text("last")]
    assert parsed.refs == [
        MediaRef("image", "url", "https://a.example/1.png", None,
                 "messages[1].content[1].image_url"),
        MediaRef("image", "url", "https://a.example/2.png", "two",
                 "messages[1].content[3].image_url"),
        MediaRef("image", "embeds", "QUJD", None, "messages[1].content[4].image_embeds"),
        MediaRef("image", "uuid", None, "cached", "messages[2].content[0].image_url"),
    ]


def test_pil_and_input_image():
    img = Image.new("RGB", (4, 4))
    parsed = parse_media(_user({"type": "image_pil", "image_pil": img},
                               {"type": "input_image", "image_url": "https://x.example/a.png"}),
                         LIMITS)
    assert [(r.kind, r.value) for r in parsed.refs] == [("pil", img),
                                                        ("url", "https://x.example/a.png")]


def test_limit_per_prompt():
    two = [_img(f"https://a.example/{i}.png") for i in range(2)]
    msgs = [{"role": "user", "content": two}, {"role": "user", "content": [_img(None, uuid="u")]}]
    assert len(parse_media(msgs, {"image": 3}).refs) == 3
    with pytest.raises(RequestError, match="at most 2 image") as e:
        parse_media(msgs, {"image": 2})
    assert e.value.param == "messages" and e.value.status == 400
    with pytest.raises(RequestError, match="at most 0 image"):
        parse_media(_user(_img("https://a.example/x.png")), {"image": 0})


@pytest.mark.parametrize("part,param,match", [
    ({"type": "image"}, "messages[0].content[0].type", "unknown content part type"),
    ({"type": "video"}, "messages[0].content[0].type", "unknown content part type"),
    ({"type": "audio_url", "audio_url": None}, "messages[0].content[0].audio_url", "uuid"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}},
     "messages[0].content[0].input_audio.format", "wav, flac, mp3, ogg"),
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
     "messages[0].content[0].input_audio.data", "base64"),
    ({"type": "input_audio", "input_audio": "AAAA"}, "messages[0].content[0].input_audio",
     "object"),
    (_img(None), "messages[0].content[0].image_url", "uuid"),
    ({"type": "image_url"}, "messages[0].content[0].image_url", "required"),
    (_img({"detail": "high"}), "messages[0].content[0].image_url.url", "non-empty string"),
    (_img(""), "messages[0].content[0].image_url", "url"),
    (_img(5), "messages[0].content[0].image_url", "url"),
    (_img("https://a/b", uuid=""), "messages[0].content[0].uuid", "non-empty string"),
    (_img("https://a/b", uuid="u" * 257), "messages[0].content[0].uuid", "256"),
    (_img("https://a/b", uuid=7), "messages[0].content[0].uuid", "non-empty string"),
    ({"type": "image_embeds", "image_embeds": None}, "messages[0].content[0].image_embeds",
     "uuid"),
    ({"type": "image_embeds", "image_embeds": ["a"]}, "messages[0].content[0].image_embeds",
     "base64"),
    ({"type": "image_pil", "image_pil": "x.png"}, "messages[0].content[0].image_pil", "PIL"),
    ({"type": "image_pil", "image_pil": None}, "messages[0].content[0].image_pil", "uuid"),
    ({"type": "image_pil", "image_pil": [[0]]}, "messages[0].content[0].image_pil", "numpy"),
    # uuids become cache keys, log lines and UTF-8 on the wire: printable text only.
    (_img("https://a/b", uuid="a\nb"), "messages[0].content[0].uuid", "printable"),
    (_img("https://a/b", uuid="a\x00b"), "messages[0].content[0].uuid", "printable"),
    (_img("https://a/b", uuid="\ud800x"), "messages[0].content[0].uuid", "printable"),
    (_img("https://a/b", uuid="\u202e"), "messages[0].content[0].uuid", "printable"),
    (_img("https://a/b", uuid=["u"]), "messages[0].content[0].uuid", "non-empty string"),
])
def test_bad_parts(part, param, match):
    with pytest.raises(RequestError, match=match) as e:
        parse_media(_user(part), LIMITS)
    assert e.value.param == param and e.value.status == 400


def test_uuid_length_boundary():
    assert parse_media(_user(_img(None, uuid="u" * 256)), LIMITS).refs[0].uuid == "u" * 256
    odd = "ünï cödé/../?#%20 \u4e2d"  # printable, however odd: a fine uuid
    assert parse_media(_user(_img(None, uuid=odd)), LIMITS).refs[0].uuid == odd


def test_offline_only_part_values(config):
    import numpy as np

    pil = Image.new("RGB", (20, 30), (1, 2, 3))
    t = torch.randn(5, HIDDEN)
    a, b, c, d = run_resolve(_user({"type": "image_pil", "image_pil": pil},
                                   {"type": "image_pil", "image_pil": np.asarray(pil)},
                                   {"type": "image_pil", "image_pil": None, "uuid": "p"},
                                   {"type": "image_embeds", "image_embeds": t}), config)
    assert a.key == b.key and b.meta == {"width": 20, "height": 30, "format": "PNG",
                                         "geometry": LLAVA_GEOMETRY}
    assert c.key == uuid_key("p") and c.data is None
    assert torch.equal(d.embeds, t) and d.num_tokens == 5
    for bad, match in [(torch.zeros(1).expand(10**4, HIDDEN), "repeats"),
                       (torch.zeros(2, 5, HIDDEN), "holds 2 images"),
                       (torch.zeros(5, HIDDEN, dtype=torch.complex64), "dtype")]:
        with pytest.raises(RequestError, match=match) as e:
            run_resolve(_user({"type": "image_embeds", "image_embeds": bad}), config)
        assert e.value.param == "messages[0].content[0].image_embeds"


# -- resolve ------------------------------------------------------------------------------------

@pytest.fixture
def config(tmp_path):
    return FrontendConfig(model=str(tmp_path))


def run_resolve(messages, config, placeholders=LLAVA, fetcher=None) -> list[ResolvedItem]:
    refs = parse_media(messages, config.limit_mm_per_prompt).refs

    async def go():
        f = fetcher or MediaFetcher(config)
        try:
            return await resolve(refs, f, placeholders, config)
        finally:
            if fetcher is None:
                await f.close()

    return asyncio.run(go())


def test_resolve_url_pil_uuid(config):
    png = _png()
    pil = Image.new("RGB", (20, 30), (1, 2, 3))
    items = run_resolve(_user(_img({"url": _data_url(png)}), _img(_data_url(png), uuid="mine"),
                              {"type": "image_pil", "image_pil": pil}, _img(None, uuid="old")),
                        config)
    url, with_uuid, from_pil, uuid_only = items
    assert url.key == content_key(png, {}) and url.data == png and url.num_tokens == 16
    assert url.meta == {"width": 12, "height": 10, "format": "PNG", "geometry": LLAVA_GEOMETRY}
    assert url.param == "messages[0].content[0].image_url" and url.embeds is None
    assert with_uuid.key == uuid_key("mine") and with_uuid.data == png
    # PIL images travel as lossless PNG bytes: same pixels, keyed by content.
    assert Image.open(io.BytesIO(from_pil.data)).tobytes() == pil.tobytes()
    assert from_pil.key == content_key(from_pil.data, {}) and from_pil.meta["width"] == 20
    assert uuid_only == ResolvedItem("image", uuid_key("old"), None, None, 16, {},
                                     "messages[0].content[3].image_url",
                                     {"geometry": LLAVA_GEOMETRY})


def test_media_io_kwargs_change_the_key(tmp_path):
    png = _png()

    def key(**kw):
        cfg = FrontendConfig(model=str(tmp_path), **kw)
        return run_resolve(_user(_img(_data_url(png))), cfg)[0]

    white = key(media_io_kwargs={"image": {"rgba_background_color": [255, 255, 255]}})
    black = key(media_io_kwargs={"image": {"rgba_background_color": (0, 0, 0)}})
    assert white.kwargs == {"rgba_background_color": [255, 255, 255]}
    assert len({white.key, black.key, key().key}) == 3
    assert key(media_io_kwargs={"image": {"rgba_background_color": [0, 0, 0]}}).key == black.key


def test_resolve_embeds(config):
    t = torch.randn(5, HIDDEN)
    a, b = run_resolve(_user({"type": "image_embeds", "image_embeds": _embeds_b64(t)},
                             {"type": "image_embeds", "image_embeds": _embeds_b64(t),
                              "uuid": "e1"}), config)
    assert a.num_tokens == 5 and a.data is None and torch.equal(a.embeds, t)
    assert a.key == content_key(t.numpy().tobytes(), {"embeds": True})
    assert b.key == uuid_key("e1")
    with pytest.raises(RequestError, match="hidden size must be 64") as e:
        run_resolve(_user({"type": "image_embeds", "image_embeds": _embeds_b64(t[:, :8])}),
                    config)
    assert e.value.param == "messages[0].content[0].image_embeds"
    with pytest.raises(RequestError, match="holds 2 images; at most 1"):
        run_resolve(_user({"type": "image_embeds",
                           "image_embeds": _embeds_b64(torch.randn(2, 5, HIDDEN))}), config)


def test_text_only_model_refuses_media(config):
    with pytest.raises(RequestError, match="does not accept image input") as e:
        run_resolve(_user(_text("hi"), _img(_data_url(_png()))), config, placeholders=None)
    assert e.value.param == "messages[0].content[1].image_url"
    assert run_resolve(_user(_text("hi")), config, placeholders=None) == []


class _QuarterGrid(MediaGeometry):
    def image(self, width: int, height: int, images_in_prompt: int = 1) -> ItemGeometry:
        return ItemGeometry((width // 4) * (height // 4), (1, height // 4, width // 4))


class _SizeDependent(MediaPlaceholders):
    image_token_id, hidden_size, geometry = 3, HIDDEN, _QuarterGrid({}, {})

    @classmethod
    def from_pretrained(cls, model_dir):
        return cls()


def test_uuid_only_needs_a_fixed_count(config):
    item = run_resolve(_user(_img(_data_url(_png(16, 8)))), config, _SizeDependent())[0]
    assert item.num_tokens == 8
    assert item.meta["geometry"] == {"num_tokens": 8, "grid_thw": [1, 2, 4], "resized_hw": None}
    with pytest.raises(RequestError, match="needs the image"):
        run_resolve(_user(_img(None, uuid="x")), config, _SizeDependent())


def test_bad_item_fails_the_request(config):
    with pytest.raises(RequestError, match="cannot decode") as e:
        run_resolve(_user(_img(_data_url(_png())), _img(_data_url(b"garbage"))), config)
    assert e.value.param == "messages[0].content[1].image_url"
    with pytest.raises(RequestError, match="too small"):
        run_resolve(_user(_img(_data_url(_png(1, 1)))), config)


class _SlowFetcher:
    """Serves each URL after a delay; 'fail' fails at once. Records cancellations."""

    def __init__(self, delay: float):
        self.delay = delay
        self.cancelled = 0

    async def fetch(self, url: str, param: str, modality: str = "image") -> bytes:
        if url == "fail":
            raise RequestError("boom", param)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return _png()


def test_items_resolve_concurrently(config):
    fetcher = _SlowFetcher(0.3)
    t0 = time.perf_counter()
    items = run_resolve(_user(*[_img(f"u{i}") for i in range(4)]), config, fetcher=fetcher)
    assert len(items) == 4 and time.perf_counter() - t0 < 0.9  # serial would take 1.2 s
    fetcher = _SlowFetcher(5.0)
    t0 = time.perf_counter()
    with pytest.raises(RequestError, match="boom"):
        run_resolve(_user(_img("slow1"), _img("fail"), _img("slow2")), config, fetcher=fetcher)
    assert time.perf_counter() - t0 < 2 and fetcher.cancelled == 2  # the rest stop at once


def test_embeds_dict_keys_and_grid_are_checked(config):
    """The dict form ({"image_embeds", "image_grid_thw"}) refuses other keys and malformed
    grids, each naming its own field; LLaVA (no grid in its positions) ignores a grid."""
    import base64
    import io

    buf = io.BytesIO()
    torch.save(torch.randn(16, HIDDEN), buf)
    b64 = base64.b64encode(buf.getvalue()).decode()
    where = "messages[0].content[0].image_embeds"
    cases = [({"a": b64}, where, "must hold image_embeds"),
             ({"image_embeds": b64, "image_grid_thw": [1, 2]}, f"{where}.image_grid_thw",
              "3 integers"),
             ({"image_embeds": b64, "image_grid_thw": "bm90IGEgemlw"}, f"{where}.image_grid_thw",
              "image_grid_thw must be the base64")]
    for value, param, match in cases:
        with pytest.raises(RequestError, match=match) as e:
            run_resolve(_user({"type": "image_embeds", "image_embeds": value}), config)
        assert e.value.param == param
    item = run_resolve(_user({"type": "image_embeds", "image_embeds": {
        "image_embeds": b64, "image_grid_thw": [1, 4, 4]}}), config)[0]
    assert item.num_tokens == 16 and item.meta["geometry"]["grid_thw"] is None
