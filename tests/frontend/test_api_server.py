"""The HTTP frontend against a real engine core (tiny random model, CPU), over real sockets."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import pytest
from app_utils import AppServer as Server
from app_utils import running_engine

from frontend.config import FrontendConfig
from frontend.random_model import build_random_checkpoint
from protocol.addresses import LOOPBACK, free_port, tcp

pytestmark = pytest.mark.slow

MAX_LEN = 256
MODEL = "tiny"
CHAT = [{"role": "user", "content": "Hello! How are you today?"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(build_random_checkpoint(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def server(model):
    with running_engine(model, max_model_len=MAX_LEN, num_kv_blocks=128,
                        max_num_seqs=16) as (addr, engine):
        config = FrontendConfig(model=model, served_model_name=[MODEL, "alias"], engine_addr=addr,
                                host=LOOPBACK, port=free_port(), max_n=4, max_logprobs=5,
                                max_body_bytes=64 * 1024)
        srv = Server(config)
        try:
            srv.wait_healthy(engine)
            yield srv.url
        finally:
            srv.stop()


# -- helpers ------------------------------------------------------------------------------------

async def _request(url, method, path, body=None, raw=None):
    async with aiohttp.ClientSession() as s:
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        async with s.request(method, url + path, data=data,
                             headers={"Content-Type": "application/json"}) as r:
            text = await r.text()
            return r.status, text


def status(url, method, path) -> int:
    try:
        return asyncio.run(_request(url, method, path))[0]
    except aiohttp.ClientError:
        return -1


def post(url, path, body=None, raw=None, expect=200):
    code, text = asyncio.run(_request(url, "POST", path, body, raw))
    assert code == expect, text
    return json.loads(text)


def get(url, path):
    code, text = asyncio.run(_request(url, "GET", path))
    assert code == 200, text
    return text


def stream_events(url, path, body):
    """The SSE events of a streamed request: parsed JSON payloads, then the literal [DONE]."""
    code, text = asyncio.run(_request(url, "POST", path, {**body, "stream": True}))
    assert code == 200, text
    assert text.endswith("data: [DONE]\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    return events[:-1]


def metrics(url) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(mmserve_\w+) (\S+)$", get(url, "/metrics"), re.M)}


def wait_idle(url, timeout=10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["mmserve_num_running"] == 0 and m["mmserve_num_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.1)


# -- tests --------------------------------------------------------------------------------------

def test_models_health_version(server):
    models = json.loads(get(server, "/v1/models"))
    assert [m["id"] for m in models["data"]] == [MODEL, "alias"]
    assert models["data"][0]["max_model_len"] == MAX_LEN
    assert "version" in json.loads(get(server, "/version"))
    assert status(server, "GET", "/health") == 200


def test_chat_completion(server):
    r = post(server, "/v1/chat/completions",
             {"model": MODEL, "messages": CHAT, "max_tokens": 5, "ignore_eos": True})
    assert r["id"].startswith("chatcmpl-") and r["object"] == "chat.completion"
    assert r["model"] == MODEL
    (choice,) = r["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    tokens = post(server, "/tokenize", {"messages": CHAT})
    u = r["usage"]
    assert u["prompt_tokens"] == tokens["count"] and u["completion_tokens"] == 5
    assert u["total_tokens"] == u["prompt_tokens"] + 5


def test_completion_batch_and_n(server):
    r = post(server, "/v1/completions", {"model": "alias", "prompt": ["Hello", "The quick"],
                                         "n": 2, "max_tokens": 3, "ignore_eos": True,
                                         "temperature": 1.0, "seed": 1})
    assert r["id"].startswith("cmpl-") and r["object"] == "text_completion"
    assert sorted(c["index"] for c in r["choices"]) == [0, 1, 2, 3]
    lens = [post(server, "/tokenize", {"prompt": p})["count"] for p in ("Hello", "The quick")]
    assert r["usage"]["prompt_tokens"] == sum(lens)
    assert r["usage"]["completion_tokens"] == 12


def test_token_prompt_and_echo(server):
    ids = post(server, "/tokenize", {"prompt": "Hello world"})["tokens"]
    assert post(server, "/detokenize", {"tokens": ids})["prompt"] == "Hello world"
    r = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 3, "echo": True,
                                         "temperature": 0})
    assert r["choices"][0]["text"].startswith("Hello world")
    assert r["usage"]["prompt_tokens"] == len(ids)


def test_stream_matches_non_stream(server):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}
    full = post(server, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
    events = stream_events(server, "/v1/chat/completions", body)
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "usage" not in events[0]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == full
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert len({e["id"] for e in events}) == 1


def test_stream_include_usage_and_n(server):
    body = {"prompt": "Hello", "max_tokens": 4, "n": 2, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    events = stream_events(server, "/v1/completions", body)
    *chunks, last = events
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 8
    assert all(c["usage"] is None for c in chunks)
    finished = [ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert sorted(finished) == [0, 1]


def test_chat_logprobs_shape(server):
    r = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 4,
                                              "ignore_eos": True, "logprobs": True,
                                              "top_logprobs": 3})
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["logprob"] <= 0 and all(isinstance(b, int) for b in entry["bytes"])
        assert len(entry["top_logprobs"]) == 3
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert tops == sorted(tops, reverse=True)


def test_completion_logprobs_shape(server):
    r = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "logprobs": 2,
                                         "ignore_eos": True})
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(1 <= len(t) <= 3 for t in lp["top_logprobs"])


def test_stop_string_truncates_and_frees(server):
    base = {"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}
    text = post(server, "/v1/completions", base)["choices"][0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), "need a visible stop string from the greedy output"
    r = post(server, "/v1/completions", {**base, "stop": [stop]})
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == text[:text.index(stop)]
    wait_idle(server)


def test_prefix_cache_hits_over_http(server):
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    before = metrics(server)
    for _ in range(2):
        r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
    # The engine's stats reach the frontend with its heartbeats: allow a few beats.
    deadline = time.monotonic() + 5
    while metrics(server)["mmserve_prefix_cache_hits"] <= before["mmserve_prefix_cache_hits"]:
        assert time.monotonic() < deadline, "no prefix cache hit reported"
        time.sleep(0.1)
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_client_disconnect_aborts(server):
    idle = wait_idle(server)

    async def go():
        async with aiohttp.ClientSession() as s:
            body = {"prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
            async with s.post(server + "/v1/completions", json=body) as r:
                assert r.status == 200
                await r.content.readline()  # the stream started; now hang up

    asyncio.run(go())
    time.sleep(1.0)  # a few heartbeats, so the stats are newer than the hang-up
    m = wait_idle(server)
    # Aborted: the engine stopped long before the 200 tokens it was asked for.
    assert m["mmserve_num_steps"] - idle["mmserve_num_steps"] < 100
    assert m["mmserve_num_free_blocks"] == idle["mmserve_num_free_blocks"]


def test_client_gone_on_non_streamed_request_aborts(server):
    idle = wait_idle(server)

    async def go():
        async with aiohttp.ClientSession() as s:
            body = {"prompt": "Hello", "max_tokens": MAX_LEN - 8, "ignore_eos": True, "n": 4}
            task = asyncio.create_task(s.post(server + "/v1/completions", json=body))
            # Hang up once the engine reports the request running (heartbeats: every 0.2 s).
            for _ in range(50):
                if (await asyncio.to_thread(metrics, server))["mmserve_num_running"] > 0:
                    break
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(go())
    time.sleep(1.0)
    m = wait_idle(server)
    assert m["mmserve_num_steps"] - idle["mmserve_num_steps"] < MAX_LEN - 8
    assert m["mmserve_num_free_blocks"] == idle["mmserve_num_free_blocks"]


@pytest.mark.parametrize("path, body, code, param", [
    ("/v1/chat/completions", {"messages": CHAT, "model": "nope"}, 404, "model"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": MAX_LEN}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 5}, 400, "n"),
    ("/v1/chat/completions", {"messages": CHAT, "stop": 3}, 400, "stop"),
    ("/v1/chat/completions", {"messages": CHAT, "stop": [None]}, 400, "stop[0]"),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": CHAT, "logit_bias": {"1": 2}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": CHAT, "frobnicate": True}, 400, "frobnicate"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 6}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]}, 400,
     "messages[0].content[0].image_url"),  # a text-only model: "does not accept image input"
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 300}]}, 400,
     "messages"),
    ("/v1/completions", {"prompt": "x " * 300}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
    ("/detokenize", {"tokens": [10**6]}, 400, "tokens"),
])
def test_bad_requests_name_the_problem(server, path, body, code, param):
    r = post(server, path, body, expect=code)
    err = r["error"]
    assert err["param"] == param and err["code"] == code and err["message"]
    assert status(server, "GET", "/health") == 200


def test_malformed_bodies(server):
    r = post(server, "/v1/chat/completions", raw="{not json", expect=400)
    assert "invalid JSON" in r["error"]["message"]
    r = post(server, "/v1/completions", raw="[]", expect=400)
    assert "Expected `object`" in r["error"]["message"]
    r = post(server, "/v1/completions", raw=json.dumps({"prompt": "x" * 70_000}), expect=413)
    assert r["error"]["code"] == 413
    assert status(server, "GET", "/v1/nothing") == 404
    assert status(server, "GET", "/health") == 200


def test_official_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0,
                                       seed=3, user="u", stream_options=None)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 4
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, logprobs=1)
    assert len(c.choices[0].logprobs.tokens) == c.usage.completion_tokens
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=CHAT)


def test_no_engine_answers_503(model):
    config = FrontendConfig(model=model, engine_addr=tcp(), port=free_port())
    srv = Server(config)
    try:
        code, text = asyncio.run(_request(srv.url, "GET", "/health"))
        assert code == 503 and json.loads(text) == {
            "status": "starting", "engine": {
                "state": "starting", "reason": "the engine has not answered yet",
                "step_running_s": None, "silent_s": None, "executor_restarts": 0},
            "encoders": None}, text
        r = post(srv.url, "/v1/chat/completions", {"messages": CHAT}, expect=503)
        assert r["error"]["code"] == 503 and "engine" in r["error"]["message"]
        r = post(srv.url, "/v1/completions", {"prompt": "hi", "stream": True}, expect=503)
        assert r["error"]["code"] == 503
        assert "mmserve_engine_healthy 0" in get(srv.url, "/metrics")
        assert post(srv.url, "/tokenize", {"prompt": "Hello"})["max_model_len"] is None
        r = post(srv.url, "/v1/chat/completions", {"messages": CHAT, "model": "x"}, expect=404)
        assert r["error"]["param"] == "model"
    finally:
        srv.stop()
