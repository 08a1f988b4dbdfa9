"""The generating endpoints: /v1/chat/completions and /v1/completions.

A request becomes one engine request per choice (n x prompts); their streams run concurrently and
merge into one. Leaving early (client gone, error) cancels every choice, and each closed engine
stream sends an Abort, so the engine frees the KV blocks. A stream answers 200 only once the engine
has accepted every choice and sent its first tokens, so any refusal is still a plain 4xx.

Tokenization and template rendering run on `TokenizerThreads`, never on the event loop.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any

from aiohttp import web

from frontend.chat import ChatRenderer
from frontend.config import FrontendConfig
from frontend.detokenizer import TokenText
from frontend.engine_client import EngineClient
from frontend.errors import EngineUnavailable, RequestError, server_error_json
from frontend.media.inputs import MediaInputs
from frontend.openai import responses as fmt
from frontend.openai.protocol import ChatCompletionRequest, CompletionRequest, decode_body
from frontend.outputs import SequenceDelta, SequenceState
from frontend.processor import InputProcessor, check_prompt_chars, prompt_char_limit
from protocol import timeline
from protocol.checkpoint import max_positions
from protocol.messages import GenerateRequest

log = logging.getLogger(__name__)

Choice = tuple[GenerateRequest, SequenceState]
# Where handlers leave the request id for the error middleware's log line.
REQUEST_ID: Any = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "request_id"


# -- reading a body -------------------------------------------------------------------------------

_THREAD_DECODE_BYTES = 1 << 20


async def read_json(request: web.Request, cls: type, body_timeout: float) -> Any:
    """The decoded body of a JSON endpoint. Only application/json is accepted: a web page can make
    a browser post text/plain, form or multipart bodies to a local server (CSRF), never this."""
    if request.content_type != "application/json" or (
            request.charset is not None and request.charset.lower() not in ("utf-8", "utf8")):
        raise RequestError("the request body must be JSON, sent with "
                           "`Content-Type: application/json`", None, status=415)
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        # aiohttp would inflate a compressed body before counting it against the size cap.
        raise RequestError("compressed request bodies are not accepted (Content-Encoding)",
                           None, status=415)
    try:
        body = await asyncio.wait_for(request.read(), body_timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {body_timeout:g} s", None,
                           status=408) from None
    if len(body) > _THREAD_DECODE_BYTES:
        # Decoding and depth-checking tens of MB takes ~1 s: not on the loop that streams tokens.
        return await asyncio.to_thread(decode_body, body, cls)
    return decode_body(body, cls)


# -- tokenizer threads ------------------------------------------------------------------------------

class TokenizerThreads:
    """Where tokenization and template rendering run, off the event loop. Each thread owns a copy
    of the tokenizer: HF fast tokenizers must not be shared across threads, and they release the
    GIL while encoding, so `workers` prompts encode at once. Requests that bring their own chat
    template render on a separate pool: a sandboxed render may hold its thread for seconds."""

    def __init__(self, tokenizer: Any, workers: int, template_workers: int = 1):
        self.base = tokenizer  # the event loop's own (detokenization)
        self._local = threading.local()
        # Copied up front, while no thread uses the original.
        self._spare: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(workers + template_workers):
            self._spare.put(copy.deepcopy(tokenizer))
        self.main = ThreadPoolExecutor(workers, "mmserve-tokenize", initializer=self._adopt)
        self.templates = ThreadPoolExecutor(template_workers, "mmserve-template",
                                            initializer=self._adopt)

    def _adopt(self) -> None:
        self._local.tokenizer = self._spare.get_nowait()

    @property
    def current(self) -> Any:
        """The calling thread's tokenizer: its own copy on a pool thread, else the original."""
        return getattr(self._local, "tokenizer", self.base)

    async def run(self, fn: Callable[[], Any], request_template: bool = False) -> Any:
        pool = self.templates if request_template else self.main
        return await asyncio.get_running_loop().run_in_executor(pool, fn)

    def close(self) -> None:
        self.main.shutdown(wait=False, cancel_futures=True)
        self.templates.shutdown(wait=False, cancel_futures=True)


