"""The offline Python API: `LLM(model).generate(prompts, params)` and `LLM.chat(messages)`.

It runs the same pipeline as the server (InputProcessor -> engine core -> SequenceState), but
drives the engine core in-process: with nobody else to serve, sockets would only add latency.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from frontend.chat import ChatRenderer, load_chat_template
from frontend.errors import RequestError
from frontend.media.parse import expand_items
from frontend.outputs import RequestOutput, SequenceState
from frontend.sampling_params import SamplingParams
from frontend.tokenizer import load_tokenizer
from protocol.models import register_config

PromptType = str | list[int] | dict[str, Any]


class LLM:
    """vLLM's offline entry point. Keywords keep vLLM's names; those without an effect here are
    accepted at their harmless values and refused (ValueError naming the keyword) otherwise.
    Every LLMWorkerConfig field is a keyword too (max_model_len, tensor_parallel_size,
    gpu_memory_utilization, enforce_eager, ...; see llm_worker/config.py), passed through as is,
    so a knob added there needs no edit here."""

    def __init__(
        self,
        model: str | None = None,
        *,
        tokenizer: str | None = None,
        trust_remote_code: bool = False,
        runner: str = "auto",
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        limit_mm_per_prompt: dict[str, int] | None = None,
        media_io_kwargs: dict[str, dict] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        allowed_local_media_path: str | None = None,
        allowed_media_domains: Sequence[str] = (),
        # vLLM keywords that change nothing here at these values
        revision: str | None = None,
        tokenizer_revision: str | None = None,
        quantization: str | None = None,
        kv_cache_dtype: str = "auto",
        swap_space: float = 4,
        disable_log_stats: bool = True,
        max_logprobs: int = 20,
        served_model_name: str | list[str] | None = None,
        **engine_kwargs: Any,
    ):
        from frontend.config import FrontendConfig
        from frontend.models import placeholder_texts
        from frontend.offline.media import OfflineMedia
        from frontend.processor import InputProcessor
        from llm_worker.engine import EngineCore

        check_vllm_options(runner=runner, revision=revision,
                           tokenizer_revision=tokenizer_revision, quantization=quantization,
                           kv_cache_dtype=kv_cache_dtype, trust_remote_code=trust_remote_code)
        if swap_space < 0:
            raise ValueError(f"swap_space must be >= 0, got {swap_space}")
        if model is None:
            from frontend.random_model import default_model

            model = str(default_model()[0])
        self.model = model
        self.max_logprobs = max_logprobs
        register_config(model)  # e.g. Ultravox: a config transformers does not ship
        self.engine = EngineCore(engine_config(model, engine_kwargs))
        device, dtype = self.engine.config.device, self.engine.config.dtype
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.processor = InputProcessor(self.tokenizer, self.engine.max_model_len,
                                        self.engine.vocab_size, model_path=model)
        media = {"limit_mm_per_prompt": limit_mm_per_prompt, "media_io_kwargs": media_io_kwargs,
                 "mm_processor_kwargs": mm_processor_kwargs,
                 "allowed_local_media_path": allowed_local_media_path}
        config = FrontendConfig(model=model, allowed_media_domains=tuple(allowed_media_domains),
                                chat_template_content_format=chat_template_content_format,
                                **{k: v for k, v in media.items() if v is not None})
        self.media = OfflineMedia(config, device, dtype)
        self._template = load_chat_template(chat_template)
        self._placeholder_texts = placeholder_texts(self.media.placeholders, self.tokenizer)
        self._renderers: dict[str, ChatRenderer] = {}
        self.chat_renderer = self.renderer(chat_template_content_format)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def renderer(self, content_format: str) -> ChatRenderer:
        """The chat renderer for one content format (vLLM lets chat() pick it per call)."""
        if content_format not in self._renderers:
            # A template passed to chat() is the caller's own code: it runs in-process.
            self._renderers[content_format] = ChatRenderer(
                self.tokenizer, self._template, content_format=content_format,
                media_placeholders=self._placeholder_texts, trust_request_template=True,
                sandbox_request_templates=False)
        return self._renderers[content_format]

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: Any = None,
    ) -> list[RequestOutput]:
        """Outputs in the order of ``prompts``. A prompt is a string, a list of token ids, or a
        dict with "prompt" or "prompt_token_ids", and optionally "multi_modal_data"
        ({"image": an image or a list of them: PIL, numpy [H, W(, C)] uint8 or float in [0, 1],
        tensor [C, H, W] in a list, [N, C, H, W] images; or embeddings: tensor [feature, hidden]
        or [num_items, feature, hidden]; None reuses the item of its uuid}) and
        "multi_modal_uuids" ({"image": [str | None, ...]}; a None image reuses its uuid's item)
        and "mm_processor_kwargs" (this prompt's processor settings, e.g. {"max_pixels": ...},
        over the LLM's own).
        ``use_tqdm`` is accepted for vLLM's sake (no progress bar is drawn)."""
        _no_lora(lora_request)
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        items = []
        for i, p in enumerate(prompts):
            media: list = []
            if isinstance(p, dict):
                unknown = set(p) - {"prompt", "prompt_token_ids", "multi_modal_data",
                                    "multi_modal_uuids", "mm_processor_kwargs"}
                if unknown:
                    raise RequestError(f"unknown prompt keys {sorted(unknown)}", f"prompts[{i}]")
                # `is not None`: a tensor or array has no truth value, and uuids (or processor
                # kwargs) without data must still be checked.
                data, uuids = p.get("multi_modal_data"), p.get("multi_modal_uuids")
                kwargs = p.get("mm_processor_kwargs")
                if data is not None or uuids is not None or kwargs is not None:
                    media = self.media.from_multi_modal_data(
                        {} if data is None and uuids is None else data, uuids, f"prompts[{i}]",
                        kwargs)
                if "prompt_token_ids" in p:
                    items.append((None, list(p["prompt_token_ids"]), media))
                elif "prompt" in p:
                    items.append((p["prompt"], p["prompt"], media))
                else:
                    raise RequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'",
                                       f"prompts[{i}]")
            else:
                items.append((p if isinstance(p, str) else None, p, media))
        return self._run(items, sampling_params, add_special_tokens=True)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: Any = None,
        *,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        chat_template_content_format: str | None = None,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or a batch of them; ``mm_processor_kwargs``
        (processor settings of their media, over the LLM's own) apply to every one."""
        _no_lora(lora_request)
        renderer = (self.chat_renderer if chat_template_content_format is None
                    else self.renderer(chat_template_content_format))
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        items = []
        for conv in convs:
            conv, media = self.media.from_chat(conv, mm_processor_kwargs)
            r = renderer.render(
                conv, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template_kwargs=chat_template_kwargs, chat_template=chat_template,
            )
            items.append((r.prompt, r.prompt_token_ids, media))
        return self._run(items, sampling_params, add_special_tokens=False)

    def _run(self, items, sampling_params, add_special_tokens: bool) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise RequestError(f"got {len(params)} sampling params for {len(items)} prompts",
                                   "sampling_params")
        results: list[RequestOutput] = []
        states: dict[str, SequenceState] = {}
        try:
            for (text, prompt, media), sp in zip(items, params):
                rid = str(next(self._ids))
                mm_items = []
                if media:
                    # Given ids are checked once expanded: a placeholder id may lie past the
                    # vocabulary (Ultravox's audio_token_index), valid only at its items.
                    ids = (self.processor.tokenize(prompt, add_special_tokens)
                           if isinstance(prompt, str) else list(prompt))
                    prompt, mm_items = expand_items(self.media.placeholders, ids, media,
                                                    "prompt", self.tokenizer)
                    self.media.provide(self.engine, media)
                reqs = self.processor.process(rid, prompt, sp, mm_items=mm_items,
                                              add_special_tokens=add_special_tokens)
                ids = reqs[0].prompt_token_ids
                out = RequestOutput(rid, text, ids, [], finished=False)
                seqs = [SequenceState(self.tokenizer, sp, ids, index=i) for i in range(len(reqs))]
                out.extra["seqs"] = seqs
                results.append(out)
                for req, seq in zip(reqs, seqs):
                    err = self.engine.add_request(req)
                    if err is not None:
                        raise RequestError(err, "prompt")
                    states[req.request_id] = seq
            self._drive(states)
        except BaseException:
            self.engine.abort(list(states))  # leave the engine clean for the next call
            raise
        for out in results:
            seqs = out.extra.pop("seqs")
            out.outputs = [s.output() for s in seqs]
            out.num_cached_tokens = seqs[0].num_cached_tokens
            out.finished = True
        return results

    def _drive(self, states: dict[str, SequenceState]) -> None:
        live = dict(states)
        while live:
            for out in self.engine.step():
                seq = live.get(out.request_id)
                if seq is None:
                    continue
                seq.update(out)
                if seq.finished:
                    del live[out.request_id]
                    if out.finish_reason is None:  # a stop string ended it: free the engine side
                        self.engine.abort([out.request_id])
        # With asynchronous scheduling the step after the last one that mattered is still in
        # flight (and the workers have yet to hear of the finished requests): settle both, so
        # the engine is idle when generate returns.
        while self.engine.in_flight:
            self.engine.step()


def _no_lora(lora_request: Any) -> None:
    if lora_request is not None:
        raise ValueError("lora_request is not supported (no LoRA adapters in mmserve yet)")


def engine_config(model: str, kwargs: dict[str, Any]):
    """LLMWorkerConfig from LLM()'s engine keywords; one that is no field is a TypeError naming
    it, as Python's own for an unknown keyword."""
    import dataclasses

    from llm_worker.config import LLMWorkerConfig

    fields = {f.name for f in dataclasses.fields(LLMWorkerConfig)} - {"model"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"LLM() got an unexpected keyword argument {unknown[0]!r} (engine "
                        f"keywords: {', '.join(sorted(fields))})")
    return LLMWorkerConfig(model=model, **kwargs)


def check_vllm_options(*, runner: str = "auto", revision: str | None = None,
                       tokenizer_revision: str | None = None, quantization: str | None = None,
                       kv_cache_dtype: str = "auto", trust_remote_code: bool = False) -> None:
    """vLLM options mmserve takes by name: a value it can't honour is a ValueError that says
    why, instead of a TypeError or a silent difference. Shared by LLM() and the CLI."""
    if runner not in ("auto", "generate"):
        raise ValueError(f"runner {runner!r} is not supported: mmserve runs generative models "
                         "only (runner 'auto' or 'generate')")
    if revision is not None or tokenizer_revision is not None:
        raise ValueError("revision / tokenizer_revision: mmserve loads local checkpoint folders "
                         "only (no model hub); check out the revision you want into a folder")
    if quantization is not None:
        raise ValueError(f"quantization {quantization!r} is not supported (unquantized "
                         "checkpoints only)")
    if kv_cache_dtype != "auto":
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not supported (only 'auto': the "
                         "KV cache uses the model dtype)")
    if not isinstance(trust_remote_code, bool):
        raise ValueError("trust_remote_code must be true or false")
    # trust_remote_code=True is accepted and changes nothing: every architecture mmserve serves
    # is built in, and a checkpoint's own Python code is never imported or run.
