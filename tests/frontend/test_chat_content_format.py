"""Content format of chat templates (vLLM's --chat-template-content-format): detection from the
template's syntax tree, and the messages each mode gives the template."""

from __future__ import annotations

import pytest

from frontend.chat import ChatRenderer, detect_content_format
from frontend.errors import RequestError
from frontend.random_model import CHATML_TEMPLATE, IMAGE_TOKEN, build_tokenizer

# llava-hf/llava-1.5-7b-hf's own template: it loops over message['content'] and filters by type.
LLAVA = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Qwen2-VL's shape, reading the content as an attribute.
QWEN = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{% if message.content is string %}"
    "{{ message.content }}<|im_end|>\n{% else %}{% for content in message.content %}"
    "{% if content['type'] == 'image' %}{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-3's: a variable named `content` built by concatenation, no loop over parts.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
CHATML_STRING = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ASSIGNED = (
    "{% for message in messages %}{% set c = message['content'] %}{% set parts = c %}"
    "{% for part in parts %}{{ part['text'] }}{% endfor %}{% endfor %}"
)
SLICED_MESSAGES = (
    "{% set loop_messages = messages[1:] %}{% for m in loop_messages %}"
    "{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}"
)
MACRO = (
    "{% macro show(items) %}{% for p in items %}{{ p.text }}{% endfor %}{% endmacro %}"
    "{% for m in messages %}{{ show(m['content']) }}{% endfor %}"
)
SPLITS_LINES = (
    "{% for message in messages %}{% for line in message['content'].split('\n') %}"
    "{{ line }};{% endfor %}{% endfor %}"
)
PRINTS = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"

CONVERSATION = [  # vLLM's multi-turn example, the image already parsed by frontend.media.parse
    {"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                 {"type": "image"}]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "What colour is it?"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder, chat_template=CHATML_TEMPLATE)
    return AutoTokenizer.from_pretrained(folder)


def renderer(tok, template, fmt="auto"):
    return ChatRenderer(tok, template, content_format=fmt,
                        media_placeholders={"image": IMAGE_TOKEN})


@pytest.mark.parametrize("template, expected", [
    (LLAVA, "openai"), (QWEN, "openai"), (CHATML_TEMPLATE, "openai"), (ASSIGNED, "openai"),
    (SLICED_MESSAGES, "openai"), (MACRO, "openai"),
    (LLAMA3, "string"), (CHATML_STRING, "string"), (SPLITS_LINES, "string"), (PRINTS, "string"),
    ("{% for m in messages %}{% for call in m['tool_calls'] %}{% endfor %}{% endfor %}", "string"),
    # Not parseable: the regex decides.
    ("{% for p in message['content'] %}{{ p.text }", "openai"),
    ("{% if %}{{ message['content'] }}", "string"),
])
def test_auto_detection(template, expected):
    assert detect_content_format(template) == expected


def test_openai_mode_keeps_every_string_turn(tok):
    expected = "USER: <image>\nWhat is in this image? ASSISTANT: A cat. USER: What colour is it? "
    expected += "ASSISTANT:"
    for fmt in ("auto", "openai"):
        assert renderer(tok, LLAVA, fmt).render(CONVERSATION).prompt == expected
    qwen = renderer(tok, QWEN).render(CONVERSATION).prompt
    assert "<|im_start|>assistant\nA cat.<|im_end|>" in qwen
    assert "<|im_start|>user\nWhat colour is it?<|im_end|>" in qwen
    assert qwen.count("<|image_pad|>") == 1


def test_string_mode_keeps_one_placeholder_per_image(tok):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                         {"type": "image"}, {"type": "text", "text": "them"}]}]
    r = renderer(tok, CHATML_STRING).render(msgs)
    assert r.prompt.startswith("<|im_start|>user\n<image>\n<image>\nCompare\nthem<|im_end|>")
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert r.prompt_token_ids.count(image_id) == 2
    # A placeholder the user already wrote stands for an item where it is, as in vLLM.
    msgs[0]["content"][1]["text"] = "Compare <image> with"
    r = renderer(tok, CHATML_STRING, "string").render(msgs)
    assert "user\n<image>\nCompare <image> with\nthem<|im_end|>" in r.prompt
    assert r.prompt_token_ids.count(image_id) == 2
    msgs[0]["content"][3]["text"] = "<image><image>"
    with pytest.raises(RequestError) as info:
        renderer(tok, CHATML_STRING).render(msgs)
    assert info.value.param == "messages[0].content"


def test_string_mode_without_a_placeholder_for_the_modality(tok):
    r = ChatRenderer(tok, CHATML_STRING, content_format="string")
    with pytest.raises(RequestError) as info:
        r.render([{"role": "user", "content": [{"type": "image"}]}])
    assert info.value.param == "messages[0].content[0].type"


def test_explicit_modes_override_auto(tok):
    msgs = [{"role": "user", "content": "Hello"}]
    assert renderer(tok, PRINTS).render(msgs).prompt == "Hello|"
    forced = renderer(tok, PRINTS, "openai").render(msgs).prompt
    assert forced == "[{'type': 'text', 'text': 'Hello'}]|"
    # llava's template iterates a string's characters, finds no typed part and drops the text.
    assert renderer(tok, LLAVA, "string").render(msgs).prompt == "USER: ASSISTANT:"
    with pytest.raises(ValueError):
        ChatRenderer(tok, PRINTS, content_format="jinja")


@pytest.mark.parametrize("fmt", ["auto", "string", "openai"])
def test_assistant_null_and_tool_messages(tok, fmt):
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
            {"role": "user", "content": [{"type": "text", "text": "Thanks"}]}]
    prompt = ChatRenderer(tok, content_format=fmt).render(msgs).prompt  # CHATML_TEMPLATE
    assert prompt == ("<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
                      "<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n"
                      "<|im_start|>assistant\n")


@pytest.mark.parametrize("template", [
    "{{ 1/0 }}",
    "{{ messages[0]['content'] + 1 }}",  # TypeError
    "{% for m in messages %}{{ m['content']['text'] | int(1/0) }}{% endfor %}",
    "{{ messages | map(attribute='content') | sum }}",  # TypeError inside a filter
])
def test_server_template_exceptions_are_400s_naming_messages(tok, template):
    with pytest.raises(RequestError) as info:
        ChatRenderer(tok, template).render([{"role": "user", "content": "x"}])
    e = info.value
    assert e.status == 400 and e.param == "messages"
    assert "unsupported operand" not in e.message and "division" not in e.message