class ThreadTokenizer:
    """The tokenizer as ChatRenderer and InputProcessor see it: each use goes to the calling
    thread's copy (see TokenizerThreads), so one renderer and one processor serve every thread."""

    def __init__(self, threads: TokenizerThreads):
        self._threads = threads

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._threads.current(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy/pickle probes: not the tokenizer's business
            raise AttributeError(name)
        return getattr(self._threads.current, name)

    def __len__(self) -> int:
        return len(self._threads.current)


# -- serving ----------------------------------------------------------------------------------------

class OpenAIServing:
    def __init__(self, config: FrontendConfig, tokenizer: Any, client: EngineClient,
                 renderer: ChatRenderer, media: MediaInputs, threads: TokenizerThreads):
        """``renderer`` should tokenize with a ThreadTokenizer over ``threads``; its character
        cap is set here, final once the engine says its context length."""
        self.config = config
        self.media = media
        self.tokenizer = tokenizer
        self.client = client
        self.renderer = renderer
        self.token_text = TokenText(tokenizer)
        self.threads = threads
        self.prompt_tokenizer = ThreadTokenizer(threads)
        self._processor: InputProcessor | None = None
        # Request counts, and where a media request's time goes before the engine sees it:
        # fetch + probe + hash (media_seconds), waiting for the encoders (encode_wait_seconds).
        self.counters: dict[str, float] = {"requests": 0, "prompt_tokens": 0,
                                           "generation_tokens": 0, "media_seconds": 0.0,
                                           "encode_wait_seconds": 0.0}
        self._set_char_limit(max_positions(config.model))  # the engine never allows more

    def close(self) -> None:
        self.threads.close()
        self.renderer.close()

    def _set_char_limit(self, max_model_len: int) -> None:
        self.max_prompt_chars = prompt_char_limit(max_model_len, self.config.max_prompt_chars)
        self.renderer.max_prompt_chars = self.max_prompt_chars

    def check_prompt_chars(self, text: str, param: str = "prompt") -> None:
        check_prompt_chars(text, self.max_prompt_chars, param)

    # -- shared steps ---------------------------------------------------------------------------

    def check_model(self, model: str | None) -> str:
        if model is None:
            return self.config.model_name
        if model not in self.config.served_model_name:  # type: ignore[operator]
            raise RequestError(f"The model `{model}` does not exist.", "model", status=404)
        return model

    async def processor(self) -> InputProcessor:
        """Built once the engine said Ready (max_model_len and vocab size come from it).
        Fails fast while the engine is down, so a stream never starts just to fail."""
        if self._processor is not None and not self.client.healthy:
            raise EngineUnavailable("the engine is not available")
        if self._processor is None:
            ready = self.client.ready
            if ready is None and self.config.engine_ready_timeout_s > 0:
                try:
                    ready = await self.client.wait_ready(self.config.engine_ready_timeout_s)
                except TimeoutError:
                    ready = None
            if ready is None:
                raise EngineUnavailable("the engine is not ready yet")
            self._set_char_limit(ready.max_model_len)
            self._processor = InputProcessor(self.prompt_tokenizer, ready.max_model_len,
                                             ready.vocab_size, model_path=self.config.model,
                                             max_prompt_chars=self.max_prompt_chars)
        return self._processor

    async def run_cpu(self, fn: Callable[..., Any], *args: Any,
                      request_template: bool = False, **kwargs: Any) -> Any:
        """``fn`` on a tokenizer thread; ``request_template``: it renders the request's own chat
        template (the separate pool)."""
        return await self.threads.run(lambda: fn(*args, **kwargs), request_template)

    async def read(self, request: web.Request, cls: type) -> Any:
        return await read_json(request, cls, self.config.http_body_timeout_s)

    async def _merge(self, choices: list[Choice], media: asyncio.Task | None = None
                     ) -> AsyncIterator[tuple[SequenceState, SequenceDelta]]:
        """Every choice's deltas, in arrival order; raises the first choice's error, and the
        media dispatch's if it fails before any output (after one, every embedding had landed:
        a later failure, e.g. of a re-delivery, changes nothing)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def watch(task: asyncio.Task) -> None:
            try:
                await task
            except Exception as e:
                queue.put_nowait((None, e))

        async def pump(req: GenerateRequest, state: SequenceState) -> None:
            try:
                async with aclosing(self.client.generate(req)) as stream:
                    async for out in stream:
                        queue.put_nowait((state, state.update(out)))
                        if state.finished:  # includes a stop string: closing aborts the rest
                            self.client.finish_early(req.request_id, state.finish_reason or "stop")
                            break
            except Exception as e:
                queue.put_nowait((state, e))
            finally:
                queue.put_nowait((state, None))

        tasks = [asyncio.create_task(pump(r, s), name=r.request_id) for r, s in choices]
        remaining = len(tasks)  # the pumps; the watcher ends with them
        if media is not None:
            tasks.append(asyncio.create_task(watch(media)))
        yielded = False
        try:
            while remaining:
                state, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    if state is None and yielded:
                        log.info("media dispatch failed after the first output: %r", item)
                        continue
                    raise item
                else:
                    yielded = True
                    yield state, item
        finally:
            for t in tasks:
                t.cancel()
            # Wait for the aborts to go out before the handler returns.
            await asyncio.gather(*tasks, return_exceptions=True)

    def _account(self, prompt_tokens: int, states: list[SequenceState]) -> None:
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += prompt_tokens
        self.counters["generation_tokens"] += sum(len(s.token_ids) for s in states)

    # -- chat -------------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        rid = request[REQUEST_ID] = f"chatcmpl-{uuid.uuid4().hex}"
        timeline.mark("http_entered", rid)
        req = await self.read(request, ChatCompletionRequest)
        model = self.check_model(req.model)
        params = req.to_sampling_params((self.config.max_n, self.config.max_logprobs))
        self.renderer.check_request_template(req.chat_template)  # before any media is fetched
        processor = await self.processor()
        t_media = time.perf_counter()
        messages, items = await self.media.parse(req.messages, req.mm_processor_kwargs)
        if items:
            self.counters["media_seconds"] += time.perf_counter() - t_media
            timeline.mark("media_resolved", rid)

        def prepare() -> list[GenerateRequest]:
            rendered = self.renderer.render(
                messages,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                chat_template_kwargs=req.chat_template_kwargs,
                chat_template=req.chat_template,
            )
            ids, mm_items = self.media.expand(rendered.prompt_token_ids, items, self.tokenizer)
            return processor.process(rid, ids, params, self.client.reply_to, param="messages",
                                     mm_items=mm_items)

        media = None
        if items:
            # Encoding starts before the prompt is rendered (the encoder's work is the longer
            # one) and runs beside the engine request, which prefills the text before the first
            # item meanwhile and takes each embedding as it lands. No token can come before all
            # of them, so a bad item still fails the request as a plain 4xx (`_merge`).
            assert self.client.ready is not None
            sent = asyncio.Event()
            media = asyncio.create_task(self.media.dispatch(
                rid, items, self.client.ready, self.client.reply_to, sent), name=f"{rid}-media")
            t_encode = time.perf_counter()

            def encoded(_: asyncio.Task) -> None:
                self.counters["encode_wait_seconds"] += time.perf_counter() - t_encode

            media.add_done_callback(encoded)
        try:
            if media is not None:
                # The render thread would hold the GIL while the sends wait for the loop: let
                # them leave first (or the dispatch fail).
                waiter = asyncio.ensure_future(sent.wait())
                try:
                    await asyncio.wait([waiter, media], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
            reqs = await self.run_cpu(prepare, request_template=req.chat_template is not None)
            prompt_ids = reqs[0].prompt_token_ids
            choices = [(r, SequenceState(self.tokenizer, params, prompt_ids, i, self.token_text))
                       for i, r in enumerate(reqs)]
            log.debug("%s: %d choice(s), %d prompt tokens", rid, len(reqs), len(prompt_ids))
            shape = fmt.ChatShape(rid, model, req, len(prompt_ids), self.token_text,
                                  self.config.response_role, params.logprobs)
            return await self._respond(request, choices, shape, media)
        finally:
            if media is not None:
                media.cancel()  # a no-op when it is done (the usual case)
                await asyncio.gather(media, return_exceptions=True)
                self.media.settle(rid)

    # -- completions ------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        rid = request[REQUEST_ID] = f"cmpl-{uuid.uuid4().hex}"
        timeline.mark("http_entered", rid)
        req = await self.read(request, CompletionRequest)
        model = self.check_model(req.model)
        params = req.to_sampling_params((self.config.max_n, self.config.max_logprobs))
        prompts = req.prompts()
        processor = await self.processor()
        for prompt in prompts:  # before any of them is tokenized
            if isinstance(prompt, str):
                self.check_prompt_chars(prompt)

        def prepare() -> list[list[GenerateRequest]]:
            return [processor.process(f"{rid}-{p}" if len(prompts) > 1 else rid, prompt, params,
                                      self.client.reply_to, add_special_tokens=req.add_special_tokens)
                    for p, prompt in enumerate(prompts)]

        batches = await self.run_cpu(prepare)
        choices: list[Choice] = []
        echo: list[str] = []
        for prompt, reqs in zip(prompts, batches):
            ids = reqs[0].prompt_token_ids
            for r in reqs:
                choices.append((r, SequenceState(self.tokenizer, params, ids, len(choices),
                                                 self.token_text)))
                if req.echo:
                    echo.append(prompt if isinstance(prompt, str) else self.tokenizer.decode(ids))
        num_prompt = sum(len(reqs[0].prompt_token_ids) for reqs in batches)
        shape = fmt.CompletionShape(rid, model, req, num_prompt, self.token_text,
                                    params.logprobs, echo)
        return await self._respond(request, choices, shape)

    # -- answering ----------------------------------------------------------------------------------

    async def _respond(self, request: web.Request, choices: list[Choice],
                       shape: fmt.ChatShape | fmt.CompletionShape,
                       media: asyncio.Task | None = None) -> web.StreamResponse:
        if shape.req.stream:
            return await self._stream(request, choices, shape, media)
        async with aclosing(self._merge(choices, media)) as merged:
            async for _ in merged:
                pass
        states = [s for _, s in choices]
        self._account(shape.num_prompt, states)
        return web.json_response(shape.final(states))

    async def _stream(self, request: web.Request, choices: list[Choice],
                      shape: fmt.ChatShape | fmt.CompletionShape,
                      media: asyncio.Task | None = None) -> web.StreamResponse:
        """SSE. Nothing is sent before the engine's first output: a request it refuses (or an
        engine that dies first) is still a plain 4xx/503. Errors after the 200 went out become an
        error event, then [DONE]."""
        rid = shape.rid
        states = [s for _, s in choices]
        async with aclosing(self._merge(choices, media)) as merged:
            first = await anext(merged, None)  # raises what the middleware maps to 4xx/503
            resp = web.StreamResponse(headers=fmt.SSE_HEADERS)
            await resp.prepare(request)
            try:
                for state in states:
                    head = shape.head_chunk(state, states)
                    if head is not None:
                        await resp.write(fmt.sse(head))
                if first is not None:
                    await self._write_delta(resp, shape, states, *first)
                    timeline.mark("first_chunk", rid)  # the role chunk and first token are out
                    async for state, delta in merged:
                        await self._write_delta(resp, shape, states, state, delta)
                if shape.req.include_usage:
                    await resp.write(fmt.sse(shape.usage_chunk(states)))
            except ConnectionError:
                log.info("%s: client disconnected; aborted", rid)
                return resp
            except RequestError as e:
                await resp.write(fmt.sse(e.to_json()))
            except EngineUnavailable as e:
                await resp.write(fmt.sse(fmt.error_json(503, str(e), "service_unavailable")))
            except Exception:
                log.exception("%s: failed while streaming", rid)
                await resp.write(fmt.sse(server_error_json(rid)))
        self._account(shape.num_prompt, states)
        await resp.write(fmt.SSE_DONE)
        await resp.write_eof()
        return resp

    @staticmethod
    async def _write_delta(resp: web.StreamResponse, shape: fmt.ChatShape | fmt.CompletionShape,
                           states: list[SequenceState], state: SequenceState,
                           delta: SequenceDelta) -> None:
        chunk = shape.chunk(state, delta, states)
        if chunk is not None:
            await resp.write(fmt.sse(chunk))
