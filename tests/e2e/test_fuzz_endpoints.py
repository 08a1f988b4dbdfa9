"""Issue 7, point 4: property-based fuzzing of every endpoint's request schema over real HTTP.

Strategies are derived from the msgspec Structs in frontend/openai/protocol.py (msgspec.inspect),
so a new field is fuzzed without touching this file. Each field mixes valid values, edge values
(huge and negative ints, NaN/Infinity literals, empty and odd unicode) and wrong types; fully
random JSON and random bytes go to every endpoint too. Property: never a 5xx, an answer within
10 s, and every 4xx is the JSON error shape. Derandomized, so CI runs the same bodies each time.
"""

from __future__ import annotations

import http.client
import json
import time

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_utils import Server, alive, get

from frontend.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

pytestmark = pytest.mark.slow
CHAT, COMPLETIONS, TOKENIZE, DETOKENIZE = ("/v1/chat/completions", "/v1/completions",
                                           "/tokenize", "/detokenize")
SCHEMAS = {CHAT: ChatCompletionRequest, COMPLETIONS: CompletionRequest,
           TOKENIZE: TokenizeRequest, DETOKENIZE: DetokenizeRequest}
TIMEOUT_S = 10.0
EXAMPLES = {CHAT: 1200, COMPLETIONS: 1000, TOKENIZE: 400, DETOKENIZE: 400}
COUNTS: dict[str, int] = {}
OK: dict[str, int] = {}  # 200s per endpoint: the fuzzer must get past validation too
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))

# -- strategies -----------------------------------------------------------------------------------

EDGE_INTS = st.sampled_from([0, -1, 1, 2, 255, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64,
                             2**64 + 1, -(2**63) - 1, -(2**64), 10**30])
EDGE_FLOATS = st.sampled_from([0.0, -0.0, 1e-300, -1e-300, 1e308, -1e308, 2.000001,
                               float("nan"), float("inf"), float("-inf")])
EDGE_STRS = st.sampled_from(["", " ", "NaN", "Infinity", "null", "0", "-1", "\x00", "\ud800",
                             "🙂" * 50, "<|im_start|>", "<|im_end|>", "<|endoftext|>",
                             "{{ 1/0 }}", "a" * 5000, "\u202e\u0000\uffff"])
TEXT = st.one_of(st.text(max_size=40), EDGE_STRS)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), EDGE_INTS,
                    st.floats(allow_nan=True), TEXT)
JUNK = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12)

ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "", "root", "USER"])
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "image_embeds",
                                                    "input_audio", "video_url", "bogus"])},
                          optional={"text": JUNK, "image_url": JUNK, "image_embeds": JUNK,
                                    "uuid": JUNK}),
    TEXT, JUNK)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": ROLES, "content": st.one_of(TEXT, st.lists(PART, max_size=3))},
                          optional={"name": JUNK, "tool_calls": JUNK}),
    JUNK)
MESSAGES = st.one_of(st.lists(MESSAGE, min_size=1, max_size=3),
                     st.just([{"role": "user", "content": "hi"}]), JUNK)
TOKEN_IDS = st.lists(st.one_of(st.integers(0, 383), EDGE_INTS), max_size=8)
PROMPT = st.one_of(TEXT, TOKEN_IDS, st.lists(TEXT, max_size=3),
                   st.lists(TOKEN_IDS, max_size=3), JUNK)
# Fields whose shape the type alone does not tell: valid values, and hostile ones.
VALID = {"messages": st.lists(st.fixed_dictionaries({
             "role": st.sampled_from(["system", "user", "assistant"]),
             "content": st.one_of(st.text(min_size=1, max_size=30),
                                  st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                  "text": st.text(max_size=20)}),
                                           min_size=1, max_size=2))}), min_size=1, max_size=3),
         "prompt": st.one_of(st.text(min_size=1, max_size=40),
                             st.lists(st.integers(0, 383), min_size=1, max_size=20)),
         "tokens": st.lists(st.integers(0, 383), max_size=20), "model": st.none(),
         "chat_template": st.none(), "chat_template_kwargs": st.none(),
         "stop_token_ids": st.lists(st.integers(0, 383), max_size=3),
         "top_logprobs": st.none(), "logprobs": st.none(), "best_of": st.none(),
         "suffix": st.none(), "logit_bias": st.none(), "stream_options": st.none()}
SPECIAL = {"messages": MESSAGES, "prompt": PROMPT, "tokens": TOKEN_IDS,
           "model": st.one_of(st.none(), st.just("no-such-model"), JUNK),
           "chat_template": st.one_of(st.none(), TEXT), "stop_token_ids": TOKEN_IDS}


def from_type(t: msgspec.inspect.Type, depth: int = 0) -> st.SearchStrategy:
    """Valid values of one msgspec type (bounds included), as far as the type says."""
    i = msgspec.inspect
    if depth > 3:
        return SCALARS
    if isinstance(t, i.UnionType):
        return st.one_of(*(from_type(x, depth + 1) for x in t.types))
    if isinstance(t, i.NoneType):
        return st.none()
    if isinstance(t, i.BoolType):
        return st.booleans()
    if isinstance(t, i.IntType):
        lo = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else -5)
        hi = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else 300)
        return st.integers(max(lo, -5), min(hi, 300)) if max(lo, -5) <= min(hi, 300) else \
            st.integers(lo, hi)
    if isinstance(t, i.FloatType):
        return st.floats(-3, 3, allow_nan=False)
    if isinstance(t, i.StrType):
        return TEXT
    if isinstance(t, i.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, i.ListType):
        return st.lists(from_type(t.item_type, depth + 1), max_size=4)
    if isinstance(t, i.DictType):
        return st.dictionaries(TEXT, from_type(t.value_type, depth + 1), max_size=3)
    if isinstance(t, i.StructType):
        return st.fixed_dictionaries({}, optional={
            f.encode_name: from_type(f.type, depth + 1) for f in t.fields})
    return JUNK  # Any, and types without a better idea


