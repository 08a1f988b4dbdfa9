"""Issue 3 through the offline API: LLaVA parity with transformers for LLM.generate and LLM.chat,
image_embeds == the image itself, uuid reuse and its failure modes."""

from __future__ import annotations

import pytest
from llava_utils import HFLlava, image

from frontend import LLM, SamplingParams
from frontend.errors import RequestError

N = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)


@pytest.fixture(scope="module")
def hf(tiny_llava):
    return HFLlava(tiny_llava)


@pytest.fixture(scope="module")
def llm(tiny_llava):
    return LLM(tiny_llava, max_num_batched_tokens=24)


def test_generate_parity_one_two_interleaved_batched(llm, hf):
    cases = [
        ("<image>What is this?", [image(0)]),
        ("Compare <image> with <image> now", [image(1), image(2)]),
        ("A <image> then text then <image> and <image>.", [image(3), image(4), image(5)]),
        ("<image>What is this?", [image(6, (64, 20))]),
    ]
    prompts = [{"prompt": p, "multi_modal_data": {"image": imgs}} for p, imgs in cases]
    outs = llm.generate(prompts, GREEDY)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == [hf.greedy(p, imgs, N) for p, imgs in cases]
    assert got[0] != got[3], "different images must change the answer"
    assert len(outs[2].prompt_token_ids) > 24  # the images span chunked-prefill steps


def test_chat_parity_with_image_pil_and_data_url(llm, hf):
    import base64

    from llava_utils import png

    url = "data:image/png;base64," + base64.b64encode(png(image(8))).decode()
    content = [{"type": "text", "text": "Look:"}, {"type": "image_pil", "image_pil": image(7)},
               {"type": "text", "text": "and"}, {"type": "image_url", "image_url": {"url": url}}]
    out = llm.chat([{"role": "user", "content": content}], GREEDY)[0]
    assert out.outputs[0].token_ids == hf.greedy(hf.chat_prompt(content), [image(7), image(8)], N)


def test_image_embeds_give_the_same_tokens_as_the_image(llm, hf):
    img = image(9)
    by_image = llm.generate({"prompt": "<image>Hi", "multi_modal_data": {"image": img}}, GREEDY)
    feats = hf.features(img)  # [num_tokens, hidden]
    by_embeds = llm.generate({"prompt": "<image>Hi",
                              "multi_modal_data": {"image": feats.unsqueeze(0)}}, GREEDY)
    assert by_embeds[0].outputs[0].token_ids == by_image[0].outputs[0].token_ids


def test_uuid_reuse_and_misses(tiny_llava, llm):
    img = image(10)
    first = llm.generate({"prompt": "<image>Hi", "multi_modal_data": {"image": [img]},
                          "multi_modal_uuids": {"image": ["pic-10"]}}, GREEDY)
    again = llm.generate({"prompt": "<image>Hi", "multi_modal_data": {"image": [None]},
                          "multi_modal_uuids": {"image": ["pic-10"]}}, GREEDY)
    assert again[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    fresh = LLM(tiny_llava)
    with pytest.raises(RequestError, match="pic-10"):
        fresh.generate({"prompt": "<image>Hi", "multi_modal_data": {"image": [None]},
                        "multi_modal_uuids": {"image": ["pic-10"]}}, GREEDY)
    with pytest.raises(RequestError, match="uuids"):
        llm.generate({"prompt": "<image>Hi", "multi_modal_data": {"image": [img]},
                      "multi_modal_uuids": {"image": ["a", "b"]}}, GREEDY)
    with pytest.raises(RequestError):  # two placeholders, one image
        llm.generate({"prompt": "<image><image>Hi", "multi_modal_data": {"image": [img]}}, GREEDY)
    # The engine is left clean after every failure.
    assert not llm.engine.has_work() and llm.engine.embeds.refs == {}


def test_rgba_background_changes_the_answer(tiny_llava):
    from PIL import Image

    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent: only background
    white = LLM(tiny_llava).generate({"prompt": "<image>Hi", "multi_modal_data": {"image": rgba}},
                                     GREEDY)
    black = LLM(tiny_llava, media_io_kwargs={"image": {"rgba_background_color": [0, 0, 0]}})
    out = black.generate({"prompt": "<image>Hi", "multi_modal_data": {"image": rgba}}, GREEDY)
    assert out[0].outputs[0].token_ids != white[0].outputs[0].token_ids
