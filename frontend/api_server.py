"""The OpenAI-compatible HTTP server (aiohttp on uvloop).

Routes: /v1/chat/completions and /v1/completions (openai_serving.py), /v1/models, /health,
/version, /tokenize, /detokenize, /metrics. Errors are values at the edges: RequestError -> 4xx
naming the field, EngineUnavailable -> 503, anything else -> logged with the request id, 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from importlib import metadata
from typing import Any

from aiohttp import web

from frontend.chat import ChatRenderer, load_chat_template
from frontend.config import FrontendConfig
from frontend.encoder_pool import EncoderPool
from frontend.engine_client import EngineClient
from frontend.errors import EngineUnavailable, RequestError, server_error_json
from frontend.mm_inputs import MediaInputs
from frontend.models import load_placeholders, placeholder_texts
from frontend.openai_format import error_json
from frontend.openai_protocol import DetokenizeRequest, TokenizeRequest, decode_body
from frontend.openai_serving import REQUEST_ID, OpenAIServing
from frontend.tokenizer import load_tokenizer
from protocol.messages import EncoderStats, EngineStats

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", FrontendConfig)
SERVING = web.AppKey("serving", OpenAIServing)

# /metrics: every EngineStats field is exported as mmserve_<field>; these are monotonic.
_COUNTERS = {"prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "num_steps"}


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response(error_json(status, message, kind), status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as e:
        log.info("%s: %d %s", request.get(REQUEST_ID, request.path), e.status, e.message)
        return web.json_response(e.to_json(), status=e.status)
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


async def health(request: web.Request) -> web.Response:
    """200 only when every role is ready: the engine, and (if configured) a live encoder."""
    serving = request.app[SERVING]
    pool = serving.media.pool
    healthy = serving.client.healthy and (pool is None or pool.healthy)
    return web.Response(status=200 if healthy else 503)


async def version(request: web.Request) -> web.Response:
    try:
        v = metadata.version("mmserve")
    except metadata.PackageNotFoundError:
        v = "unknown"
    return web.json_response({"version": v})


async def tokenize(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    req = decode_body(await request.read(), TokenizeRequest)
    serving.check_model(req.model)
    req.check()

    def run() -> list[int]:
        if req.messages is not None:
            rendered = serving.renderer.render(
                req.messages, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                chat_template_kwargs=req.chat_template_kwargs, chat_template=req.chat_template,
            )
            if not req.add_special_tokens:  # the template wrote them; add more only on request
                return rendered.prompt_token_ids
            return list(serving.tokenizer(rendered.prompt)["input_ids"])
        add = True if req.add_special_tokens is None else req.add_special_tokens
        return list(serving.tokenizer(req.prompt, add_special_tokens=add)["input_ids"])

    tokens = await serving.run_cpu(run)
    ready = serving.client.ready
    body: dict[str, Any] = {"count": len(tokens),
                            "max_model_len": ready.max_model_len if ready else None,
                            "tokens": tokens}
    if req.return_token_strs:
        body["token_strs"] = serving.tokenizer.convert_ids_to_tokens(tokens)
    return web.json_response(body)


async def detokenize(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    req = decode_body(await request.read(), DetokenizeRequest)
    serving.check_model(req.model)
    ready = serving.client.ready
    vocab = ready.vocab_size if ready else len(serving.tokenizer)
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"token id {bad[0]} is out of vocabulary (must be in [0, {vocab}))",
                           "tokens")
    text = await serving.run_cpu(serving.tokenizer.decode, req.tokens)
    return web.json_response({"prompt": text})


async def metrics(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    client = serving.client
    lines = []

    def add(name: str, kind: str, value: float, help_text: str) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"])

    add("mmserve_engine_healthy", "gauge", int(client.healthy), "1 while engine heartbeats arrive")
    for field in EngineStats.__struct_fields__:
        add(f"mmserve_{field}", "counter" if field in _COUNTERS else "gauge",
            getattr(client.stats, field), f"engine {field.replace('_', ' ')}")
    pool = serving.media.pool
    if pool is not None:
        add("mmserve_encoders_live", "gauge", len(pool.live()), "encoders sending heartbeats")
        for field in EncoderStats.__struct_fields__:
            name = f"mmserve_encoder_{field}"
            lines.extend([f"# HELP {name} encoder {field.replace('_', ' ')}",
                          f"# TYPE {name} {'gauge' if field.startswith('store') else 'counter'}"])
            for i, enc in enumerate(pool.encoders.values()):
                lines.append(f'{name}{{encoder="{i}"}} {getattr(enc.stats, field)}')
    for name, value in serving.counters.items():
        add(f"mmserve_frontend_{name}", "counter", value, f"frontend {name.replace('_', ' ')}")
    return web.Response(text="\n".join(lines) + "\n",
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


# -- app --------------------------------------------------------------------------------------------

def build_app(config: FrontendConfig) -> web.Application:
    """The app; the engine client starts with the app (it needs the running loop)."""
    if config.engine_addr is None:
        raise ValueError("engine_addr is required to serve HTTP")
    tokenizer = load_tokenizer(config.tokenizer_path)
    renderer = ChatRenderer(
        tokenizer, load_chat_template(config.chat_template),
        content_format=config.chat_template_content_format,
        media_placeholders=placeholder_texts(load_placeholders(config.model), tokenizer),
        trust_request_template=config.trust_request_chat_template)
    app = web.Application(client_max_size=config.max_body_bytes,
                          middlewares=[error_middleware])
    app[CONFIG] = config

    async def lifecycle(app: web.Application):
        client = EngineClient(config.engine_addr, reply_addr=config.reply_addr)  # type: ignore[arg-type]
        pool = None
        if config.encoder_addrs:
            pool = EncoderPool(client.ctx, config.encoder_addrs, client.reply_to,
                               client.frontend_id)
            client.other_messages = pool.on_message
            await pool.start()
        await client.start()
        media = MediaInputs(config, pool)
        serving = OpenAIServing(config, tokenizer, client, renderer, media)
        app[SERVING] = serving
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


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving ``app``; returns the runner (``await runner.cleanup()`` stops it).
    handler_cancellation: a client that hangs up cancels its handler, which aborts its
    engine requests even before the next streamed write would notice."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def run_frontend(config: FrontendConfig) -> None:
    """Serve until SIGINT/SIGTERM (blocking). Prints nothing: the CLI announces the URL."""
    import uvloop

    app = build_app(config)
    web.run_app(app, host=config.host, port=config.port, print=None, access_log=None,
                handler_cancellation=True, loop=uvloop.new_event_loop())
