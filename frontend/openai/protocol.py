"""Request bodies of the OpenAI-compatible API as msgspec Structs.

Decoding is typed, so a wrong type is a 400 that names the field path (msgspec says
"Expected `int`, got `str` - at `$.max_tokens`"). Unknown fields are refused; OpenAI fields we do not
implement are declared so they get an explicit "`tools` is not supported" instead.

Everything is bounded while decoding: integers fit in 64 bits, free-form JSON (messages, metadata,
template kwargs) nests at most `MAX_JSON_DEPTH` levels, and lists that later code loops over have a
length cap; so nothing after decoding can recurse deeply or meet a number the wire can't carry.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from frontend.errors import RequestError
from frontend.sampling_params import SamplingParams

MAX_JSON_DEPTH = 32  # containers inside one free-form field
MAX_NAME_CHARS = 1024  # model names and other short strings that may be echoed in errors
MAX_TOKEN_IDS = 1 << 20  # token ids in one prompt, batch or /detokenize body
_INT64 = (-(2**63), 2**63 - 1)

Int64 = Annotated[int, msgspec.Meta(ge=_INT64[0], le=_INT64[1])]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
TokenIds = Annotated[list[Int64], msgspec.Meta(max_length=MAX_TOKEN_IDS)]
# Free-form JSON. Its depth is checked after decoding (check_json): msgspec can't bound a recursive
# type, and a union per level makes its type tree exponential.
Json = Any
JsonObject = dict[str, Any]


class _Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk
    include_obfuscation: bool | None = None  # sent by newer official clients; nothing to hide here


class _Common(_Body):
    """Fields shared by chat and completions: sampling, streaming, and ignored metadata."""

    model: Name | None = None  # None: the first served model name
    n: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted and ignored: harmless for a self-hosted server.
    user: Name | None = None
    metadata: JsonObject | None = None
    store: bool | None = None
    service_tier: Name | None = None
    prompt_cache_key: Name | None = None
    safety_identifier: Name | None = None
    # vLLM extras
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: Int64 = 0
    stop_token_ids: list[Int64] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # OpenAI fields we refuse explicitly (see check_fields)
    logit_bias: JsonObject | None = None

    _UNSUPPORTED = ("logit_bias",)

    def check_fields(self) -> None:
        """Refuses OpenAI fields we do not implement, by name, and inconsistent combinations."""
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream: true",
                               "stream_options")
        for name in self._UNSUPPORTED:
            value = getattr(self, name)
            if value is None or value == [] or value == {} or value is False:
                continue
            if name == "response_format" and isinstance(value, dict) and value.get("type") == "text":
                continue
            if name == "tool_choice" and value == "none":
                continue
            raise RequestError(f"`{name}` is not supported", name)

    def _sampling(self, max_tokens: int | None, logprobs: int | None,
                  limits: tuple[int, int] | None) -> SamplingParams:
        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        params = SamplingParams(
            n=pick(self.n, 1),
            temperature=pick(self.temperature, 1.0),
            top_p=pick(self.top_p, 1.0),
            top_k=pick(self.top_k, -1),
            min_p=pick(self.min_p, 0.0),
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            presence_penalty=pick(self.presence_penalty, 0.0),
            frequency_penalty=pick(self.frequency_penalty, 0.0),
            repetition_penalty=pick(self.repetition_penalty, 1.0),
            logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )
        if limits is not None:
            params.check_limits(*limits)
        return params

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[JsonObject]
    max_tokens: Int64 | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: Int64 | None = None
    logprobs: bool | None = None
    top_logprobs: Int64 | None = None
    chat_template: str | None = None
    chat_template_kwargs: JsonObject | None = None
    add_generation_prompt: bool | None = None  # None: true unless continue_final_message
    continue_final_message: bool = False
    # vLLM extra: processor settings of this request's media (min_pixels, max_pixels, fps, ...),
    # checked by the model's geometry (frontend/media/inputs.py)
    mm_processor_kwargs: JsonObject | None = None
    tools: list[Json] | None = None
    tool_choice: Json = None
    functions: list[Json] | None = None
    function_call: Json = None
    parallel_tool_calls: bool | None = None
    response_format: Json = None
    audio: Json = None
    modalities: list[Json] | None = None
    prediction: Json = None
    reasoning_effort: Name | None = None
    web_search_options: Json = None
    verbosity: Name | None = None

    _UNSUPPORTED = ("logit_bias", "tools", "tool_choice", "functions", "function_call",
                    "parallel_tool_calls", "response_format", "audio", "modalities", "prediction",
                    "reasoning_effort", "web_search_options", "verbosity")

    def to_sampling_params(self, limits: tuple[int, int] | None = None) -> SamplingParams:
        """``limits``: the server's (max_n, max_logprobs)."""
        self.check_fields()
        max_tokens = self.max_completion_tokens
        if self.max_tokens is not None:
            if max_tokens is not None and max_tokens != self.max_tokens:
                raise RequestError("max_tokens and max_completion_tokens disagree; give one",
                                   "max_completion_tokens")
            max_tokens = self.max_tokens
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise RequestError("top_logprobs needs logprobs to be true", "top_logprobs")
            if self.top_logprobs < 0:
                raise RequestError("top_logprobs must be >= 0", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        try:
            return self._sampling(max_tokens, logprobs, limits)
        except RequestError as e:
            if e.param == "logprobs":  # the chat API calls it top_logprobs
                e.param, e.message = "top_logprobs", e.message.replace("logprobs", "top_logprobs")
            if e.param == "max_tokens" and self.max_tokens is None:
                e.param = "max_completion_tokens"
            raise


class CompletionRequest(_Common, kw_only=True):
    # str, list[str], list[int] or list[list[int]]: see prompts()
    prompt: str | Annotated[list[Any], msgspec.Meta(max_length=MAX_TOKEN_IDS)]
    max_tokens: Int64 | None = 16  # OpenAI's default for completions
    logprobs: Int64 | None = None
    echo: bool | None = None
    best_of: Int64 | None = None
    suffix: str | None = None
    add_special_tokens: bool = True

    def to_sampling_params(self, limits: tuple[int, int] | None = None) -> SamplingParams:
        """``limits``: the server's (max_n, max_logprobs)."""
        self.check_fields()
        if self.suffix:
            raise RequestError("`suffix` is not supported", "suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise RequestError("`best_of` is not supported (except best_of == n)", "best_of")
        if self.echo and self.logprobs is not None:
            raise RequestError("echo with logprobs is not supported (no prompt logprobs)", "echo")
        return self._sampling(self.max_tokens, self.logprobs, limits)

    def prompts(self) -> list[str | list[int]]:
        """The batch: one str or token-id list per prompt."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("prompt must not be empty", "prompt")
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(_is_int(x) for x in p):
            return [list(p)]
        if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
            return [list(x) for x in p]
        raise RequestError("prompt must be a string, a list of strings, a list of token ids or "
                           "a list of lists of token ids", "prompt")


class TokenizeRequest(_Body):
    """vLLM's /tokenize: either `prompt` (completion style) or `messages` (chat style)."""

    model: Name | None = None
    prompt: str | None = None
    messages: list[JsonObject] | None = None
    add_special_tokens: bool | None = None  # None: true for prompt, false for messages
    add_generation_prompt: bool | None = None
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: JsonObject | None = None
    return_token_strs: bool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise RequestError("give exactly one of `prompt` and `messages`", "prompt")


class DetokenizeRequest(_Body, kw_only=True):
    tokens: TokenIds
    model: Name | None = None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_PATH = re.compile(r"at `\$\.?([^`]*)`")
_FIELD = re.compile(r"field `([^`]+)`")


def decode_body(body: bytes, cls: type[msgspec.Struct]) -> Any:
    """Typed decode; any problem is a RequestError whose param is the offending field path."""
    if not body:
        raise RequestError("the request body is empty (expected a JSON object)")
    try:
        req = msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as e:
        text = str(e)
        m = _PATH.search(text)
        path = m.group(1) if m else ""
        # "Object contains unknown field `x` - at `$.a`" / "missing required field": name a.x
        f = _FIELD.search(text)
        param = ".".join(p for p in (path, f.group(1) if f else "") if p) or None
        raise RequestError(_clip(text), param and _clip(param)) from None
    except msgspec.DecodeError as e:
        raise RequestError(f"invalid JSON body: {_clip(str(e))}") from None
    except RecursionError:
        # msgspec guards its own recursion: a 100k-deep array ends here.
        raise RequestError(f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} "
                           "levels inside a field)") from None
    except Exception:
        # Anything else msgspec raises is still the body's fault; its text is not echoed.
        raise RequestError("invalid JSON body") from None
    for name in req.__struct_fields__:
        value = getattr(req, name)
        if type(value) in (list, dict):
            check_json(value, name)
    return req


def check_json(value: Any, param: str) -> None:
    """Free-form JSON at most MAX_JSON_DEPTH containers deep, its integers within 64 bits: later
    code (templates, media parsing, the wire) may then walk it freely. Iterative, level by level."""
    level = [value]
    depth = 0
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise RequestError(f"`{param}` is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                               param)
        children: list[Any] = []
        for node in level:
            children.extend(node.values() if type(node) is dict else node)
        level = []
        for c in children:
            t = type(c)
            if t is list or t is dict:
                level.append(c)
            elif t is int and not _INT64[0] <= c <= _INT64[1]:
                raise RequestError(f"`{param}` holds an integer outside the 64-bit range", param)


def _clip(text: str, limit: int = 300) -> str:
    """msgspec quotes unknown field names: a 10 MB key must not come back in the error."""
    return text if len(text) <= limit else text[:limit] + "..."
