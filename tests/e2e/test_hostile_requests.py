"""Issue 7, point 4: the hostile corpus (tests/e2e/hostile_corpus.py) against real servers.

Every case must be a 4xx with a JSON error (message, type, code) that carries no traceback, no
exception repr and no server path, answered in time; afterwards the same processes are alive,
/health is 200 and normal requests answer 200. Cases run concurrently, 8 at a time; request
templates go last, since a template that stalls the server would stall the cases after it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
import transformers
from hostile_cases import CHAT, COMPLETIONS, HUGE, Case, Context, image_part
from hostile_chat import TEMPLATES
from hostile_corpus import build_main, build_trusted
from hostile_media import data_url, png_bytes, thin_png
from image_host import ImageHost
from server_utils import Server, alive, children_of, get

pytestmark = pytest.mark.slow
REPO = str(Path(__file__).resolve().parents[2])
CONCURRENCY = 8
# What must never reach a client: tracebacks, exception reprs, server-side paths.
LEAKS = re.compile(r"Traceback|File \"|\b\w*(Error|Exception)\(|site-packages|\.py\b|"
                   + re.escape(REPO))


@dataclass
class Result:
    status: int
    body: bytes
    seconds: float
    failure: str | None = None  # timeout or dropped connection


def _dummy_context() -> Context:
    return Context("m", 384, 64, 3, Path("/nonexistent"), "http://127.0.0.1:1",
                   Path("/nonexistent/marker"))


# Case ids are known at collection (they do not depend on ports or paths).
MAIN_IDS = [c.id for c in build_main(_dummy_context())]
TRUSTED_IDS = [c.id for c in build_trusted(_dummy_context(), "http://127.0.0.1:1")]


def tree(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(children_of(p))
    return out


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_media")
    allowed = d / "allowed"
    allowed.mkdir()
    (allowed / "b.png").write_bytes(png_bytes(24, 24, seed=5))
    (allowed / "notes.txt").write_text("not an image\n")
    (d / "secret.png").write_bytes(png_bytes(24, 24, seed=6))
    (d / "outside").mkdir()
    (d / "outside" / "secret.png").write_bytes(png_bytes(24, 24, seed=7))
    (d / "allowed-evil").mkdir()
    (d / "allowed-evil" / "b.png").write_bytes(png_bytes(24, 24, seed=8))
    os.symlink(d / "secret.png", allowed / "link.png")
    os.symlink(d / "outside", allowed / "outdir")
    os.mkfifo(allowed / "fifo")
    return d


@pytest.fixture(scope="module")
def ssrf_host():
    """Reachable only through loopback spellings the SSRF guard must refuse: never hit."""
    h = ImageHost({"a.png": png_bytes()}, slow_s=30)
    yield h
    h.stop()


@pytest.fixture(scope="module")
def allowed_host():
    h = ImageHost({"a.png": png_bytes(32, 32, seed=3)}, slow_s=30)
    yield h
    h.stop()


@pytest.fixture(scope="module")
def server(tiny_llava, media_dir):
    srv = Server(tiny_llava, "--max-num-batched-tokens", "64",
                 "--allowed-local-media-path", str(media_dir / "allowed"),
                 "--limit-mm-per-prompt", '{"image": 2}',
                 "--http-header-timeout", "2", "--http-body-timeout", "3")
    srv.pids = tree(srv.proc.pid)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def trusted(tiny_llava, allowed_host):
    srv = Server(tiny_llava, "--trust-request-chat-template", "--allowed-media-domains",
                 "127.0.0.1", "--limit-mm-per-prompt", '{"image": 2}',
                 env={"MMSERVE_IMAGE_FETCH_TIMEOUT": "1"})
    srv.pids = tree(srv.proc.pid)
    yield srv
    srv.stop()


def context(srv: Server, model_dir: str, media_dir: Path, ssrf_base: str,
            marker: Path) -> Context:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return Context(srv.proc.args[4], len(tok), config["text_config"]["hidden_size"],
                   tok.convert_tokens_to_ids("<image>"), media_dir, ssrf_base, marker)


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    return tmp_path_factory.mktemp("pickle") / "pwned"


async def send(session: aiohttp.ClientSession, base: str, case: Case) -> Result:
    t0 = time.monotonic()
    try:
        async with session.request(
                case.method, base + case.path, data=case.body, headers=case.headers,
                skip_auto_headers=("Content-Type",),
                timeout=aiohttp.ClientTimeout(total=case.max_seconds + 15)) as r:
            body = await r.read()
            return Result(r.status, body, time.monotonic() - t0)
    except (asyncio.TimeoutError, aiohttp.ClientError) as e:
        return Result(0, b"", time.monotonic() - t0, f"{type(e).__name__}: {e}")


async def run_all(base: str, cases: list[Case]) -> dict[str, Result]:
    sem = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession() as session:
        async def one(case: Case) -> tuple[str, Result]:
            async with sem:
                return case.id, await send(session, base, case)

        first = [c for c in cases if c.cls != "chat_template"]
        last = [c for c in cases if c.cls == "chat_template"]
        results = dict(await asyncio.gather(*(one(c) for c in first)))
        results.update(await asyncio.gather(*(one(c) for c in last)))
        return results


def check(case: Case, r: Result) -> None:
    assert r.failure is None, f"no answer after {r.seconds:.1f}s: {r.failure}"
    shown = r.body[:300].decode(errors="replace")
    assert r.status in case.statuses, f"status {r.status}: {shown}"
    assert r.seconds <= case.max_seconds, f"answered after {r.seconds:.1f}s"
    try:
        err = json.loads(r.body)["error"]
    except (ValueError, KeyError, TypeError):
        pytest.fail(f"not a JSON error body: {shown}")
    assert isinstance(err.get("message"), str) and err["message"], err
    assert isinstance(err.get("type"), str) and "code" in err, err
    assert not LEAKS.search(err["message"]), f"internal text in the message: {err['message']}"
    if case.param is not None:
        got = err.get("param") or ""
        assert got == case.param or got.startswith((case.param + ".", case.param + "[")), (
            f"param {got!r}, expected {case.param!r}: {err['message']}")


@pytest.fixture(scope="module")
def main_run(server, tiny_llava, media_dir, ssrf_host, marker):
    ctx = context(server, tiny_llava, media_dir, ssrf_host.base, marker)
    cases = {c.id: c for c in build_main(ctx)}
    t0 = time.monotonic()
    results = asyncio.run(run_all(server.base, list(cases.values())))
    print(f"\n{len(cases)} hostile cases in {time.monotonic() - t0:.1f}s")
    return cases, results


@pytest.fixture(scope="module")
def trusted_run(trusted, tiny_llava, media_dir, allowed_host, marker):
    ctx = context(trusted, tiny_llava, media_dir, allowed_host.base, marker)
    cases = {c.id: c for c in build_trusted(ctx, allowed_host.base)}
    return cases, asyncio.run(run_all(trusted.base, list(cases.values())))


def test_corpus_size():
    assert len(MAIN_IDS) + len(TRUSTED_IDS) >= 150


@pytest.mark.parametrize("case_id", MAIN_IDS)
def test_hostile(main_run, case_id):
    cases, results = main_run
    check(cases[case_id], results[case_id])


def test_no_payload_ran_and_no_guarded_fetch(main_run, marker, ssrf_host):
    assert not marker.exists(), "a pickle payload ran"
    assert ssrf_host.hits == [], f"the SSRF guard let fetches through: {ssrf_host.hits}"


def _healthy(srv: Server, image_url: str) -> None:
    assert {p for p in srv.pids if alive(p)} == srv.pids, "a server process died"
    assert tree(srv.proc.pid) == srv.pids, "a server process was replaced"
    assert get(srv.base + "/health", 5)[0] == 200
    client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0,
                           timeout=20)
    model = srv.proc.args[4]
    r = client.completions.create(model=model, prompt="Hello", max_tokens=3)
    assert r.choices[0].text is not None and r.usage.completion_tokens >= 1
    r = client.chat.completions.create(model=model, max_tokens=3, messages=[
        {"role": "user", "content": [image_part(image_url), {"type": "text", "text": "?"}]}])
    assert r.choices[0].finish_reason in ("length", "stop")


def test_server_healthy_after_corpus(main_run, server, media_dir):
    _healthy(server, "file://" + str(media_dir / "allowed" / "b.png"))


# -- slow clients (the server has 2 s header and 3 s body timeouts) ------------------------------

def _cut_off(port: int, data: bytes, within: float) -> bytes | None:
    """Send ``data`` and wait: what the server answers before closing, or None if it keeps the
    connection open past ``within`` seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=within) as s:
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except TimeoutError:
            return None
        except ConnectionResetError:
            pass
        return got


