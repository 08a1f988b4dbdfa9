"""A local HTTP server standing in for an image host (the one fake: it is outside our system)."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from protocol.addresses import free_port


class ImageHost:
    def __init__(self, files: dict[str, bytes]):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.files = files
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    async def _file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[name], content_type="image/png")

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(body=b"late", content_type="image/png")

    async def _redirect(self, request: web.Request) -> web.Response:
        # To a host name that is not in --allowed-media-domains (same machine, other name).
        target = request.query.get("to", f"http://localhost:{self.port}/img/a.png")
        raise web.HTTPFound(target)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/img/{name}", self._file)
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/redirect", self._redirect)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop)
        fut.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
