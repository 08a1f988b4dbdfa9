"""A local HTTP server standing in for an image host (the one fake: it is outside our system).

Routes: files (`/img/NAME`), a slow answer (`/slow`), redirects (`/redirect?to=URL`, by default
to the same host under another name), an endless body (`/endless`) and a non-image page
(`/page.html`); every request path is recorded in ``hits`` (to tell whether a refused URL was
fetched at all)."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from protocol.addresses import free_port


class ImageHost:
    def __init__(self, files: dict[str, bytes], slow_s: float = 5.0):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.files = files
        self.slow_s = slow_s
        self.hits: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "image host did not start"

    async def _file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[name], content_type="image/png")

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.slow_s)
        return web.Response(body=b"late", content_type="image/png")

    async def _redirect(self, request: web.Request) -> web.Response:
        # By default to a host name that is not in --allowed-media-domains (same machine).
        target = request.query.get("to", f"http://localhost:{self.port}/img/a.png")
        raise web.HTTPFound(target)

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        # No Content-Length: the fetcher must cap the body while it streams.
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        chunk = b"\x89PNG\r\n\x1a\n" + b"\0" * (1 << 20)
        try:
            for _ in range(64):
                await resp.write(chunk)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    async def _html(self, request: web.Request) -> web.Response:
        return web.Response(text="<html><body>not an image</body></html>",
                            content_type="text/html")

    @web.middleware
    async def _record(self, request: web.Request, handler):
        self.hits.append(request.path_qs)
        return await handler(request)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/img/{name}", self._file)
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_get("/endless", self._endless)
        app.router.add_get("/page.html", self._html)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop)
        fut.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
