from __future__ import annotations

import json

import pytest

from frontend.errors import RequestError
from frontend.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    decode_body,
)
from frontend.sampling_params import SamplingParams

MSGS = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return decode_body(json.dumps({"messages": MSGS, **fields}).encode(), ChatCompletionRequest)


def completion(**fields):
    return decode_body(json.dumps({"prompt": "hi", **fields}).encode(), CompletionRequest)


def error_of(fn, *args, **kwargs) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("fields, param, words", [
    ({"max_tokens": "10"}, "max_tokens", "Expected `int | null`, got `str`"),
    ({"n": 1.5}, "n", "got `float`"),
    ({"temperature": "hot"}, "temperature", "got `str`"),
    ({"stop": 5}, "stop", "got `int`"),
    ({"stop": ["a", 3]}, "stop[1]", "got `int`"),
    ({"stream": "yes"}, "stream", "got `str`"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage", "got `int`"),
    ({"messages": "hi"}, "messages", "got `str`"),
    ({"logprobs": 3}, "logprobs", "got `int`"),
])
def test_type_errors_name_the_field(fields, param, words):
    e = error_of(chat, **fields)
    assert e.status == 400 and e.param == param and words in e.message


def test_malformed_json_and_non_object():
    assert "invalid JSON" in error_of(decode_body, b"{not json", ChatCompletionRequest).message
    assert "Expected `object`" in error_of(decode_body, b"[1]", ChatCompletionRequest).message
    assert "empty" in error_of(decode_body, b"", ChatCompletionRequest).message


def test_missing_and_unknown_fields():
    e = error_of(decode_body, b'{"model": "m"}', ChatCompletionRequest)
    assert e.param == "messages" and "missing required field" in e.message
    e = error_of(chat, frobnicate=1)
    assert e.param == "frobnicate" and "unknown field" in e.message
    e = error_of(chat, stream_options={"include_usage": True, "bogus": 1})
    assert e.param == "stream_options.bogus"


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "auto"),
    ("functions", [{"name": "f"}]),
    ("response_format", {"type": "json_object"}),
    ("logit_bias", {"42": 5}),
    ("audio", {"voice": "alloy"}),
    ("modalities", ["text", "audio"]),
    ("parallel_tool_calls", True),
    ("prediction", {"type": "content", "content": "x"}),
])
def test_unsupported_openai_fields_are_refused_by_name(field, value):
    e = error_of(chat(**{field: value}).to_sampling_params)
    assert e.param == field and e.message == f"`{field}` is not supported"


def test_harmless_fields_are_accepted():
    req = chat(user="u", metadata={"a": "b"}, store=False, service_tier="auto",
               response_format={"type": "text"}, tool_choice="none", tools=[],
               stream=True, stream_options={"include_usage": True})
    params = req.to_sampling_params()
    assert req.include_usage and params.n == 1


def test_stream_options_need_stream():
    assert error_of(chat(stream_options={"include_usage": True}).to_sampling_params).param == (
        "stream_options")


def test_max_completion_tokens_alias():
    assert chat(max_completion_tokens=7).to_sampling_params().max_tokens == 7
    assert chat(max_tokens=7).to_sampling_params().max_tokens == 7
    assert chat(max_tokens=7, max_completion_tokens=7).to_sampling_params().max_tokens == 7
    assert chat().to_sampling_params().max_tokens is None  # up to the context length
    e = error_of(chat(max_tokens=7, max_completion_tokens=8).to_sampling_params)
    assert e.param == "max_completion_tokens"
    assert error_of(chat(max_completion_tokens=0).to_sampling_params).param == (
        "max_completion_tokens")


def test_chat_logprobs_mapping():
    assert chat().to_sampling_params().logprobs is None
    assert chat(logprobs=True).to_sampling_params().logprobs == 0
    assert chat(logprobs=True, top_logprobs=5).to_sampling_params().logprobs == 5
    assert error_of(chat(top_logprobs=5).to_sampling_params).param == "top_logprobs"
    assert error_of(chat(logprobs=True, top_logprobs=-1).to_sampling_params).param == (
        "top_logprobs")