def field_values(schema: type) -> tuple[dict[str, st.SearchStrategy],
                                         dict[str, st.SearchStrategy]]:
    """Per field: valid values, and a hostile mix (valid, edge values, wrong types)."""
    valid, mixed = {}, {}
    for f in msgspec.inspect.type_info(schema).fields:
        name = f.encode_name
        typed = from_type(f.type)
        valid[name] = VALID[name] if name in VALID else typed
        hostile = SPECIAL[name] if name in SPECIAL else typed
        mixed[name] = st.one_of(hostile, hostile, valid[name], EDGE_INTS, EDGE_FLOATS,
                                EDGE_STRS, JUNK)
    return valid, mixed


def bodies(path: str) -> st.SearchStrategy:
    schema = SCHEMAS[path]
    valid, mixed = field_values(schema)
    required = {f.encode_name for f in msgspec.inspect.type_info(schema).fields if f.required}
    if path == TOKENIZE:
        required = {"prompt"}  # one of prompt/messages: valid bodies need one

    @st.composite
    def body(draw):
        # A third valid, a third valid but for one hostile field, a third hostile throughout:
        # requests must get past decoding into deeper code too.
        mode = draw(st.integers(0, 2))
        values = mixed if mode == 2 else valid
        names = draw(st.sets(st.sampled_from(sorted(values)), max_size=8)) | required
        if path == TOKENIZE and values is valid and "messages" in names:
            names.discard("prompt")
        out = {n: draw(values[n]) for n in sorted(names)}
        if mode == 1:
            name = draw(st.sampled_from(sorted(mixed)))
            out[name] = draw(mixed[name])
        if values is mixed and draw(st.integers(0, 4)) == 0:
            out[draw(TEXT)] = draw(JUNK)  # an unknown field now and then
        if path in (CHAT, COMPLETIONS):  # keep generation cheap when a body is valid
            for key in ("max_tokens", "max_completion_tokens"):
                v = out.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and v > 4:
                    out[key] = draw(st.integers(1, 4))
            # None would mean "up to the context": bound it unless the other field does.
            if out.get("max_tokens") is None and out.get("max_completion_tokens") is None:
                out["max_tokens"] = draw(st.integers(1, 4))
        return out

    return body()


# -- the property ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_llama):
    srv = Server(tiny_llama, "--max-model-len", "256", "--max-num-batched-tokens", "64",
                 "--max-num-seqs", "32")
    yield srv
    srv.stop()


class Http:
    """One keep-alive connection (reopened after the server closes it)."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                self.conn.request("POST", path, body=body,
                                  headers={"Content-Type": "application/json"})
                r = self.conn.getresponse()
                return r.status, r.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT_S)
                if attempt:
                    raise
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def http_client(server):
    client = Http(server.port)
    yield client
    client.conn.close()


def post(client: Http, path: str, content: bytes) -> None:
    COUNTS[path] = COUNTS.get(path, 0) + 1
    t0 = time.monotonic()
    try:
        status, body = client.post(path, content)
    except TimeoutError:
        client.conn.close()
        pytest.fail(f"no answer within {TIMEOUT_S}s")
    took = time.monotonic() - t0
    OK[path] = OK.get(path, 0) + (status == 200)
    shown = body[:300].decode(errors="replace")
    assert status < 500, f"{status}: {shown}"
    assert took < TIMEOUT_S
    if status >= 400:
        err = json.loads(body)["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err, err
        assert "Traceback" not in err["message"], err["message"]
    elif path in (CHAT, COMPLETIONS) and b'"stream": true' not in content:
        assert "choices" in json.loads(body), shown


def encode(body: object) -> bytes:
    # json.dumps writes NaN/Infinity literals (not JSON): on purpose, the server must refuse them.
    return json.dumps(body).encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("path", list(SCHEMAS))
def test_schema_fuzz(http_client, path):
    @settings(FUZZ, max_examples=EXAMPLES[path])
    @given(body=bodies(path))
    def run(body):
        post(http_client, path, encode(body))

    run()


@pytest.mark.parametrize("path", list(SCHEMAS))
def test_random_json_and_bytes(http_client, path):
    @settings(FUZZ, max_examples=150)
    @given(body=st.one_of(JUNK.map(encode), st.binary(max_size=200),
                          st.dictionaries(TEXT, JUNK, max_size=6).map(encode)))
    def run(body):
        post(http_client, path, body)

    run()


def test_server_healthy_after_fuzzing(http_client, server):
    assert sum(COUNTS.values()) >= 2000, COUNTS
    assert all(OK.get(p, 0) >= 50 for p in SCHEMAS), OK
    assert alive(server.proc.pid) and get(server.base + "/health", 5)[0] == 200
    status, body = http_client.post(COMPLETIONS, b'{"prompt": "Hello", "max_tokens": 3}')
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] >= 1
    print("\nfuzzed bodies per endpoint:", COUNTS, "answered 200:", OK)
