"""Hostile HTTP input against the real app and a real engine core (tiny random model, CPU): bodies
that don't decode, unbounded integers and lists, wrong content types, slow clients, huge prompts.
Every refusal is a 4xx with the JSON error shape, and the server keeps serving."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time

import aiohttp
import pytest
from app_utils import AppServer, running_engine

from frontend.config import FrontendConfig
from frontend.openai.serving import TokenizerThreads
from frontend.random_model import build_random_checkpoint
from frontend.tokenizer import load_tokenizer
from protocol.addresses import LOOPBACK, free_port

pytestmark = pytest.mark.slow

MAX_LEN = 256
MAX_CHARS = 2000
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
CHAT = [{"role": "user", "content": "Hello!"}]
JSON_PATHS = ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize")
GOOD = {"/v1/chat/completions": {"messages": CHAT, "max_tokens": 2},
        "/v1/completions": {"prompt": "Hello", "max_tokens": 2},
        "/tokenize": {"prompt": "Hello"},
        "/detokenize": {"tokens": [1, 2]}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(build_random_checkpoint(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def server(model):
    with running_engine(model, max_model_len=MAX_LEN, num_kv_blocks=64,
                        max_num_seqs=8) as (addr, engine):
        config = FrontendConfig(model=model, engine_addr=addr, host=LOOPBACK, port=free_port(),
                                max_n=4, max_logprobs=5, max_body_bytes=1 << 20,
                                max_prompt_chars=MAX_CHARS, http_header_timeout_s=HEADER_TIMEOUT,
                                http_body_timeout_s=BODY_TIMEOUT)
        srv = AppServer(config)
        try:
            srv.wait_healthy(engine)
            yield srv.url
        finally:
            srv.stop()


def request(method, url, body=None, raw=None, content_type="application/json", headers=None):
    async def go():
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        hdrs = {} if content_type is None else {"Content-Type": content_type}
        hdrs.update(headers or {})
        async with aiohttp.ClientSession(skip_auto_headers=("Content-Type",)) as s:
            async with s.request(method, url, data=data, headers=hdrs) as r:
                return r.status, await r.text()

    try:
        return asyncio.run(go())
    except aiohttp.ClientError:
        return -1, ""


def error_of(url, path, body=None, raw=None, expect=400, content_type="application/json"):
    code, text = request("POST", url + path, body, raw, content_type)
    assert code == expect, text
    err = json.loads(text)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == expect
    assert "Traceback" not in err["message"] and len(err["message"]) < 1000
    return err


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# -- 1. body decode -----------------------------------------------------------------------------

@pytest.mark.parametrize("path, raw, param", [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', None),
    ("/v1/completions", b'{"prompt": "\xed\xa0\x80"}', None),  # a UTF-8-encoded surrogate
    ("/v1/completions", b'{"prompt": "\\udc00"}', None),  # a lone surrogate escape
    ("/v1/completions", b'\xef\xbb\xbf{"prompt": "hi"}', None),  # a BOM
    ("/v1/chat/completions", b'{"messages": ' + nested(100_000) + b"}", None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ' + nested(100_000)
     + b"}]}", None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ' + nested(40)
     + b"}]}", "messages"),
    ("/v1/completions", b'{"prompt": "a", "metadata": {"a": ' + nested(100_000) + b"}}", None),
    ("/v1/completions", b'{"prompt": "a", "metadata": {"a": ' + nested(40) + b"}}", "metadata"),
    ("/v1/chat/completions", json.dumps({"messages": CHAT}).encode()[:-1]
     + b', "chat_template_kwargs": {"x": ' + nested(33) + b"}}", "chat_template_kwargs"),
    ("/v1/completions", b'{"prompt": ' + nested(50) + b"}", "prompt"),
    ("/tokenize", b'{"messages": [{"role": "user", "content": ' + nested(100_000) + b"}]}", None),
    ("/detokenize", b'{"tokens": ' + nested(100_000) + b"}", "tokens[0]"),
    ("/v1/completions", b'{"prompt": "a", ' + b'"x": {' * 5000 + b"}" * 5000 + b"}", None),
])
def test_every_decode_failure_is_a_400(server, path, raw, param):
    err = error_of(server, path, raw=raw)
    if param is not None:
        assert err["param"] == param
    assert request("GET", server + "/health")[0] == 200


# -- 2. integers, lists and strings bounded -----------------------------------------------------

HUGE = (2**64, 10**30, -(2**64))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, field, value, param", [
    *[("/v1/chat/completions", f, v, f) for f in ("n", "seed", "top_k", "min_tokens",
                                                   "max_tokens", "max_completion_tokens")
      for v in HUGE],
    ("/v1/chat/completions", "top_logprobs", 2**64, "top_logprobs"),
    ("/v1/chat/completions", "stop_token_ids", [2**64], "stop_token_ids[0]"),
    *[("/v1/completions", f, v, f) for f in ("logprobs", "best_of", "n", "max_tokens")
      for v in HUGE],
    ("/v1/completions", "prompt", [1, 2**64], "prompt"),
    ("/v1/completions", "prompt", [[1], [2**70]], "prompt"),
    ("/v1/completions", "metadata", {"a": [2**64]}, "metadata"),
    # in 64 bits but beyond what any request needs
    ("/v1/completions", "top_k", 2**40, "top_k"),
    ("/v1/completions", "min_tokens", 2**40, "min_tokens"),
    ("/v1/completions", "n", 2**40, "n"),
    ("/v1/completions", "stop_token_ids", [2**40], "stop_token_ids"),
    ("/v1/completions", "stop_token_ids", list(range(2000)), "stop_token_ids"),
    ("/v1/completions", "stop", ["ab"] * 100, "stop"),
    ("/v1/completions", "stop", "x" * 2000, "stop"),
    ("/v1/completions", "model", "m" * 5000, "model"),
    ("/v1/completions", "user", "u" * 5000, "user"),
])
def test_integers_and_lengths_are_bounded(server, stream, path, field, value, param):
    body = {**GOOD[path], field: value, "stream": stream}
    if field == "top_logprobs":
        body["logprobs"] = True
    err = error_of(server, path, body)
    assert err["param"] == param, err


def test_token_ids_bounded_on_tokenize_endpoints(server):
    assert error_of(server, "/detokenize", {"tokens": [1, 2**64]})["param"] == "tokens[1]"
    assert error_of(server, "/detokenize", {"tokens": [-(2**63) - 1]})["param"] == "tokens[0]"
    assert error_of(server, "/detokenize", {"tokens": [2**40]})["param"] == "tokens"


def test_extreme_but_valid_values_still_work(server):
    body = {"prompt": "Hello", "max_tokens": 2, "seed": 2**63 - 1, "n": 2, "top_k": 2**31 - 1,
            "stop_token_ids": [1] * 1024, "stop": ["zz"] * 64, "ignore_eos": True}
    code, text = request("POST", server + "/v1/completions", body)
    assert code == 200, text
    assert len(json.loads(text)["choices"]) == 2


# -- 3. content type ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", JSON_PATHS)
@pytest.mark.parametrize("content_type", [
    None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/json; charset=latin-1", "application/jsonx", "text/json"])
def test_json_endpoints_refuse_other_content_types(server, path, content_type):
    err = error_of(server, path, GOOD[path], expect=415, content_type=content_type)
    assert "application/json" in err["message"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bodies_are_refused(server, encoding):
    # A compressed body would be inflated before the size cap counts it (a zip bomb).
    raw = gzip.compress(json.dumps(GOOD["/v1/completions"]).encode() + b" " * 10**6)
    code, text = request("POST", server + "/v1/completions", raw=raw,
                         headers={"Content-Encoding": encoding})
    assert code == 415 and "Content-Encoding" in json.loads(text)["error"]["message"]


@pytest.mark.parametrize("path", JSON_PATHS)
def test_json_with_charset_is_accepted(server, path):
    code, text = request("POST", server + path, GOOD[path],
                         content_type="Application/JSON; charset=UTF-8")
    assert code == 200, text


# -- 4. slow clients --------------------------------------------------------------------------------

def _host_port(url):
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def _closed_after(reader: asyncio.StreamReader, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closes the connection (and what it sent before that)."""
    start = time.monotonic()
    data = await asyncio.wait_for(reader.read(), limit)
    return time.monotonic() - start, data


