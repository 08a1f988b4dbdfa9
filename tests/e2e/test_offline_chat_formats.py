"""LLM.chat renders the chat template in the content format it asks for (vLLM's
chat_template_content_format): every turn of a multi-turn conversation and every image reach a
template, whether it loops over content parts or prints content as a string."""

from __future__ import annotations

import pytest
from PIL import Image

from frontend import LLM, SamplingParams
from frontend.random_model import IMAGE_TOKEN
from tests.frontend.test_chat_content_format import LLAVA, PRINTS


@pytest.fixture(scope="module")
def llava(tiny_llava, tmp_path_factory):
    template = tmp_path_factory.mktemp("tpl") / "llava.jinja"
    template.write_text(LLAVA)
    return LLM(tiny_llava, chat_template=str(template), max_model_len=512, num_kv_blocks=128)


def _conversation():
    return [
        {"role": "user", "content": [
            {"type": "image_pil", "image_pil": Image.new("RGB", (40, 30), (200, 30, 30))},
            {"type": "text", "text": "What is in this image?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "What colour is it?"},
    ]


def test_parts_template_keeps_string_turns(llava):
    greedy = SamplingParams(temperature=0.0, max_tokens=2)
    prompt = llava.chat(_conversation(), greedy)[0].prompt
    assert prompt == ("USER: <image>\nWhat is in this image? ASSISTANT: A cat. "
                      "USER: What colour is it? ASSISTANT:")


def test_string_template_keeps_the_image_placeholder(llava):
    greedy = SamplingParams(temperature=0.0, max_tokens=2)
    out = llava.chat(_conversation(), greedy, chat_template=PRINTS,
                     chat_template_content_format="string")[0]
    assert out.prompt.count(IMAGE_TOKEN) == 1 and "A cat.|What colour is it?|" in out.prompt
    assert out.outputs[0].token_ids
    # Forcing the parts format on a template that prints content shows the list, not the text.
    forced = llava.chat(_conversation()[1:], greedy, chat_template=PRINTS,
                        chat_template_content_format="openai")
    assert "'type': 'text'" in forced[0].prompt
