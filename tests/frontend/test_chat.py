from __future__ import annotations

import pytest

from frontend.chat import (
    PART_HANDLERS,
    ChatRenderer,
    load_chat_template,
    to_content_format,
    validate_messages,
)
from frontend.config import FrontendConfig
from frontend.errors import RequestError
from frontend.processor import InputProcessor, load_eos_token_ids
from frontend.random_model import build_random_checkpoint
from frontend.sampling_params import SamplingParams

USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_random_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def tok(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def error_of(fn, *args, **kwargs) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args, **kwargs)
    return info.value


def test_template_from_tokenizer(tok):
    r = ChatRenderer(tok).render(USER)
    assert r.prompt == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    # The template wrote the special tokens: tokenizing adds none, and they stay single ids.
    assert r.prompt_token_ids == tok(r.prompt, add_special_tokens=False)["input_ids"]
    assert r.prompt_token_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_no_generation_prompt(tok):
    r = ChatRenderer(tok).render(USER, add_generation_prompt=False)
    assert r.prompt.endswith("Hello<|im_end|>\n")


def test_text_parts_and_multiple_messages(tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                         {"type": "text", "text": "there"}]}]
    r = ChatRenderer(tok).render(msgs)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in r.prompt
    assert "user\nHi there<|im_end|>" in r.prompt  # this template iterates the parts


def test_parts_joined_for_string_templates(tok):
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "text", "text": "b"}]}]
    assert ChatRenderer(tok, template).render(msgs).prompt == "[user]a\nb"


def test_template_from_file(tok, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                    "{% if add_generation_prompt %}<assistant>{% endif %}")
    r = ChatRenderer(tok, load_chat_template(str(path))).render(USER)
    assert r.prompt == "<user>Hello<assistant>"


def test_chat_template_kwargs(tok):
    template = ("{% if shout %}LOUD {% endif %}{% for m in messages %}{{ m['content'] }}"
                "{% endfor %}")
    renderer = ChatRenderer(tok, template)
    assert renderer.render(USER, chat_template_kwargs={"shout": True}).prompt == "LOUD Hello"
    assert renderer.render(USER).prompt == "Hello"
    e = error_of(renderer.render, USER, chat_template_kwargs={"messages": []})
    assert e.param == "chat_template_kwargs"


def test_continue_final_message(tok):
    msgs = USER + [{"role": "assistant", "content": "Sure, here"}]
    r = ChatRenderer(tok).render(msgs, continue_final_message=True)
    assert r.prompt.endswith("<|im_start|>assistant\nSure, here")
    e = error_of(ChatRenderer(tok).render, msgs, continue_final_message=True,
                 add_generation_prompt=True)
    assert e.param == "continue_final_message"
    e = error_of(ChatRenderer(tok).render, USER, continue_final_message=True)
    assert e.param == "continue_final_message" and "assistant" in e.message


def test_missing_template_is_a_clear_400(tok):
    class NoTemplate:
        chat_template = None

    e = error_of(ChatRenderer(NoTemplate()).render, USER)
    assert e.status == 400 and "no chat template" in e.message and "--chat-template" in e.message


def test_template_error_is_a_400(tok):
    template = "{{ raise_exception('roles must alternate') }}"
    e = error_of(ChatRenderer(tok, template).render, USER)
    assert e.status == 400 and "roles must alternate" in e.message


@pytest.mark.parametrize("part, modality", [
    ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, "image"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio"),
    ({"type": "video_url", "video_url": {"url": "http://x/y.mp4"}}, "video"),
])
def test_media_parts_are_refused_for_now(tok, part, modality):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]
    e = error_of(ChatRenderer(tok).render, msgs)
    assert e.status == 400 and e.param == "messages[0].content[1].type"
    assert f"{modality} input is not supported" in e.message


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    (["hi"], "messages[0]"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "hologram"}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"text": "x"}]}], "messages[0].content[0].type"),
    ([{"role": "assistant", "content": None, "tool_calls": []}], "messages[0].tool_calls"),
    ([{"role": "user", "content": "x", "colour": "red"}], "messages[0].colour"),
])
def test_message_validation_names_the_field(messages, param):
    assert error_of(validate_messages, messages).param == param


def test_part_handlers_can_grow():
    assert {"text", "image_url", "input_audio", "video_url"} <= set(PART_HANDLERS)
    msgs = validate_messages([{"role": "assistant", "content": None}])
    assert to_content_format(msgs, "string", {})[0]["content"] == ""
    assert to_content_format(msgs, "openai", {})[0]["content"] == []


# -- the processor on the same checkpoint --------------------------------------------------------

def test_processor_requests_and_limits(model, tok):
    proc = InputProcessor(tok, max_model_len=32, vocab_size=len(tok), model_path=model)
    assert proc.eos_token_ids == load_eos_token_ids(model, tok) == [tok.eos_token_id]
    reqs = proc.process("cmpl-1", "Hello world", SamplingParams(n=2, seed=5, max_tokens=4))
    assert [r.request_id for r in reqs] == ["cmpl-1-0", "cmpl-1-1"]
    assert [r.sampling.seed for r in reqs] == [5, 6]
    assert reqs[0].prompt_token_ids == tok("Hello world")["input_ids"]
    n_prompt = len(reqs[0].prompt_token_ids)
    unbounded = proc.process("c", "Hello world", SamplingParams(max_tokens=None))
    assert unbounded[0].sampling.max_tokens == 32 - n_prompt
    e = error_of(proc.process, "c", "Hello world", SamplingParams(max_tokens=32))
    assert e.param == "max_tokens" and "maximum context length is 32 tokens" in e.message
    e = error_of(proc.process, "c", list(range(32)), SamplingParams(), param="messages")
    assert e.param == "messages" and "your prompt has 32 tokens" in e.message
    assert error_of(proc.process, "c", "", SamplingParams()).param == "prompt"
    assert error_of(proc.process, "c", [1, len(tok)], SamplingParams()).param == "prompt"


def test_generation_config_eos_list(model, tok, tmp_path):
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [7, 2]}')
    assert load_eos_token_ids(tmp_path, tok) == [7, 2]


def test_frontend_config(model):
    c = FrontendConfig(model=str(model))
    assert c.served_model_name == (str(model),) and c.model_name == str(model)
    assert FrontendConfig(model=str(model), served_model_name=["a", "b"]).model_name == "a"
    with pytest.raises(ValueError):
        FrontendConfig(model=str(model), max_n=0)
    with pytest.raises(ValueError):
        FrontendConfig(model=str(model), chat_template="/no/such/file")
    with pytest.raises(ValueError):
        FrontendConfig(model="/no/such/model")
