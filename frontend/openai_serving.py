"""The generating endpoints: /v1/chat/completions and /v1/completions.

A request becomes one engine request per choice (n x prompts); their streams run concurrently and
merge into one. Leaving early (client gone, error) cancels every choice, and each closed engine
stream sends an Abort, so the engine frees the KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any

from aiohttp import web

from frontend import openai_format as fmt
from frontend.chat import ChatRenderer
from frontend.config import FrontendConfig
from frontend.detokenizer import TokenText
from frontend.engine_client import EngineClient
from frontend.errors import EngineUnavailable, RequestError, server_error_json
from frontend.mm_inputs import MediaInputs
from frontend.openai_protocol import ChatCompletionRequest, CompletionRequest, decode_body
from frontend.outputs import SequenceDelta, SequenceState
from frontend.processor import InputProcessor
from protocol.messages import GenerateRequest

log = logging.getLogger(__name__)

Choice = tuple[GenerateRequest, SequenceState]
# Where handlers leave the request id for the error middleware's log line.
REQUEST_ID: Any = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "request_id"


class OpenAIServing:
    def __init__(self, config: FrontendConfig, tokenizer: Any, client: EngineClient,
                 renderer: ChatRenderer, media: MediaInputs):
        self.config = config
        self.media = media
        self.tokenizer = tokenizer
        self.client = client
        self.renderer = renderer
        self.token_text = TokenText(tokenizer)
        # One thread: HF tokenizers are not safe to share across threads, and a long prompt must
        # not stall the event loop that streams everyone else's tokens.
        self.cpu = ThreadPoolExecutor(1, thread_name_prefix="mmserve-tokenize")
        self._processor: InputProcessor | None = None
        self.counters = {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0}

    def close(self) -> None:
        self.cpu.shutdown(wait=False, cancel_futures=True)

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
            self._processor = InputProcessor(self.tokenizer, ready.max_model_len,
                                             ready.vocab_size, model_path=self.config.model)
        return self._processor

    async def run_cpu(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.cpu, lambda: fn(*args, **kwargs))

    async def _merge(self, choices: list[Choice]) -> AsyncIterator[tuple[SequenceState,
                                                                          SequenceDelta]]:
        """Every choice's deltas, in arrival order; raises the first choice's error."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(req: GenerateRequest, state: SequenceState) -> None:
            try:
                async with aclosing(self.client.generate(req)) as stream:
                    async for out in stream:
                        queue.put_nowait((state, state.update(out)))
                        if state.finished:  # includes a stop string: closing aborts the rest
                            break
            except Exception as e:
                queue.put_nowait((state, e))
            finally:
                queue.put_nowait((state, None))

        tasks = [asyncio.create_task(pump(r, s), name=r.request_id) for r, s in choices]
        try:
            remaining = len(tasks)
            while remaining:
                state, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
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
        req = decode_body(await request.read(), ChatCompletionRequest)
        model = self.check_model(req.model)
        params = req.to_sampling_params((self.config.max_n, self.config.max_logprobs))
        processor = await self.processor()
        messages, items = await self.media.parse(req.messages)

        def prepare() -> list[GenerateRequest]:
            rendered = self.renderer.render(
                messages,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                chat_template_kwargs=req.chat_template_kwargs,
                chat_template=req.chat_template,
            )
            ids, mm_items = self.media.expand(rendered.prompt_token_ids, items)
            return processor.process(rid, ids, params, self.client.reply_to, param="messages",
                                     mm_items=mm_items)

        reqs = await self.run_cpu(prepare)
        if items:
            # Before any engine request: a bad image is still a 4xx, not a failed stream. The
            # engine would let text before the first image prefill meanwhile; see the note in
            # README's walk-through.
            assert self.client.ready is not None
            await self.media.dispatch(rid, items, self.client.ready.embed_addr,
                                      self.client.reply_to)
        prompt_ids = reqs[0].prompt_token_ids
        choices = [(r, SequenceState(self.tokenizer, params, prompt_ids, i, self.token_text))
                   for i, r in enumerate(reqs)]
        log.debug("%s: %d choice(s), %d prompt tokens", rid, len(reqs), len(prompt_ids))
        shape = fmt.ChatShape(rid, model, req, len(prompt_ids), self.token_text,
                              self.config.response_role, params.logprobs)
        return await self._respond(request, choices, shape)

    # -- completions ------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        rid = request[REQUEST_ID] = f"cmpl-{uuid.uuid4().hex}"
        req = decode_body(await request.read(), CompletionRequest)
        model = self.check_model(req.model)
        params = req.to_sampling_params((self.config.max_n, self.config.max_logprobs))
        prompts = req.prompts()
        processor = await self.processor()

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
                       shape: fmt.ChatShape | fmt.CompletionShape) -> web.StreamResponse:
        if shape.req.stream:
            return await self._stream(request, choices, shape)
        async with aclosing(self._merge(choices)) as merged:
            async for _ in merged:
                pass
        states = [s for _, s in choices]
        self._account(shape.num_prompt, states)
        return web.json_response(shape.final(states))

    async def _stream(self, request: web.Request, choices: list[Choice],
                      shape: fmt.ChatShape | fmt.CompletionShape) -> web.StreamResponse:
        """SSE. Errors after the 200 went out become an error event, then [DONE]."""
        rid = shape.rid
        resp = web.StreamResponse(headers=fmt.SSE_HEADERS)
        await resp.prepare(request)
        states = [s for _, s in choices]
        try:
            for state in states:
                head = shape.head_chunk(state, states)
                if head is not None:
                    await resp.write(fmt.sse(head))
            async with aclosing(self._merge(choices)) as merged:
                async for state, delta in merged:
                    chunk = shape.chunk(state, delta, states)
                    if chunk is not None:
                        await resp.write(fmt.sse(chunk))
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

