"""Prompt + SamplingParams -> engine GenerateRequests, after every check the engine makes at
add-request time (non-empty prompt, ids in the vocabulary, prompt + max_tokens within the context
length) and the ones its sampler relies on (logprobs within the vocabulary), so a request the
engine would refuse is a 400 here, before any stream starts. Text longer than the character cap
is refused before it is tokenized."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from frontend.errors import RequestError
from frontend.sampling_params import SamplingParams
from protocol.messages import GenerateRequest, MMItem


def load_eos_token_ids(model_path: str | Path | None, tokenizer: Any) -> list[int]:
    """Every id that ends generation: generation_config.json may list several (e.g. Llama 3's
    <|eot_id|> next to <|end_of_text|>); the tokenizer's eos is added if missing."""
    ids: list[int] = []
    if model_path is not None:
        for name in ("generation_config.json", "config.json"):
            path = Path(model_path) / name
            if not path.is_file():
                continue
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                ids.extend(eos if isinstance(eos, list) else [eos])
                break
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.append(tok_eos)
    return list(dict.fromkeys(int(i) for i in ids))  # dedupe, keep order


def prompt_char_limit(max_model_len: int, configured: int | None = None) -> int:
    """FrontendConfig.max_prompt_chars, or 32 characters per token of context: no prompt that
    fits the context is longer, and tokenizing a longer one would be wasted work."""
    return configured if configured is not None else 32 * max_model_len


def check_prompt_chars(text: str, limit: int, param: str = "prompt") -> None:
    if len(text) > limit:
        raise RequestError(f"the {param} has {len(text)} characters; at most {limit} are allowed "
                           "(far more than the model's context length holds)", param)


class InputProcessor:
    def __init__(
        self,
        tokenizer: Any,
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: list[int] | None = None,
        model_path: str | Path | None = None,
        max_prompt_chars: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_prompt_chars = prompt_char_limit(max_model_len, max_prompt_chars)
        self.eos_token_ids = (eos_token_ids if eos_token_ids is not None
                              else load_eos_token_ids(model_path, tokenizer))

    def tokenize(self, prompt: str | list[int], add_special_tokens: bool = True,
                 param: str = "prompt", mm_items: list[MMItem] | None = None) -> list[int]:
        """Token ids of a text prompt (with the tokenizer's bos etc.), or checked given ids
        (``mm_items``: the expanded media items in them)."""
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty", param)
            check_prompt_chars(prompt, self.max_prompt_chars, param)
            ids = list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        else:
            ids = list(prompt)
        self.check_token_ids(ids, param, mm_items)
        return ids

    def check_token_ids(self, ids: list[int], param: str = "prompt",
                        mm_items: list[MMItem] | None = None) -> None:
        """Every id in the vocabulary, except at a media item's positions: those rows are its
        embeddings, and a placeholder id may lie past the vocabulary (Ultravox's
        ``audio_token_index``)."""
        if not ids:
            raise RequestError("the prompt is empty", param)
        spans = [(m.offset, m.offset + m.length) for m in mm_items or ()]
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (
                    t >= self.vocab_size and not any(a <= i < b for a, b in spans)):
                raise RequestError(
                    f"token id {t!r} is out of vocabulary (must be in [0, {self.vocab_size}))",
                    param,
                )

    def resolve_max_tokens(self, prompt_len: int, params: SamplingParams,
                           param: str = "prompt") -> int:
        """The generation budget; 400s in the words OpenAI/vLLM use for context overflows."""
        limit = self.max_model_len
        if prompt_len >= limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"has {prompt_len} tokens, which leaves no room for the completion. Please "
                "reduce the length of the prompt.",
                param,
            )
        if params.max_tokens is None:
            return limit - prompt_len
        if prompt_len + params.max_tokens > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + params.max_tokens} tokens ({prompt_len} in the {param}, "
                f"{params.max_tokens} in the completion). Please reduce the length of the "
                f"{param} or the completion (max_tokens).",
                "max_tokens",
            )
        return params.max_tokens

    def process(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        reply_to: str = "",
        *,
        add_special_tokens: bool = True,
        param: str = "prompt",
        arrival_time: float | None = None,
        mm_items: list[MMItem] | None = None,
    ) -> list[GenerateRequest]:
        """One GenerateRequest per choice, ids ``f"{request_id}-{i}"``; ``param`` names the
        prompt field in errors ("prompt" or "messages")."""
        ids = self.tokenize(prompt, add_special_tokens, param, mm_items)
        max_tokens = self.resolve_max_tokens(len(ids), params, param)
        for t in params.stop_token_ids or []:
            if t >= self.vocab_size:
                raise RequestError(f"stop token id {t} is out of vocabulary", "stop_token_ids")
        if params.logprobs is not None and params.logprobs > self.vocab_size:
            # The sampler's top-k of the distribution can't be wider than the vocabulary.
            raise RequestError(f"logprobs must be at most the vocabulary size "
                               f"({self.vocab_size})", "logprobs")
        arrival = time.time() if arrival_time is None else arrival_time
        return [
            GenerateRequest(
                request_id=f"{request_id}-{i}",
                prompt_token_ids=ids,
                sampling=params.to_wire(max_tokens, index=i),
                eos_token_ids=list(self.eos_token_ids),
                reply_to=reply_to,
                arrival_time=arrival,
                mm_items=list(mm_items or []),
            )
            for i in range(params.n)
        ]