def test_slowloris_connections_are_dropped_while_others_are_served(server):
    host, port = _host_port(server)

    async def half_headers():
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: applic")
        await writer.drain()
        return await _closed_after(reader, HEADER_TIMEOUT + 5)

    async def trickled_headers():
        # Bytes keep coming, but the headers never end: data must not re-arm the timer.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        while time.monotonic() - start < HEADER_TIMEOUT + 5:
            try:
                writer.write(b"X-a: b\r\n")
                await writer.drain()
            except ConnectionError:
                break
            if reader.at_eof():
                break
            try:
                if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                    break
            except asyncio.TimeoutError:
                pass
        return time.monotonic() - start, b""

    async def idle_keepalive():
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        return await _closed_after(reader, HEADER_TIMEOUT + 5)

    async def trickled_body():
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        start = time.monotonic()
        first = b""
        while not first and time.monotonic() - start < BODY_TIMEOUT + 5:
            try:
                writer.write(b" ")  # a byte every 0.1 s: never done, never quite idle
                await writer.drain()
                first = await asyncio.wait_for(reader.read(1), 0.1)
            except asyncio.TimeoutError:
                continue
            except ConnectionError:
                break
        data = first + await asyncio.wait_for(reader.read(), HEADER_TIMEOUT + 5)
        return time.monotonic() - start, data

    async def normal():
        await asyncio.sleep(0.3)  # while the slow ones hold their connections
        async with aiohttp.ClientSession() as s:
            async with s.post(server + "/v1/completions", json=GOOD["/v1/completions"]) as r:
                assert r.status == 200
                return time.monotonic()

    async def go():
        start = time.monotonic()
        slow = [half_headers() for _ in range(20)] + [trickled_headers(), idle_keepalive(),
                                                      trickled_body()]
        *results, served_at = await asyncio.gather(*slow, normal())
        return start, results, served_at

    start, results, served_at = asyncio.run(go())
    *headers, idle, body = results
    assert served_at - start < HEADER_TIMEOUT  # served while 23 slow clients hung on
    for elapsed, data in headers:
        assert HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + 2 and data == b""
    assert HEADER_TIMEOUT * 0.8 <= idle[0] < HEADER_TIMEOUT + 2
    elapsed, data = body
    assert BODY_TIMEOUT * 0.8 <= elapsed < BODY_TIMEOUT + HEADER_TIMEOUT + 2
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    payload = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert payload["error"]["code"] == 408
    assert request("GET", server + "/health")[0] == 200


