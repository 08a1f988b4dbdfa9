"""The hostile request corpus (issue 7, point 4): concrete requests grouped by class, as data.

Every case must answer a 4xx with the JSON error shape and leave the server serving. Bodies are
raw bytes, so malformed JSON, invalid UTF-8 and odd content types are sent exactly as written.
``build_main`` targets the default server (request templates refused, no allowed media domains,
file:// under a folder); ``build_trusted`` the server started with --trust-request-chat-template
and --allowed-media-domains 127.0.0.1 (redirects, timeouts, bounded templates).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import msgspec
from hostile_cases import (
    CHAT,
    COMPLETIONS,
    DETOKENIZE,
    HUGE,
    MB,
    SCHEMAS,
    TOKENIZE,
    Bodies,
    Case,
    Context,
    dumps,
    image_part,
    user,
)
from hostile_chat import messages, request_templates, special_tokens
from hostile_media import (
    data_url,
    data_urls,
    file_urls,
    image_bombs,
    image_embeds,
    media_counts,
    other_modalities,
    png_bytes,
    ssrf,
    uuids,
)

# -- classes --------------------------------------------------------------------------------------

def malformed_bodies(b: Bodies) -> list[Case]:
    c = "malformed"
    m = b.ctx.model
    ok_chat = dumps(b.chat())
    deep = 100_000
    raw: dict[str, tuple[str, bytes]] = {
        "empty": (CHAT, b""),
        "whitespace": (CHAT, b"   \n\t "),
        "truncated object": (CHAT, ok_chat[: len(ok_chat) // 2]),
        "lone brace": (COMPLETIONS, b"{"),
        "truncated string": (COMPLETIONS, b'{"prompt": "hi'),
        "json string not object": (CHAT, b'"hello"'),
        "json array not object": (CHAT, b"[]"),
        "json null": (COMPLETIONS, b"null"),
        "json number": (TOKENIZE, b"123"),
        "trailing garbage": (CHAT, ok_chat + b" xyz"),
        "two objects": (CHAT, ok_chat + ok_chat),
        "single quotes": (COMPLETIONS, b"{'prompt': 'hi'}"),
        "js comment": (COMPLETIONS, b'{"prompt": "hi" /* x */}'),
        "invalid utf-8 in model": (CHAT, b'{"model": "\xff\xfe", "messages": [{"role": "user",'
                                         b' "content": "hi"}]}'),
        "invalid utf-8 in content": (
            CHAT, b'{"messages": [{"role": "user", "content": "caf\xc3\x28"}], "max_tokens": 2}'),
        "invalid utf-8 in prompt": (COMPLETIONS, b'{"prompt": "\xc0\xaf\xed\xa0\x80"}'),
        "invalid utf-8 in tokenize": (TOKENIZE, b'{"prompt": "\xf8\x88\x80\x80\x80"}'),
        "invalid utf-8 latin-1 body": (DETOKENIZE, '{"tokens": [1], "model": "é"}'.encode(
            "latin-1")),
        "lone surrogate escape in content": (
            CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'),
        "lone surrogate escape in prompt": (COMPLETIONS, b'{"prompt": "a\\udfffb",'
                                                         b' "max_tokens": 2}'),
        "lone surrogate escape in tokenize": (TOKENIZE, b'{"prompt": "\\udc00"}'),
        "lone surrogate in stop": (COMPLETIONS, b'{"prompt": "hi", "stop": ["\\ud800"],'
                                                b' "max_tokens": 2}'),
        "deep arrays top level": (CHAT, b"[" * deep + b"]" * deep),
        "deep objects top level": (COMPLETIONS, b'{"a":' * deep + b"1" + b"}" * deep),
        "deep arrays in metadata": (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], '
                                    b'"metadata": {"x": '
                                    + b"[" * deep + b"]" * deep + b"}}"),
        "deep objects in chat_template_kwargs": (
            CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": '
            + b'{"a":' * deep + b"1" + b"}" * deep + b"}"),
        "deep arrays in content": (
            CHAT, b'{"messages": [{"role": "user", "content": ' + b"[" * deep + b"]" * deep
            + b"}]}"),
        "deep arrays in prompt": (COMPLETIONS, b'{"prompt": ' + b"[" * deep + b"]" * deep + b"}"),
        "deep arrays in tokenize messages": (
            TOKENIZE, b'{"messages": ' + b"[" * deep + b"]" * deep + b"}"),
        "deep arrays in detokenize": (DETOKENIZE, b'{"tokens": ' + b"[" * deep + b"]" * deep
                                      + b"}"),
        "NaN temperature": (CHAT, ok_chat[:-1] + b', "temperature": NaN}'),
        "Infinity top_p": (CHAT, ok_chat[:-1] + b', "top_p": Infinity}'),
        "-Infinity presence_penalty": (COMPLETIONS, b'{"prompt": "hi", "presence_penalty":'
                                                    b' -Infinity}'),
        "1e999 temperature": (COMPLETIONS, b'{"prompt": "hi", "temperature": 1e999}'),
        "-1e999 repetition_penalty": (CHAT, ok_chat[:-1] + b', "repetition_penalty": -1e999}'),
        "1e400 max_tokens": (COMPLETIONS, b'{"prompt": "hi", "max_tokens": 1e400}'),
        "duplicate max_tokens, last invalid": (
            COMPLETIONS, f'{{"model": "{m}", "prompt": "hi", "max_tokens": 2, '
                         '"max_tokens": -5}'.encode()),
        "duplicate model, last unknown": (
            COMPLETIONS, b'{"model": "' + m.encode() + b'", "prompt": "hi", "max_tokens": 2, '
                         b'"model": "no-such-model"}'),
        # The last of duplicate keys wins (as in Python's json and vLLM), and it is what is
        # validated: the cases above prove it; a valid last value is served, not refused.
        "unknown top-level field": (CHAT, dumps(b.chat(definitely_not_a_field=1))),
        "unknown field in stream_options": (CHAT, dumps(b.chat(
            stream=True, stream_options={"include_usage": True, "bogus": 1}))),
        "unknown field in completions": (COMPLETIONS, dumps(b.completion(prompt_logprobs=1,
                                                                         foo="bar"))),
        "unknown field in tokenize": (TOKENIZE, dumps(b.tokenize(tokens=[1]))),
        "unknown field in detokenize": (DETOKENIZE, dumps(b.detokenize(prompt="x"))),
        "unknown message key": (CHAT, dumps(b.chat(messages=[{"role": "user", "content": "hi",
                                                              "extra": 1}]))),
        "missing messages": (CHAT, dumps({"model": m})),
        "missing prompt": (COMPLETIONS, dumps({"model": m})),
        "missing tokens": (DETOKENIZE, dumps({"model": m})),
        "empty object tokenize": (TOKENIZE, b"{}"),
    }
    return [Case(c, name, path, body) for name, (path, body) in raw.items()]


_WRONG = ({"nested": [[1]]}, "a string", 12345, True, [1, "x"], 0.5)


def _wrong_value(tp: Any, start: int) -> Any | None:
    """A JSON value msgspec refuses for type ``tp`` (trying candidates from ``start`` on, so
    fields get different wrong types); None when every candidate is accepted."""
    for k in range(len(_WRONG)):
        candidate = _WRONG[(start + k) % len(_WRONG)]
        try:
            msgspec.convert(candidate, type=tp, strict=True)
        except msgspec.ValidationError:
            return candidate
    return None


def wrong_types(b: Bodies) -> list[Case]:
    """Every declared field of every request schema with a value of the wrong type."""
    cases = []
    for path, schema in SCHEMAS.items():
        for i, f in enumerate(msgspec.structs.fields(schema)):
            value = _wrong_value(f.type, i)
            if value is None:  # `Any` fields (declared to refuse them by name: see below)
                continue
            body = b.base(path)
            body[f.name] = value
            cases.append(Case("wrong_type", f"{path} {f.name}={json.dumps(value)}", path,
                              dumps(body), param=f.name))
    # Any-typed OpenAI fields we do not implement: refused by name, not silently ignored.
    for name, value in (("tools", [{"type": "function", "function": {"name": "f"}}]),
                        ("tool_choice", "required"), ("response_format", {"type": "json_schema"}),
                        ("audio", {"voice": "x"}), ("prediction", {"type": "content"}),
                        ("function_call", "auto")):
        cases.append(Case("wrong_type", f"unsupported {name}", CHAT,
                          dumps(b.chat(**{name: value})), param=name))
    return cases


def huge_ints(b: Bodies) -> list[Case]:
    """2^64+1 (past uint64), 2^63 (past int64) and -2^64-1 in every integer field."""
    cases = []
    chat = {"n": {}, "seed": {}, "top_k": {}, "min_tokens": {"max_tokens": None},
            "max_tokens": {}, "max_completion_tokens": {"max_tokens": None},
            "top_logprobs": {"logprobs": True}}
    completion = {"n": {}, "seed": {}, "top_k": {}, "min_tokens": {"max_tokens": None},
                  "max_tokens": {}, "logprobs": {}, "best_of": {}}
    for path, fields, make in ((CHAT, chat, b.chat), (COMPLETIONS, completion, b.completion)):
        for name, extra in fields.items():
            for value in (HUGE, 2**63, -HUGE):
                body = make(**extra)
                body[name] = value
                body = {k: v for k, v in body.items() if v is not None}
                cases.append(Case("huge_int", f"{path} {name}={value}", path, dumps(body),
                                  param=name))
    lists = [
        (CHAT, "stop_token_ids", b.chat(stop_token_ids=[HUGE])),
        (COMPLETIONS, "stop_token_ids", b.completion(stop_token_ids=[2**63])),
        (COMPLETIONS, "prompt", b.completion(prompt=[HUGE])),
        (COMPLETIONS, "prompt", b.completion(prompt=[[1, 2], [2**63]])),
        (DETOKENIZE, "tokens", b.detokenize(tokens=[HUGE])),
        (DETOKENIZE, "tokens", b.detokenize(tokens=[-HUGE])),
        (DETOKENIZE, "tokens", b.detokenize(tokens=[2**63])),
    ]
    for path, name, body in lists:
        cases.append(Case("huge_int", f"{path} {name} {json.dumps(body[name])}", path,
                          dumps(body), param=name))
    return cases


def content_types(b: Bodies) -> list[Case]:
    cases = []
    for path in SCHEMAS:
        body = dumps(b.base(path))
        for label, ctype in (("missing", None), ("text/plain", "text/plain"),
                             ("form-urlencoded", "application/x-www-form-urlencoded"),
                             ("multipart", "multipart/form-data; boundary=x")):
            headers = {} if ctype is None else {"Content-Type": ctype}
            cases.append(Case("content_type", f"{path} {label}", path, body, headers,
                              statuses=(415,)))
    return cases


def sampling_ranges(b: Bodies) -> list[Case]:
    v = b.ctx.vocab_size
    chat = {
        "temperature -1": ({"temperature": -1}, "temperature"),
        "top_p 0": ({"top_p": 0}, "top_p"),
        "top_p 1.5": ({"top_p": 1.5}, "top_p"),
        "top_p -0.0": ({"top_p": -0.0}, "top_p"),
        "top_k -2": ({"top_k": -2}, "top_k"),
        "min_p -0.1": ({"min_p": -0.1}, "min_p"),
        "min_p 1.5": ({"min_p": 1.5}, "min_p"),
        "presence_penalty 2.5": ({"presence_penalty": 2.5}, "presence_penalty"),
        "presence_penalty -3": ({"presence_penalty": -3}, "presence_penalty"),
        "frequency_penalty 2.01": ({"frequency_penalty": 2.01}, "frequency_penalty"),
        "frequency_penalty -2.5": ({"frequency_penalty": -2.5}, "frequency_penalty"),
        "repetition_penalty 0": ({"repetition_penalty": 0}, "repetition_penalty"),
        "repetition_penalty -1": ({"repetition_penalty": -1}, "repetition_penalty"),
        "n 0": ({"n": 0}, "n"),
        "n -1": ({"n": -1}, "n"),
        "n over max_n": ({"n": 17}, "n"),
        "max_tokens 0": ({"max_tokens": 0}, "max_tokens"),
        "max_tokens -1": ({"max_tokens": -1}, "max_tokens"),
        "max_tokens past context": ({"max_tokens": 100_000}, "max_tokens"),
        "max_completion_tokens 0": ({"max_tokens": None, "max_completion_tokens": 0},
                                    "max_completion_tokens"),
        "max_tokens and max_completion_tokens disagree": (
            {"max_tokens": 2, "max_completion_tokens": 3}, "max_completion_tokens"),
        "min_tokens -1": ({"min_tokens": -1}, "min_tokens"),
        "min_tokens above max_tokens": ({"min_tokens": 5}, "min_tokens"),
        "top_logprobs 21": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        "top_logprobs -1": ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        "top_logprobs without logprobs": ({"top_logprobs": 2}, "top_logprobs"),
        "stop empty string": ({"stop": ""}, "stop"),
        "stop list with empty string": ({"stop": ["a", ""]}, "stop"),
        "stop_token_ids negative": ({"stop_token_ids": [-1]}, "stop_token_ids"),
        "stop_token_ids out of vocab": ({"stop_token_ids": [v + 10]}, "stop_token_ids"),
        "seed 2^63": ({"seed": 2**63}, "seed"),
        "stream_options without stream": ({"stream_options": {"include_usage": True}},
                                          "stream_options"),
        "stream with temperature -1": ({"stream": True, "temperature": -1}, "temperature"),
        "logit_bias": ({"logit_bias": {"1": 100}}, "logit_bias"),
    }
    completion = {
        "logprobs 21": ({"logprobs": 21}, "logprobs"),
        "logprobs -1": ({"logprobs": -1}, "logprobs"),
        "best_of 3 with n 1": ({"best_of": 3}, "best_of"),
        "echo with logprobs": ({"echo": True, "logprobs": 1}, "echo"),
        "suffix": ({"suffix": "tail"}, "suffix"),
        "max_tokens 0": ({"max_tokens": 0}, "max_tokens"),
        "n over max_n": ({"n": 1000}, "n"),
        "top_p 2": ({"top_p": 2}, "top_p"),
        "stream with n 0": ({"stream": True, "n": 0}, "n"),
    }
    cases = []
    for path, table, make in ((CHAT, chat, b.chat), (COMPLETIONS, completion, b.completion)):
        for name, (extra, param) in table.items():
            body = {k: val for k, val in make(**extra).items() if val is not None}
            cases.append(Case("sampling", f"{path} {name}", path, dumps(body), param=param))
    return cases


def token_prompts(b: Bodies) -> list[Case]:
    v = b.ctx.vocab_size
    table = {
        "negative id": [-1],
        "id == vocab": [v],
        "id 10^9": [10**9],
        "id 2^31": [2**31],
        "empty list": [],
        "empty inner list": [[]],
        "second prompt bad": [[1, 2], [-5]],
        "mixed ids and strings": [1, "x"],
        "mixed lists and ids": [[1], 2],
        "bools": [True, False],
        "floats": [1.5, 2.0],
        "nested three deep": [[[1]]],
        "null inside": [1, None],
        "ids past the context": [5] * 2100,
    }
    cases = [Case("token_prompt", name, COMPLETIONS, dumps(b.completion(prompt=p)),
                  param="prompt" if name != "ids past the context" else None)
             for name, p in table.items()]
    cases.append(Case("token_prompt", "empty string", COMPLETIONS, dumps(b.completion(prompt="")),
                      param="prompt"))
    cases.append(Case("token_prompt", "list with an empty string", COMPLETIONS,
                      dumps(b.completion(prompt=["hi", ""])), param="prompt"))
    return cases


def long_prompts(b: Bodies) -> list[Case]:
    """Over the character cap (a few MB, under the 32 MB body cap) and over the context."""
    big = "hello world " * (4 * MB // 12)  # 4 MB
    over_context = "Hello world " * 3000  # ~6000 tokens, 36 kB: under the char cap
    return [
        Case("long_prompt", "4 MB completion prompt", COMPLETIONS, dumps(b.completion(prompt=big)),
             param="prompt", max_seconds=10),
        Case("long_prompt", "4 MB prompt list", COMPLETIONS,
             dumps(b.completion(prompt=["hi", big])), param="prompt", max_seconds=10),
        Case("long_prompt", "4 MB chat message", CHAT, dumps(b.chat(messages=user(big))),
             param="messages", max_seconds=10),
        Case("long_prompt", "4 MB over many chat messages", CHAT,
             dumps(b.chat(messages=user(big[: MB]) * 4)), param="messages", max_seconds=10),
        Case("long_prompt", "4 MB text part", CHAT,
             dumps(b.chat(messages=user([{"type": "text", "text": big}]))), param="messages",
             max_seconds=10),
        Case("long_prompt", "4 MB tokenize prompt", TOKENIZE, dumps(b.tokenize(prompt=big)),
             param="prompt", max_seconds=10),
        Case("long_prompt", "4 MB tokenize messages", TOKENIZE,
             dumps({"model": b.ctx.model, "messages": user(big)}), param="messages",
             max_seconds=10),
        Case("long_prompt", "over context completion", COMPLETIONS,
             dumps(b.completion(prompt=over_context))),
        Case("long_prompt", "over context chat", CHAT, dumps(b.chat(messages=user(over_context)))),
        Case("long_prompt", "body over the 32 MB cap", CHAT, b"{" + b" " * (33 * MB) + b"}",
             statuses=(413,)),
    ]


def tokenize_detokenize(b: Bodies) -> list[Case]:
    v = b.ctx.vocab_size
    m = b.ctx.model
    tok = {
        "both prompt and messages": {"model": m, "prompt": "hi", "messages": user("hi")},
        "neither": {"model": m},
        "prompt a number": {"model": m, "prompt": 5},
        "prompt a list": {"model": m, "prompt": ["a"]},
        "messages a string": {"model": m, "messages": "hi"},
        "messages bad role": {"model": m, "messages": [{"role": "x", "content": "hi"}]},
        "messages empty": {"model": m, "messages": []},
        "return_token_strs a string": {"model": m, "prompt": "hi", "return_token_strs": "yes"},
        "add_special_tokens a string": {"model": m, "prompt": "hi", "add_special_tokens": "no"},
        "chat_template_kwargs reserved": {"model": m, "messages": user("hi"),
                                          "chat_template_kwargs": {"tokenize": True}},
    }
    detok = {
        "negative id": [-1],
        "id == vocab": [v],
        "id 10^12": [10**12],
        "string ids": ["a"],
        "float ids": [1.5],
        "bool ids": [True],
        "object": {"a": 1},
        "nested lists": [[1, 2]],
        "null": None,
    }
    cases = [Case("tokenize", name, TOKENIZE, dumps(body)) for name, body in tok.items()]
    cases += [Case("detokenize", name, DETOKENIZE, dumps({"model": m, "tokens": t}),
                   param="tokens") for name, t in detok.items()]
    return cases


def routes(b: Bodies) -> list[Case]:
    cases = [Case("wrong_model", f"{path}", path,
                  dumps({**b.base(path), "model": "no-such-model"}), statuses=(404,),
                  param="model") for path in SCHEMAS]
    cases.append(Case("wrong_model", "model an empty string", CHAT, dumps(b.chat(model="")),
                      statuses=(404,), param="model"))
    cases.append(Case("wrong_model", "model with a traceback-looking name", COMPLETIONS,
                      dumps(b.completion(model="../../etc/passwd")), statuses=(404,),
                      param="model"))
    cases += [
        Case("route", "GET chat", CHAT, b"", {}, method="GET", statuses=(405,)),
        Case("route", "PUT completions", COMPLETIONS, dumps(b.completion()), method="PUT",
             statuses=(405,)),
        Case("route", "unknown path", "/v1/embeddings", dumps({"input": "x"}), statuses=(404,)),
        Case("route", "path traversal", "/v1/../../etc/passwd", b"", {}, method="GET",
             statuses=(404,)),
    ]
    return cases


def build_main(ctx: Context) -> list[Case]:
    b = Bodies(ctx)
    cases = [*malformed_bodies(b), *wrong_types(b), *huge_ints(b), *content_types(b),
             *sampling_ranges(b), *token_prompts(b), *long_prompts(b), *messages(b),
             *request_templates(b, trusted=False), *special_tokens(b), *ssrf(b), *file_urls(b),
             *data_urls(b), *image_bombs(b), *image_embeds(b), *uuids(b), *media_counts(b),
             *other_modalities(b), *tokenize_detokenize(b), *routes(b)]
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "case names must be unique"
    return cases


def build_trusted(ctx: Context, host_base: str) -> list[Case]:
    """Cases for the server with --trust-request-chat-template and --allowed-media-domains
    127.0.0.1 (``host_base`` is the allowed host; every other host must be refused)."""
    b = Bodies(ctx)
    port = host_base.rsplit(":", 1)[1]
    ok = f"{host_base}/img/a.png"

    def redirect(to: str) -> str:
        return f"{host_base}/redirect?to={quote(to, safe='')}"

    chain = ok
    for _ in range(8):  # more hops than the fetcher follows
        chain = redirect(chain)
    urls = {
        "not in the allowed domains": "http://example.com/a.png",
        "localhost not listed": f"http://localhost:{port}/img/a.png",
        "[::1] not listed": f"http://[::1]:{port}/img/a.png",
        "decimal form of the listed host": f"http://2130706433:{port}/img/a.png",
        "redirect to localhost": redirect(f"http://localhost:{port}/img/a.png"),
        "redirect to metadata": redirect("http://169.254.169.254/latest/meta-data/"),
        "redirect to 10.0.0.1": redirect("http://10.0.0.1/a.png"),
        "redirect to file://": redirect("file:///etc/passwd"),
        "redirect to data:": redirect(data_url(png_bytes())),
        "redirect chain too long": chain,
        "slow host times out": f"{host_base}/slow",
        "404": f"{host_base}/img/missing.png",
        "endless body over the byte cap": f"{host_base}/endless",
        "html page": f"{host_base}/page.html",
    }
    cases = [Case("media_fetch", name, CHAT, b.media(image_part(url)), max_seconds=8)
             for name, url in urls.items()]
    return cases + request_templates(b, trusted=True)
