"""The OpenAI-compatible HTTP server (aiohttp on uvloop).

Routes: /v1/chat/completions and /v1/completions (openai_serving.py), /v1/models, /health,
/version, /tokenize, /detokenize, /metrics. Errors are values at the edges: RequestError -> 4xx
naming the field, EngineUnavailable -> 503, anything else -> logged with the request id, 500.
Slow clients: a connection whose request headers don't arrive in time is closed (the watchdog
below), a body that doesn't is a 408 (openai_serving.read_json).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from importlib import metadata
from typing import Any

from aiohttp import web

from frontend.chat import ChatRenderer, load_chat_template
from frontend.config import FrontendConfig
from frontend.engine_client import EngineClient
from frontend.errors import EngineUnavailable, RequestError, server_error_json
from frontend.media.encoder_pool import pool_for
from frontend.media.inputs import MediaInputs
from frontend.metrics import CONTENT_TYPE, FrontendMetrics
from frontend.models import load_placeholders, placeholder_texts
from frontend.openai.protocol import DetokenizeRequest, TokenizeRequest
from frontend.openai.responses import error_json
from frontend.openai.serving import REQUEST_ID, OpenAIServing, ThreadTokenizer, TokenizerThreads
from frontend.tokenizer import load_tokenizer
from protocol.checkpoint import max_positions

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", FrontendConfig)
SERVING = web.AppKey("serving", OpenAIServing)
METRICS = web.AppKey("metrics", FrontendMetrics)


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response(error_json(status, message, kind), status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as e:
        log.info("%s: %d %s", request.get(REQUEST_ID, request.path), e.status, e.message)
        resp = web.json_response(e.to_json(), status=e.status)
        if e.status == 408:  # the rest of that body is not worth waiting for
            resp.force_close()
        return resp
    except EngineUnavailable as e:
        return _error(503, str(e) or "the engine is not available", "service_unavailable")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        # 404 route, 405 method, 413 body too large: the same JSON error shape as the rest.
        return _error(e.status, e.reason or "error", "invalid_request_error")
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        rid = request.get(REQUEST_ID)
        log.exception("%s: unhandled error on %s", rid or "-", request.path)
        return web.json_response(server_error_json(rid), status=500)


# -- small routes ---------------------------------------------------------------------------------

async def models(request: web.Request) -> web.Response:
    config, serving = request.app[CONFIG], request.app[SERVING]
    ready = serving.client.ready
    data = [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "mmserve",
             "root": config.model, "parent": None,
             "max_model_len": ready.max_model_len if ready else None}
            for name in config.served_model_name]  # type: ignore[union-attr]
    return web.json_response({"object": "list", "data": data})


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# Why the engine cannot serve, per state (for the operator reading /health).
_ENGINE_DOWN = {
    "starting": "the engine has not answered yet",
    "dead": "the engine stopped sending heartbeats",
    "group_down": "the decoder's tensor-parallel group is down (a worker died); the engine is "
                  "starting a new one",
}


async def health(request: web.Request) -> web.Response:
    """200 while every role serves: the engine "ready" or "busy" (beating through a long step),
    and (if configured) a live encoder; 503 while one is "starting", "dead" or (the engine's TP
    group) "group_down". The body says which: {"status", "engine": {"state", "reason",
    "step_running_s", "silent_s", "executor_restarts"}, "encoders"}."""
    serving = request.app[SERVING]
    engine = serving.client.health()
    body: dict[str, Any] = {"status": engine.state, "engine": {
        "state": engine.state, "reason": _ENGINE_DOWN.get(engine.state),
        "step_running_s": _seconds(engine.step_running_s), "silent_s": _seconds(engine.silent_s),
        "executor_restarts": serving.client.stats.executor_restarts}, "encoders": None}
    pool = serving.media.pool
    if pool is not None:
        body["encoders"] = {"state": pool.state, "live": len(pool.live()),
                            "total": len(pool.encoders)}
        if engine.ok and not pool.healthy:
            body["status"] = pool.state
    ok = body["status"] in ("ready", "busy")
    return web.json_response(body, status=200 if ok else 503)


async def version(request: web.Request) -> web.Response:
    try:
        v = metadata.version("mmserve")
    except metadata.PackageNotFoundError:
        v = "unknown"
    return web.json_response({"version": v})


async def tokenize(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    req = await serving.read(request, TokenizeRequest)
    serving.check_model(req.model)
    req.check()
    if req.prompt is not None:
        serving.check_prompt_chars(req.prompt)
    serving.renderer.check_request_template(req.chat_template)
    tokenizer = serving.prompt_tokenizer  # the worker thread's own copy

    def run() -> list[int]:
        if req.messages is not None:
            rendered = serving.renderer.render(
                req.messages, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                chat_template_kwargs=req.chat_template_kwargs, chat_template=req.chat_template,
            )
            if not req.add_special_tokens:  # the template wrote them; add more only on request
                return rendered.prompt_token_ids
            return list(tokenizer(rendered.prompt)["input_ids"])
        add = True if req.add_special_tokens is None else req.add_special_tokens
        return list(tokenizer(req.prompt, add_special_tokens=add)["input_ids"])

    tokens = await serving.run_cpu(run, request_template=req.chat_template is not None)
    ready = serving.client.ready
    body: dict[str, Any] = {"count": len(tokens),
                            "max_model_len": ready.max_model_len if ready else None,
                            "tokens": tokens}
    if req.return_token_strs:
        body["token_strs"] = serving.tokenizer.convert_ids_to_tokens(tokens)
    return web.json_response(body)


async def detokenize(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    req = await serving.read(request, DetokenizeRequest)
    serving.check_model(req.model)
    ready = serving.client.ready
    vocab = ready.vocab_size if ready else len(serving.tokenizer)
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"token id {bad[0]} is out of vocabulary (must be in [0, {vocab}))",
                           "tokens")
    text = await serving.run_cpu(serving.prompt_tokenizer.decode, req.tokens)
    return web.json_response({"prompt": text})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text (frontend/metrics.py: what this frontend measured and what the roles
    reported)."""
    return web.Response(body=request.app[METRICS].exposition(),
                        headers={"Content-Type": CONTENT_TYPE, "X-Content-Type-Options": "nosniff"})


