"""MediaFetcher against a local image host: SSRF policy, redirects, caps, data: and file:// URLs."""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import os
import socket
import threading

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from PIL import Image

from frontend.config import FrontendConfig
from frontend.errors import RequestError
from frontend.media.fetch import (
    BlockedAddress,
    MediaFetcher,
    PublicOnlyResolver,
    is_public_address,
)

PARAM = "messages[0].content[1].image_url"


def _png(w: int = 8, h: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
BIG = 2 * 1024 * 1024


def _app(port_box: list[int]) -> web.Application:
    async def png(_):
        return web.Response(body=PNG, content_type="image/png")

    async def missing(_):
        return web.Response(status=404, text="nope")

    async def slow(_):
        await asyncio.sleep(3)
        return web.Response(body=PNG)

    def redirect(to: str):
        async def handler(_):
            raise web.HTTPFound(to.format(port=port_box[0]))
        return handler

    async def chain(request):
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=PNG)
        raise web.HTTPFound(f"/chain/{n - 1}")

    async def big_chunked(request):
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(BIG // 65536):
            await resp.write(b"\0" * 65536)
        await resp.write_eof()
        return resp

    async def big_length(_):
        return web.Response(body=b"\0" * BIG)

    app = web.Application()
    app.router.add_get("/png", png)
    app.router.add_get("/missing", missing)
    app.router.add_get("/slow", slow)
    app.router.add_get("/to-localhost", redirect("http://localhost:{port}/png"))
    app.router.add_get("/to-127-0-0-2", redirect("http://127.0.0.2:{port}/png"))
    app.router.add_get("/to-file", redirect("file:///etc/passwd"))
    app.router.add_get("/relative", redirect("/png"))
    app.router.add_get("/chain/{n}", chain)
    app.router.add_get("/big-chunked", big_chunked)
    app.router.add_get("/big-length", big_length)
    return app


@pytest.fixture(scope="module")
def server():
    """Base URL of the image host, on its own event loop in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port_box = [sock.getsockname()[1]]

    async def start():
        runner = web.AppRunner(_app(port_box), shutdown_timeout=0.5)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield f"http://127.0.0.1:{port_box[0]}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def _config(tmp_path, **kw) -> FrontendConfig:
    return FrontendConfig(model=str(tmp_path), **kw)


def fetch(config: FrontendConfig, url: str, resolver: AbstractResolver | None = None) -> bytes:
    async def go():
        fetcher = MediaFetcher(config, resolver=resolver)
        try:
            return await fetcher.fetch(url, PARAM)
        finally:
            await fetcher.close()

    return asyncio.run(go())


def refused(config: FrontendConfig, url: str, match: str, **kw) -> RequestError:
    with pytest.raises(RequestError, match=match) as e:
        fetch(config, url, **kw)
    assert e.value.param == PARAM and e.value.status == 400
    return e.value


class FakeDNS(AbstractResolver):
    """Answers every name with fixed addresses; stands in for a rebinding or internal DNS."""

    def __init__(self, *addrs: str):
        self.addrs = addrs
        self.asked: list[str] = []

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.asked.append(host)
        return [{"hostname": host, "host": a, "port": port,
                 "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                 "proto": 0, "flags": 0} for a in self.addrs]

    async def close(self):
        pass


# -- http(s) ------------------------------------------------------------------------------------

def test_default_config_refuses_loopback(server, tmp_path):
    cfg = _config(tmp_path)
    refused(cfg, f"{server}/png", "not a public address")
    port = server.rsplit(":", 1)[1]
    refused(cfg, f"http://localhost:{port}/png", "non-public address")  # through DNS
    refused(cfg, f"http://[::ffff:127.0.0.1]:{port}/png", "not a public address")
    refused(cfg, f"http://[::1]:{port}/png", "not a public address")


def test_allowed_domain_fetches(server, tmp_path):
    cfg = _config(tmp_path, allowed_media_domains=("127.0.0.1",))
    assert fetch(cfg, f"{server}/png") == PNG
    assert fetch(cfg, f"{server}/relative") == PNG  # relative redirect on the same host


def test_allowed_domains_admit_only_listed_hosts(tmp_path):
    cfg = _config(tmp_path, allowed_media_domains=("images.example",))
    refused(cfg, "https://example.com/cat.png", "not allowed")


def test_http_error_status(server, tmp_path):
    cfg = _config(tmp_path, allowed_media_domains=("127.0.0.1",))
    refused(cfg, f"{server}/missing", "http 404")


def test_timeout(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSERVE_IMAGE_FETCH_TIMEOUT", "0.3")
    cfg = _config(tmp_path, allowed_media_domains=("127.0.0.1",))
    refused(cfg, f"{server}/slow", "timed out")


def test_vllm_timeout_variable_is_honoured(server, tmp_path, monkeypatch):
    # The image host answers /slow after 3 s; only VLLM_IMAGE_FETCH_TIMEOUT says 0.3 s.
    import time

    monkeypatch.delenv("MMSERVE_IMAGE_FETCH_TIMEOUT", raising=False)
    monkeypatch.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "0.3")
    cfg = _config(tmp_path, allowed_media_domains=("127.0.0.1",))
    start = time.monotonic()
    refused(cfg, f"{server}/slow", "timed out .* after 0.3s")
    assert time.monotonic() - start < 2.0
    # The MMSERVE_ name wins when both are set.
    monkeypatch.setenv("MMSERVE_IMAGE_FETCH_TIMEOUT", "0.2")
    monkeypatch.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "30")
    refused(cfg, f"{server}/slow", "after 0.2s")
    assert fetch(cfg, f"{server}/png") == PNG  # fast hosts still answer


@pytest.mark.parametrize("path", ["/to-localhost", "/to-127-0-0-2"])
def test_redirect_to_unlisted_host_is_refused(server, tmp_path, path):
    cfg = _config(tmp_path, allowed_media_domains=("127.0.0.1",))
    refused(cfg, server + path, "not allowed")


def test_redirect_to_listed_host_is_followed(server, tmp_path):
    cfg = _config(tmp_path, allowed_media_domains=("127.0.0.1", "localhost"))
    assert fetch(cfg, f"{server}/to-localhost") == PNG


def test_redirect_to_file_scheme_is_refused(server, tmp_path):
    cfg = _config(tmp_path, allowed_media_domains=("127.0.0.1",),
                  allowed_local_media_path="/")
    refused(cfg, f"{server}/to-file", "http")


def test_redirect_chain_limit(server, tmp_path):
    cfg = _config(tmp_path, allowed_media_domains=("127.0.0.1",))
    assert fetch(cfg, f"{server}/chain/5") == PNG
    refused(cfg, f"{server}/chain/6", "too many redirects")


@pytest.mark.parametrize("path", ["/big-chunked", "/big-length"])
def test_body_cap(server, tmp_path, path):
    cfg = _config(tmp_path, allowed_media_domains=("127.0.0.1",), max_media_bytes=1 << 20)
    refused(cfg, server + path, f"larger than {1 << 20} bytes")


def test_resolved_private_address_is_refused_at_connect(server, tmp_path):
    port = server.rsplit(":", 1)[1]
    # A name whose DNS answer is loopback: refused inside the connector, before connecting.
    refused(_config(tmp_path), f"http://images.test:{port}/png", "non-public address",
            resolver=FakeDNS("127.0.0.1"))
    # Listed, the same answer is used as is: the connection goes where the resolver said.
    dns = FakeDNS("127.0.0.1")
    cfg = _config(tmp_path, allowed_media_domains=("images.test",))
    assert fetch(cfg, f"http://images.test:{port}/png", resolver=dns) == PNG
    assert dns.asked == ["images.test"]


def test_resolver_refuses_mixed_answers():
    async def go(host, *addrs):
        return await PublicOnlyResolver(FakeDNS(*addrs), ()).resolve(host, 80)

    assert asyncio.run(go("ok.test", "93.184.216.34"))[0]["host"] == "93.184.216.34"
    with pytest.raises(BlockedAddress):
        asyncio.run(go("rebind.test", "93.184.216.34", "10.0.0.1"))
    with pytest.raises(BlockedAddress):
        asyncio.run(go("v6.test", "fd00::1"))


@pytest.mark.parametrize("addr,public", [
    ("93.184.216.34", True), ("2606:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False),
    ("224.0.0.1", False), ("240.0.0.1", False), ("255.255.255.255", False),
    ("::1", False), ("::", False), ("fe80::1", False), ("fc00::1", False), ("ff02::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False), ("::ffff:8.8.8.8", True),
    ("2002:7f00:1::", False), ("64:ff9b::a00:1", False), ("64:ff9b::808:808", True),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),
])
def test_is_public_address(addr, public):
    assert is_public_address(ipaddress.ip_address(addr)) is public


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "javascript:alert(1)",
                                 "gopher://x/", "/etc/passwd", ""])
def test_other_schemes_refused(tmp_path, url):
    refused(_config(tmp_path), url, "url")


# -- data: --------------------------------------------------------------------------------------

def _data_url(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def test_data_url(tmp_path):
    assert fetch(_config(tmp_path), _data_url(PNG)) == PNG
    b64 = base64.b64encode(PNG).decode()
    for url in (f"data:image/png;charset=utf-8;BASE64,{b64}", f"data:image/png;base64,\n{b64}\n"):
        assert fetch(_config(tmp_path), url) == PNG
    assert fetch(_config(tmp_path), _data_url(PNG, "IMAGE/jpeg")) == PNG  # probe decides format


@pytest.mark.parametrize("url,match", [
    (_data_url(PNG, "text/plain"), "image/"),
    (_data_url(PNG, "application/octet-stream"), "image/"),
    ("data:image/png," + PNG.hex(), "base64"),
    ("data:image/png;base64,not*base64!", "not valid base64"),
    ("data:image/png;base64,QUJ", "not valid base64"),
    ("data:image/png;base64", "','"),
    # Odd parameters and payloads: each a 400 naming the part, never a 500.
    ("data:;base64," + base64.b64encode(PNG).decode(), "image/"),
    ("data:image/;base64," + base64.b64encode(PNG).decode(), "image/"),
    ("data:image/png;base64,iVBOR\u00e9w0K", "not valid base64"),
    ("data:image/png;base64,iVBORw0K%3D%3D", "not valid base64"),
    ("data:image/png;base64,\x00\x00\x00\x00", "not valid base64"),
    ("data:image/png;name=a,b;base64,AAAA", "base64 encoded"),
    ("data:image/png" + ";x" * 10_000 + "," + base64.b64encode(PNG).decode(), "base64"),
])
def test_bad_data_urls(tmp_path, url, match):
    refused(_config(tmp_path), url, match)


def test_data_url_cap(tmp_path):
    refused(_config(tmp_path, max_media_bytes=1024), _data_url(b"\0" * 4096), "larger than 1024")


# -- file:// ------------------------------------------------------------------------------------

@pytest.fixture
def media_dirs(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "sub").mkdir()
    (root / "sub" / "a.png").write_bytes(PNG)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"secret")
    os.symlink(secret, root / "escape.png")
    os.symlink(root / "sub" / "a.png", root / "inner-link.png")
    return root, secret


def test_file_inside(media_dirs, tmp_path):
    root, _ = media_dirs
    cfg = _config(tmp_path, allowed_local_media_path=str(root))
    assert fetch(cfg, f"file://{root}/sub/a.png") == PNG
    assert fetch(cfg, f"file://{root}/inner-link.png") == PNG  # a symlink that stays inside
    assert fetch(cfg, f"file://localhost{root}/sub/../sub/a.png") == PNG


def test_file_escapes(media_dirs, tmp_path):
    root, secret = media_dirs
    cfg = _config(tmp_path, allowed_local_media_path=str(root))
    exists = refused(cfg, f"file://{secret}", "not under")
    absent = refused(cfg, f"file://{tmp_path}/no-such.png", "not under")
    assert exists.message == absent.message  # outside, existence is not revealed
    refused(cfg, f"file://{root}/sub/../../secret.png", "not under")
    refused(cfg, f"file://{root}/sub/%2e%2e/%2e%2e/secret.png", "not under")
    refused(cfg, f"file://{root}/escape.png", "not under")
    refused(cfg, f"file://{root}", "regular file")
    refused(cfg, f"file://otherhost{root}/sub/a.png", "file:///")


def test_file_needs_allowed_path(media_dirs, tmp_path):
    root, _ = media_dirs
    refused(_config(tmp_path), f"file://{root}/sub/a.png", "not allowed")


def test_file_cap(media_dirs, tmp_path):
    root, _ = media_dirs
    cfg = _config(tmp_path, allowed_local_media_path=str(root), max_media_bytes=16)
    refused(cfg, f"file://{root}/sub/a.png", "larger than 16")


# -- config -------------------------------------------------------------------------------------

def test_media_config_defaults_and_normalization(tmp_path):
    cfg = _config(tmp_path, allowed_media_domains=["Images.Example."],
                  media_io_kwargs={"image": {"rgba_background_color": (1, 2, 3)}})
    assert cfg.allowed_media_domains == ("images.example",)
    assert cfg.media_io_kwargs == {"image": {"rgba_background_color": [1, 2, 3]}}
    default = _config(tmp_path)
    assert default.max_media_bytes == 20 * 1024 * 1024 and default.max_image_pixels == 50_000_000
    assert default.limit_mm_per_prompt == {"image": 8, "video": 1, "audio": 4} and default.allowed_local_media_path is None
    assert default.limit_mm_per_prompt is not _config(tmp_path).limit_mm_per_prompt


@pytest.mark.parametrize("kw", [
    {"allowed_local_media_path": "/no/such/folder"},
    {"allowed_media_domains": ("",)},
    {"max_media_bytes": 0},
    {"max_image_pixels": 0},
    {"limit_mm_per_prompt": {"image": -1}},
    {"limit_mm_per_prompt": {"smell": 1}},
    {"limit_mm_per_prompt": {"image": True}},
    {"media_io_kwargs": {"image": {"rgba_background_color": [0, 0]}}},
    {"media_io_kwargs": {"image": {"rgba_background_color": [0, 0, 256]}}},
    {"media_io_kwargs": {"image": {"rgba_background_color": [0, 0, 1.5]}}},
    {"media_io_kwargs": {"image": {"rgba_background_color": "white"}}},
    {"media_io_kwargs": {"image": {"background": [0, 0, 0]}}},
    {"media_io_kwargs": {"image": [0, 0, 0]}},
])
def test_media_config_validation(tmp_path, kw):
    with pytest.raises(ValueError):
        _config(tmp_path, **kw)


@pytest.mark.parametrize("url", ["http://xn--/", "http://xn--a/x", "https://\u00e4.xn--/"])
def test_urls_whose_host_cannot_be_decoded(tmp_path, url):
    # The error message used to decode the IDNA host again, and that raised inside the handler.
    refused(_config(tmp_path), url, "could not connect|not a valid URL|failed")


def test_file_url_with_a_lone_surrogate(tmp_path):
    cfg = _config(tmp_path, allowed_local_media_path=str(tmp_path))
    refused(cfg, f"file://{tmp_path}/\ud800.png", "file URL must look like")
