"""LLaVA-1.5 placeholder counts and expansion, checked against transformers' own processor."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers
from PIL import Image

from frontend.errors import RequestError
from frontend.models import load_placeholders, require_image_support
from frontend.models.llava import LlavaPlaceholders
from frontend.random_model import IMAGE_TOKEN, build_random_llava
from protocol.geometry.llava import LlavaGeometry

PROMPT = "<|im_start|>user\n<image>Describe this<image> now<|im_end|>\n<|im_start|>assistant\n"
IMAGES = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (17, 50), (0, 0, 255))]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return build_random_llava(tmp_path_factory.mktemp("llava"))  # 32px tower, 8px patches


@pytest.fixture(scope="module")
def llava_full(llava, tmp_path_factory):
    """The same checkpoint with the "full" feature strategy (keeps CLS: one more token)."""
    out = tmp_path_factory.mktemp("llava_full") / "m"
    shutil.copytree(llava, out)
    for name in ("config.json", "processor_config.json"):
        cfg = json.loads((out / name).read_text())
        cfg["vision_feature_select_strategy"] = "full"
        (out / name).write_text(json.dumps(cfg))
    return out


def _hf_ids(folder) -> list[int]:
    processor = transformers.AutoProcessor.from_pretrained(folder)
    ids = processor(text=PROMPT, images=IMAGES)["input_ids"]
    return list(ids[0] if isinstance(ids[0], list) else ids)


@pytest.mark.parametrize("which,per_image", [("llava", 16), ("llava_full", 17)])
def test_expand_matches_transformers(request, which, per_image):
    folder = request.getfixturevalue(which)
    ph = load_placeholders(folder)
    assert isinstance(ph, LlavaPlaceholders)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert ph.image_token_id == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ph.hidden_size == 64
    counts = [ph.num_image_tokens(*img.size) for img in IMAGES]
    assert counts == [per_image, per_image] and ph.fixed_num_image_tokens == per_image
    ids, ranges = ph.expand(tok(PROMPT)["input_ids"], counts, "messages")
    expected = _hf_ids(folder)
    assert ids == expected
    # Each range covers exactly one run of image tokens, in prompt order.
    tid = ph.image_token_id
    assert [off for off, _ in ranges] == [i for i, t in enumerate(expected)
                                          if t == tid and (i == 0 or expected[i - 1] != tid)]
    assert all(ids[o:o + n] == [tid] * n for o, n in ranges)
    assert sum(n for _, n in ranges) == sum(t == tid for t in expected)


def test_expand_offsets_and_mismatch():
    ph = LlavaPlaceholders(9, LlavaGeometry({"vision_config": {"image_size": 32, "patch_size": 8}}, {}),
                           64)
    ids, ranges = ph.expand([1, 9, 2, 9, 3], [2, 3], "messages")
    assert ids == [1, 9, 9, 2, 9, 9, 9, 3] and ranges == [(1, 2), (4, 3)]
    assert ph.expand([1, 2], [], "messages") == ([1, 2], [])
    # A pre-expanded prompt counts every image token as its own item.
    with pytest.raises(RequestError, match="3 image placeholder.*2 image") as e:
        ph.expand([9, 9, 9], [16, 16], "messages")
    assert e.value.param == "messages" and e.value.status == 400
    with pytest.raises(RequestError, match="0 image placeholder"):
        ph.expand([1, 2], [16], "messages")


def _write(folder, config: dict, **files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))


LLAVA_CFG = {"architectures": ["LlavaForConditionalGeneration"], "image_token_index": 7,
             "vision_config": {"image_size": 336, "patch_size": 14},
             "text_config": {"hidden_size": 128}}


def test_legacy_preprocessor_config(tmp_path):
    # LLaVA-1.5 geometry: 336px, 14px patches -> 24 * 24 = 576 tokens.
    _write(tmp_path / "a", LLAVA_CFG)
    assert load_placeholders(tmp_path / "a").fixed_num_image_tokens == 576
    _write(tmp_path / "b", LLAVA_CFG, preprocessor_config={"crop_size": 224})
    assert load_placeholders(tmp_path / "b").fixed_num_image_tokens == 256
    _write(tmp_path / "c", LLAVA_CFG,
           preprocessor_config={"crop_size": {"height": 168, "width": 112}})
    assert load_placeholders(tmp_path / "c").num_image_tokens(1000, 10) == 12 * 8
    cfg = {**LLAVA_CFG, "image_token_id": 5}
    del cfg["image_token_index"]
    _write(tmp_path / "d", cfg)
    assert load_placeholders(tmp_path / "d").image_token_id == 5


def test_registry(tmp_path, llava):
    _write(tmp_path / "text", {"architectures": ["LlamaForCausalLM"]})
    assert load_placeholders(tmp_path / "text") is None
    with pytest.raises(RequestError, match="does not accept image input") as e:
        require_image_support(None, "messages[0].content[0].image_url")
    assert e.value.param == "messages[0].content[0].image_url"
    assert require_image_support(load_placeholders(llava), "x").fixed_num_image_tokens == 16
    _write(tmp_path / "odd", {"architectures": ["NoSuchModelForCausalLM"]})
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_placeholders(tmp_path / "odd")
    _write(tmp_path / "bad", {**LLAVA_CFG, "vision_feature_select_strategy": "cls"})
    with pytest.raises(ValueError, match="strategy"):
        load_placeholders(tmp_path / "bad")


def test_parse_render_resolve_expand(llava, tmp_path):
    """Chat parts -> template -> ids -> resolved items -> expansion, equal to transformers."""
    import asyncio
    import base64
    import io

    from frontend.config import FrontendConfig
    from frontend.media.fetch import MediaFetcher
    from frontend.media.parse import parse_media, resolve

    def data_url(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}},
        {"type": "text", "text": "Describe this"},
        {"type": "image_pil", "image_pil": IMAGES[1]},
        {"type": "text", "text": " now"},
    ]}]
    config = FrontendConfig(model=str(llava))
    parsed = parse_media(messages, config.limit_mm_per_prompt)
    tok = transformers.AutoTokenizer.from_pretrained(llava)
    prompt = tok.apply_chat_template(parsed.messages, tokenize=False, add_generation_prompt=True)
    assert prompt == PROMPT
    ph = load_placeholders(llava)

    async def go():
        fetcher = MediaFetcher(config)
        try:
            return await resolve(parsed.refs, fetcher, ph, config)
        finally:
            await fetcher.close()

    items = asyncio.run(go())
    ids, ranges = ph.expand(tok(prompt)["input_ids"], [it.num_tokens for it in items], "messages")
    assert ids == _hf_ids(llava) and len(ranges) == 2