@pytest.mark.parametrize("name,data", [
    ("headers never finish", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "),
    ("body never finishes", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                            b"application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": "),
])
def test_slow_client_is_cut_off(main_run, server, name, data):
    got = _cut_off(server.port, data, within=10)
    assert got is not None, "the server kept a stalled request open for 10 s"
    if got:  # a response before closing: a 4xx (408)
        assert re.match(rb"HTTP/1\.1 4\d\d", got), got[:200]
    assert get(server.base + "/health", 5)[0] == 200


# -- the official client: validation before any stream starts -----------------------------------

@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0,
                         timeout=30)


OPENAI_CASES = {
    "wrong model": (openai.NotFoundError, dict(model="no-such-model")),
    "temperature -1": (openai.BadRequestError, dict(temperature=-1)),
    "stream, top_k 2^64+1": (openai.BadRequestError, dict(stream=True,
                                                          extra_body={"top_k": HUGE})),
    "stream, min_tokens 2^64+1": (openai.BadRequestError, dict(
        stream=True, extra_body={"min_tokens": HUGE})),
    "stream, request template": (openai.BadRequestError, dict(
        stream=True, extra_body={"chat_template": TEMPLATES["division by zero"]})),
    "stream, SSRF url": (openai.BadRequestError, dict(stream=True, messages=[
        {"role": "user", "content": [image_part("http://169.254.169.254/"), "?"]}])),
    "stream, 100000x2 PNG": (openai.BadRequestError, dict(stream=True, messages=[
        {"role": "user", "content": [image_part(data_url(thin_png(100_000, 2))), "?"]}])),
}


@pytest.mark.parametrize("name", list(OPENAI_CASES))
def test_openai_client_gets_an_error_not_a_stream(main_run, client, server, name):
    """The error comes from create() itself: a stream never answers 200 before validation."""
    exc, kwargs = OPENAI_CASES[name]
    kwargs = {"model": server.proc.args[4], "max_tokens": 2,
              "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(exc) as e:
        out = client.chat.completions.create(**kwargs)
        if kwargs.get("stream"):
            list(out)  # a 200 stream that carries an error event raises here, or not at all
            pytest.fail("answered 200 and streamed")
    assert 400 <= e.value.status_code < 500
    assert not LEAKS.search(e.value.message), e.value.message


# -- the trusting server: bounded request templates, allowed-domain fetches ----------------------

def test_trusted_server_fetches_from_the_allowed_host(trusted, allowed_host):
    """The other side of the SSRF guard: a listed loopback host is fetched."""
    _healthy(trusted, allowed_host.base + "/img/a.png")


@pytest.mark.parametrize("case_id", TRUSTED_IDS)
def test_hostile_trusted(trusted_run, case_id):
    cases, results = trusted_run
    check(cases[case_id], results[case_id])


def test_template_loop_does_not_block_other_requests(trusted_run, trusted):
    model = trusted.proc.args[4]
    looping = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
               "chat_template": TEMPLATES["4e8-iteration loop"]}
    normal = {"model": model, "max_tokens": 2, "prompt": "Hello"}

    async def scenario() -> tuple[float, int, int]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            async def post(path: str, body: dict) -> int:
                async with s.post(trusted.base + path, json=body) as r:
                    await r.read()
                    return r.status

            loop_task = asyncio.create_task(post(CHAT, looping))
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            status = await post(COMPLETIONS, normal)
            return time.monotonic() - t0, status, await loop_task

    took, status, looped = asyncio.run(scenario())
    assert status == 200 and took < 5, f"a normal request took {took:.1f}s behind the loop"
    assert 400 <= looped < 500


def test_trusted_server_healthy_after(trusted_run, trusted, allowed_host):
    _healthy(trusted, allowed_host.base + "/img/a.png")