@pytest.mark.parametrize("fields, param", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_range_errors_name_the_field(fields, param):
    assert error_of(chat(**fields).to_sampling_params).param == param


def test_vllm_extras_reach_sampling_params():
    p = chat(top_k=5, min_p=0.1, repetition_penalty=1.2, ignore_eos=True, min_tokens=2,
             stop_token_ids=[3], include_stop_str_in_output=True, skip_special_tokens=False,
             seed=11, stop="x", n=3, temperature=0.5).to_sampling_params()
    assert (p.top_k, p.min_p, p.repetition_penalty, p.ignore_eos, p.min_tokens) == (
        5, 0.1, 1.2, True, 2)
    assert p.stop_token_ids == [3] and p.stop_strings == ["x"] and not p.skip_special_tokens
    wire = [p.to_wire(16, i) for i in range(3)]
    assert [w.seed for w in wire] == [11, 12, 13]  # choices differ
    assert wire[0].temperature == 0.5 and wire[0].top_k == 5


def test_server_limits():
    p = SamplingParams(n=17, logprobs=3)
    assert error_of(p.check_limits, 16, 20).param == "n"
    assert error_of(SamplingParams(logprobs=21).check_limits, 16, 20).param == "logprobs"
    e = error_of(chat(logprobs=True, top_logprobs=21).to_sampling_params, (16, 20))
    assert e.param == "top_logprobs" and "at most 20" in e.message
    assert error_of(completion(n=17).to_sampling_params, (16, 20)).param == "n"


def test_completion_prompt_forms():
    assert completion().prompts() == ["hi"]
    assert completion(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert completion(prompt=[1, 2, 3]).prompts() == [[1, 2, 3]]
    assert completion(prompt=[[1, 2], [3]]).prompts() == [[1, 2], [3]]
    for bad in ([], ["a", 1], [[1], []], [True], [{"a": 1}]):
        assert error_of(completion(prompt=bad).prompts).param == "prompt"
    assert error_of(completion, prompt=5).param == "prompt"


def test_completion_specific_fields():
    assert completion().to_sampling_params().max_tokens == 16  # OpenAI's default
    assert completion(logprobs=3).to_sampling_params().logprobs == 3
    assert completion(echo=True).echo
    assert error_of(completion(suffix="x").to_sampling_params).param == "suffix"
    assert error_of(completion(best_of=3).to_sampling_params).param == "best_of"
    completion(best_of=2, n=2).to_sampling_params()  # best_of == n is just n
    assert error_of(completion(echo=True, logprobs=1).to_sampling_params).param == "echo"
    assert error_of(completion, messages=MSGS).param == "messages"  # a chat field


def test_tokenize_and_detokenize_bodies():
    t = decode_body(b'{"prompt": "hi"}', TokenizeRequest)
    t.check()
    t = decode_body(json.dumps({"messages": MSGS}).encode(), TokenizeRequest)
    t.check()
    assert error_of(decode_body(b"{}", TokenizeRequest).check).param == "prompt"
    assert decode_body(b'{"tokens": [1, 2]}', DetokenizeRequest).tokens == [1, 2]
    assert error_of(decode_body, b'{"tokens": ["a"]}', DetokenizeRequest).param == "tokens[0]"


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 2**64}, "n"), ({"n": 5000}, "n"), ({"top_k": 2**40}, "top_k"),
    ({"max_tokens": 2**64}, "max_tokens"), ({"min_tokens": 2**40, "max_tokens": None},
                                            "min_tokens"),
    ({"logprobs": 2**64}, "logprobs"), ({"seed": 2**64}, "seed"),
    ({"stop_token_ids": [2**64]}, "stop_token_ids"), ({"stop_token_ids": [1] * 1025},
                                                      "stop_token_ids"),
    ({"stop": ["a"] * 65}, "stop"), ({"stop": "x" * 1025}, "stop"),
])
def test_offline_sampling_params_bound_the_same_values(kwargs, param):
    assert error_of(SamplingParams, **kwargs).param == param


def test_seed_plus_choice_index_stays_in_64_bits():
    p = SamplingParams(seed=2**63 - 1, n=3)
    assert [p.to_wire(16, i).seed for i in range(3)] == [2**63 - 1, -(2**63), -(2**63) + 1]


def test_decode_bounds_depth_and_integers_of_free_form_fields():
    deep = b"[" * 33 + b"]" * 33
    body = b'{"prompt": "a", "metadata": {"a": ' + deep + b"}}"
    assert error_of(decode_body, body, CompletionRequest).param == "metadata"
    very_deep = b"[" * 100_000 + b"]" * 100_000
    body = b'{"prompt": "a", "metadata": {"a": ' + very_deep + b"}}"
    assert "nested too deeply" in error_of(decode_body, body, CompletionRequest).message
    assert error_of(completion, metadata={"a": [2**64]}).param == "metadata"
    assert error_of(completion, top_k=2**64).param == "top_k"
    completion(metadata={"a": [[[1]]] * 3, "b": 2**63 - 1})  # shallow, in range: fine
    e = error_of(decode_body, b'{"' + b"x" * 100_000 + b'": 1}', CompletionRequest)
    assert len(e.message) < 400 and len(e.param) < 400  # a huge key is not echoed back
