"""Issue 3 over real HTTP: `mmserve serve LLAVA --encoders 2` with the official openai client,
images by data/http/file URL, image_embeds, the encoder caches, bad media, encoder death."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import pickle
import signal
import struct
import time
import zlib

import aiohttp
import openai
import pytest
import torch
from image_host import ImageHost
from llava_utils import HFLlava, image, png
from server_utils import Server, get, metric

pytestmark = pytest.mark.slow
N = 8


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def part(url: str | None, uuid: str | None = None) -> dict:
    p: dict = {"type": "image_url", "image_url": None if url is None else {"url": url}}
    if uuid is not None:
        p["uuid"] = uuid
    return p


def embeds_part(tensor) -> dict:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return {"type": "image_embeds", "image_embeds": base64.b64encode(buf.getvalue()).decode()}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "allowed").mkdir()
    (d / "allowed" / "b.png").write_bytes(png(image(21)))
    (d / "secret.png").write_bytes(png(image(22)))
    os.symlink(d / "secret.png", d / "allowed" / "link.png")
    return d


@pytest.fixture(scope="module")
def host():
    h = ImageHost({"a.png": png(image(20))})
    yield h
    h.stop()


@pytest.fixture(scope="module")
def server(tiny_llava, media_dir, host):
    srv = Server(tiny_llava, "--encoders", "2", "--max-num-batched-tokens", "24",
                 "--allowed-local-media-path", str(media_dir / "allowed"),
                 "--allowed-media-domains", "127.0.0.1", "--limit-mm-per-prompt",
                 '{"image": 3}', env={"MMSERVE_IMAGE_FETCH_TIMEOUT": "1"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf(tiny_llava):
    return HFLlava(tiny_llava)


def ask(client, content, **kw):
    model = client.models.list().data[0].id
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=N,
        temperature=0, extra_body={"ignore_eos": True}, **kw)


def encoder_totals(base: str) -> tuple[float, float]:
    enc = sum(metric(base, f'mmserve_encoder_num_encoded{{encoder="{i}"}}') for i in (0, 1))
    hits = sum(metric(base, f'mmserve_encoder_num_cache_hits{{encoder="{i}"}}') for i in (0, 1))
    return enc, hits


def settle(base: str) -> None:
    time.sleep(0.6)  # encoder stats arrive with heartbeats (every 0.2 s)


def test_http_parity_for_data_http_and_file_urls(client, hf, host, media_dir):
    content = [{"type": "text", "text": "Compare"}, part(data_url(png(image(19)))),
               {"type": "text", "text": "with"}, part(f"{host.base}/img/a.png"),
               part("file://" + str(media_dir / "allowed" / "b.png")),
               {"type": "text", "text": "please."}]
    got = ask(client, content)
    want = hf.greedy(hf.chat_prompt(content), [image(19), image(20), image(21)], N)
    assert got.choices[0].message.content == hf.proc.tokenizer.decode(want,
                                                                      skip_special_tokens=True)
    assert got.usage.completion_tokens == N
    stream = ask(client, content, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == got.choices[0].message.content


def test_both_encoders_work_and_cache_hits_skip_the_tower(server, client):
    settle(server.base)
    before, hits0 = encoder_totals(server.base)
    for seed in range(30, 38):  # 8 distinct images: rendezvous hashing spreads them
        ask(client, [part(data_url(png(image(seed)))), {"type": "text", "text": "?"}])
    settle(server.base)
    per = [metric(server.base, f'mmserve_encoder_num_encoded{{encoder="{i}"}}') for i in (0, 1)]
    assert all(p > 0 for p in per), per
    mid, hits1 = encoder_totals(server.base)
    assert mid - before == 8
    first = ask(client, [part(data_url(png(image(30)))), {"type": "text", "text": "?"}])
    settle(server.base)
    after, hits2 = encoder_totals(server.base)
    assert after == mid and hits2 == hits1 + 1  # same bytes: not encoded again
    # uuid: first with the image, then without it
    with_img = ask(client, [part(data_url(png(image(40))), uuid="pic-40"),
                            {"type": "text", "text": "?"}])
    by_uuid = ask(client, [part(None, uuid="pic-40"), {"type": "text", "text": "?"}])
    assert by_uuid.choices[0].message.content == with_img.choices[0].message.content
    assert first.choices[0].message.content


def test_uuid_miss_is_a_clear_400(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, [part(None, uuid="never-seen"), {"type": "text", "text": "?"}])
    assert "never-seen" in e.value.message
    status, body = get(server.base + "/health")
    encoders = json.loads(body)["encoders"]  # 200 once one of the two is live
    assert status == 200 and encoders["state"] == "ready" and encoders["total"] == 2, body
    assert 1 <= encoders["live"] <= 2, body


def test_image_embeds_match_the_image(client, hf):
    img = image(50)
    by_image = ask(client, [part(data_url(png(img))), {"type": "text", "text": "Hi"}])
    by_embeds = ask(client, [embeds_part(hf.features(img)), {"type": "text", "text": "Hi"}])
    assert by_embeds.choices[0].message.content == by_image.choices[0].message.content


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _bomb_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


def test_bad_media_is_4xx_and_the_server_keeps_serving(server, client, host, media_dir, hf,
                                                        tmp_path):
    jpeg = io.BytesIO()
    image(60).save(jpeg, format="JPEG")
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(torch.zeros(16, 64).to_sparse(), buf)
    sparse = base64.b64encode(buf.getvalue()).decode()
    hidden = hf.model.config.text_config.hidden_size
    bad = {
        "undecodable": [part(data_url(b"definitely not an image"))],
        "truncated jpeg": [part(data_url(jpeg.getvalue()[:300], "image/jpeg"))],
        "1x1": [part(data_url(png(image(61, (1, 1)))))],
        "bomb": [part(data_url(_bomb_png()))],
        "too many": [part(data_url(png(image(62)))) for _ in range(4)],
        "bad base64": [part("data:image/png;base64,@@@not base64@@@")],
        "wrong mime": [part(data_url(png(image(63)), "text/plain"))],
        "timeout": [part(f"{host.base}/slow")],
        "404": [part(f"{host.base}/img/missing.png")],
        "redirect to a disallowed host": [part(f"{host.base}/redirect")],
        "file outside": [part("file://" + str(media_dir / "secret.png"))],
        "file via ..": [part("file://" + str(media_dir / "allowed" / ".." / "secret.png"))],
        "file via symlink": [part("file://" + str(media_dir / "allowed" / "link.png"))],
        "embeds wrong shape": [embeds_part(torch.zeros(16, hidden + 1))],
        "embeds wrong dtype": [embeds_part(torch.zeros(16, hidden, dtype=torch.int32))],
        "embeds oversized": [embeds_part(torch.zeros(20_000, hidden))],
        "embeds pickle": [{"type": "image_embeds", "image_embeds":
                           base64.b64encode(pickle.dumps(_Boom(marker))).decode()}],
        "embeds sparse": [{"type": "image_embeds", "image_embeds": sparse}],
    }
    for name, parts in bad.items():
        t0 = time.monotonic()
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, [*parts, {"type": "text", "text": "?"}])
        assert e.value.status_code == 400 and e.value.message, name
        assert "Traceback" not in e.value.message, name
        assert time.monotonic() - t0 < 5, name
    assert not marker.exists(), "the pickle payload ran"
    assert get(server.base + "/health")[0] == 200
    ok = ask(client, [part(data_url(png(image(64)))), {"type": "text", "text": "?"}])
    assert ok.choices[0].finish_reason == "length"


def test_killing_one_encoder_under_load(tiny_llava):
    srv = Server(tiny_llava, "--encoders", "2")
    try:
        async def one(s: aiohttp.ClientSession, seed: int) -> int:
            body = {"model": srv.proc.args[4], "max_tokens": 4, "messages": [{"role": "user",
                    "content": [part(data_url(png(image(seed, (200, 200))))),
                                {"type": "text", "text": "?"}]}]}
            async with s.post(srv.base + "/v1/chat/completions", json=body) as r:
                await r.read()
                return r.status

        async def load() -> list[int]:
            async with aiohttp.ClientSession() as s:
                tasks = [asyncio.create_task(one(s, 100 + i)) for i in range(24)]
                await asyncio.sleep(0.3)
                os.kill(srv.children("encoder")[0], signal.SIGKILL)
                return await asyncio.wait_for(asyncio.gather(*tasks), 60)

        t0 = time.monotonic()
        statuses = asyncio.run(load())
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 1 and time.monotonic() - t0 < 60

        async def after() -> list[int]:
            async with aiohttp.ClientSession() as s:
                return [await one(s, 200 + i) for i in range(6)]

        assert asyncio.run(after()) == [200] * 6  # new requests work on what is left
    finally:
        srv.stop()