# -- app --------------------------------------------------------------------------------------------

def build_app(config: FrontendConfig) -> web.Application:
    """The app; the engine client starts with the app (it needs the running loop)."""
    if config.engine_addr is None:
        raise ValueError("engine_addr is required to serve HTTP")
    tokenizer = load_tokenizer(config.tokenizer_path)
    threads = TokenizerThreads(tokenizer, config.tokenizer_workers)
    renderer = ChatRenderer(
        ThreadTokenizer(threads), load_chat_template(config.chat_template),
        content_format=config.chat_template_content_format,
        media_placeholders=placeholder_texts(load_placeholders(config.model), tokenizer),
        trust_request_template=config.trust_request_chat_template)
    app = web.Application(client_max_size=config.max_body_bytes,
                          middlewares=[watchdog_middleware, error_middleware])
    app[CONFIG] = config

    async def lifecycle(app: web.Application):
        client = EngineClient(config.engine_addr, reply_addr=config.reply_addr)  # type: ignore[arg-type]
        pool = pool_for(config, client.ctx, client.reply_to, client.frontend_id)
        if pool is not None:
            client.other_messages = pool.on_message
            await pool.start()
        await client.start()
        media = MediaInputs(config, pool)
        serving = OpenAIServing(config, tokenizer, client, renderer, media, threads)
        app[SERVING] = serving
        # After the first beats is fine: the roles report running totals.
        app[METRICS] = FrontendMetrics(config.model_name, max_positions(config.model), client,
                                       pool, serving.counters)
        yield
        serving.close()
        await media.close()
        if pool is not None:
            pool.close()
        await client.close()

    app.cleanup_ctx.append(lifecycle)

    async def chat(request: web.Request) -> web.StreamResponse:
        return await request.app[SERVING].chat(request)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await request.app[SERVING].completions(request)

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/metrics", metrics)
    return app


# -- slow clients -----------------------------------------------------------------------------------

class ConnectionWatchdog(asyncio.Protocol):
    """aiohttp's protocol for one connection plus the header timeout aiohttp lacks: the connection
    closes when no request has begun `timeout` s after it opened or after its previous request
    ended. That cuts off clients that trickle headers (slowloris) and idle keep-alives alike;
    a begun request's body is bounded by its handler (read_json's 408)."""

    def __init__(self, inner: asyncio.Protocol, timeout: float):
        self.inner = inner
        self.timeout = timeout
        self.transport: asyncio.BaseTransport | None = None
        self.active = 0  # requests whose handler is running (pipelining may queue more)
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.inner.connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def request_began(self) -> None:
        self.active += 1
        self._disarm()

    def request_ended(self) -> None:
        self.active -= 1
        if not self.active:
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(self.timeout, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if not self.active and self.transport is not None:
            self.transport.close()


@web.middleware
async def watchdog_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Tells the connection's watchdog that a request's headers arrived and when it is done."""
    transport = request.transport
    watchdog = transport.get_protocol() if transport is not None else None
    if not isinstance(watchdog, ConnectionWatchdog):
        return await handler(request)
    watchdog.request_began()
    try:
        return await handler(request)
    finally:
        watchdog.request_ended()


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite with a ConnectionWatchdog around each connection's protocol."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, header_timeout: float,
                 reuse_port: bool = False):
        super().__init__(runner)
        self._host, self._port, self._header_timeout = host, port, header_timeout
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        timeout = self._header_timeout
        self._server = await asyncio.get_running_loop().create_server(
            lambda: ConnectionWatchdog(server(), timeout), self._host, self._port,
            reuse_address=True, reuse_port=self._reuse_port)


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving ``app``; returns the runner (``await runner.cleanup()`` stops it).
    handler_cancellation: a client that hangs up cancels its handler, which aborts its
    engine requests even before the next streamed write would notice."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    config = app[CONFIG]
    await GuardedSite(runner, host, port, config.http_header_timeout_s, config.reuse_port).start()
    return runner


def run_frontend(config: FrontendConfig) -> None:
    """Serve until SIGINT/SIGTERM (blocking). Prints nothing: the CLI announces the URL."""
    import uvloop

    async def serve() -> None:
        runner = await start_site(build_app(config), config.host, config.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(serve())
    finally:
        loop.close()