def test_keepalive_connection_serves_several_requests(server):
    async def go():
        async with aiohttp.ClientSession() as s:  # one pooled connection, reused
            for _ in range(3):
                async with s.post(server + "/tokenize", json={"prompt": "hi"}) as r:
                    assert r.status == 200
                await asyncio.sleep(HEADER_TIMEOUT / 3)

    asyncio.run(go())


# -- 5. prompts: a character cap before tokenization ----------------------------------------------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x" * (MAX_CHARS + 1)}, "prompt"),
    ("/v1/completions", {"prompt": ["hi", "x" * (MAX_CHARS + 1)]}, "prompt"),
    ("/v1/completions", {"prompt": "x" * (MAX_CHARS + 1), "stream": True}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * MAX_CHARS}]},
     "messages"),
    ("/tokenize", {"prompt": "x" * (MAX_CHARS + 1)}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x" * MAX_CHARS}]}, "messages"),
])
def test_prompt_character_cap(server, path, body, param):
    err = error_of(server, path, body)
    assert err["param"] == param and "characters" in err["message"]


def test_tokenizer_threads_own_copies_and_run_at_once(model):
    tok = load_tokenizer(model)
    threads = TokenizerThreads(tok, workers=2, template_workers=1)
    barrier = threading.Barrier(2, timeout=10)
    release = threading.Event()

    def encode():
        barrier.wait()  # both workers are inside at the same time
        return id(threads.current), threads.current("hello world")["input_ids"]

    async def go():
        blocked = asyncio.ensure_future(threads.run(lambda: release.wait(10), True))
        results = await asyncio.gather(threads.run(encode), threads.run(encode))
        assert not blocked.done()  # a stuck request-template render held up nobody
        release.set()
        await blocked
        return results

    try:
        (id_a, ids_a), (id_b, ids_b) = asyncio.run(go())
    finally:
        threads.close()
    assert len({id_a, id_b, id(tok)}) == 3
    assert ids_a == ids_b == tok("hello world")["input_ids"]


def test_processor_makes_the_engines_checks_first(model):
    """Offline and HTTP share these: each is a RequestError before the engine sees anything."""
    from frontend.errors import RequestError
    from frontend.processor import InputProcessor
    from frontend.sampling_params import SamplingParams

    proc = InputProcessor(load_tokenizer(model), max_model_len=64, vocab_size=50,
                          max_prompt_chars=100)
    cases = [("x" * 101, SamplingParams(), "prompt"),  # before tokenizing
             ([], SamplingParams(), "prompt"), ([50], SamplingParams(), "prompt"),
             ([1] * 64, SamplingParams(), "prompt"), ([1], SamplingParams(max_tokens=64),
                                                      "max_tokens"),
             ([1], SamplingParams(logprobs=51), "logprobs"),
             ([1], SamplingParams(stop_token_ids=[50]), "stop_token_ids")]
    for prompt, params, param in cases:
        with pytest.raises(RequestError) as e:
            proc.process("r", prompt, params)
        assert e.value.param == param, (prompt, params)
    assert len(proc.process("r", [1, 2], SamplingParams(n=2, logprobs=50))) == 2
