"""OpenAI response shapes: whole responses and stream chunks for chat and completions, logprobs in
each flavour, usage, SSE framing."""

from __future__ import annotations

import math
import time
from typing import Any

import msgspec

from frontend.detokenizer import TokenText
from frontend.outputs import PositionLogprobs, SequenceDelta, SequenceState

_MIN_LOGPROB = -9999.0  # OpenAI clients choke on -inf (not valid JSON); vLLM uses the same floor

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}  # keep reverse proxies from buffering the stream

_json = msgspec.json.Encoder()


def sse(payload: Any) -> bytes:
    return b"data: " + _json.encode(payload) + b"\n\n"


def error_json(status: int, message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def clamp_logprob(x: float) -> float:
    return x if math.isfinite(x) and x > _MIN_LOGPROB else _MIN_LOGPROB


def _top(pos: PositionLogprobs, k: int) -> list[tuple[int, float]]:
    """The top-k entries of one position, by rank."""
    ranked = [(e.rank, t, e.logprob) for t, e in pos.items() if e.rank is not None and e.rank <= k]
    return [(t, lp) for _, t, lp in sorted(ranked)][:k]


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], k: int,
                  text: TokenText) -> dict[str, Any]:
    """`choices[i].logprobs` of chat completions: {content: [{token, logprob, bytes,
    top_logprobs: [{token, logprob, bytes}]}]}."""
    content = []
    for tok, pos in zip(token_ids, positions):
        entry = pos.get(tok)
        s, raw = text.get(tok)
        content.append({
            "token": s,
            "logprob": clamp_logprob(entry.logprob) if entry else _MIN_LOGPROB,
            "bytes": raw,
            "top_logprobs": [
                {"token": text.text(t), "logprob": clamp_logprob(lp), "bytes": text.bytes(t)}
                for t, lp in _top(pos, k)
            ],
        })
    return {"content": content}


def completion_logprobs(token_ids: list[int], positions: list[PositionLogprobs],
                        text: TokenText, offset: int) -> tuple[dict[str, Any], int]:
    """`choices[i].logprobs` of legacy completions ({tokens, token_logprobs, top_logprobs,
    text_offset}); ``offset`` is where the first token starts in the choice's text. Returns the
    offset after the last token, for the next streamed chunk."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tok, pos in zip(token_ids, positions):
        s = text.text(tok)
        entry = pos.get(tok)
        tokens.append(s)
        token_lps.append(clamp_logprob(entry.logprob) if entry else _MIN_LOGPROB)
        # The sampled token and the top-k, keyed by text as the legacy API does.
        tops.append({text.text(t): clamp_logprob(e.logprob) for t, e in pos.items()})
        offsets.append(offset)
        offset += len(s)
    return ({"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
             "text_offset": offsets}, offset)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None,
          ) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


# -- whole responses and stream chunks ----------------------------------------------------------

class _Shape:
    """What chat and completions responses share: the envelope, usage, usage-only chunk."""

    chunk_name = ""

    def __init__(self, rid: str, model: str, req: Any, num_prompt: int, text: TokenText):
        self.rid = rid
        self.model = model
        self.req = req
        self.num_prompt = num_prompt
        self.text = text
        self.created = int(time.time())

    def envelope(self, name: str, choices: list[dict]) -> dict[str, Any]:
        return {"id": self.rid, "object": name, "created": self.created, "model": self.model,
                "choices": choices}

    def usage(self, states: list[SequenceState]) -> dict[str, Any]:
        # Cached tokens: the best any choice got (the choices of a prompt share its prefix).
        cached = max((s.num_cached_tokens for s in states), default=0)
        return usage(self.num_prompt, sum(len(s.token_ids) for s in states), cached)

    def stream_chunk(self, choices: list[dict], states: list[SequenceState]) -> dict[str, Any]:
        out = self.envelope(self.chunk_name, choices)
        if self.req.include_usage:  # OpenAI: every chunk has `usage`, null but in the last one
            out["usage"] = self.usage(states) if self.req.continuous_usage else None
        return out

    def usage_chunk(self, states: list[SequenceState]) -> dict[str, Any]:
        out = self.envelope(self.chunk_name, [])
        out["usage"] = self.usage(states)
        return out


class ChatShape(_Shape):
    chunk_name = "chat.completion.chunk"

    def __init__(self, rid: str, model: str, req: Any, num_prompt: int, text: TokenText,
                 role: str, top_logprobs: int | None):
        super().__init__(rid, model, req, num_prompt, text)
        self.role = role
        self.k = top_logprobs  # None: no logprobs requested

    def _logprobs(self, token_ids: list[int], lps: list[PositionLogprobs] | None) -> Any:
        if self.k is None or lps is None:
            return None
        return chat_logprobs(token_ids, lps, self.k, self.text)

    def head_chunk(self, state: SequenceState, states: list[SequenceState]) -> dict | None:
        # The first chunk of each choice carries the role, as OpenAI's stream does.
        choice = {"index": state.index, "delta": {"role": self.role, "content": ""},
                  "logprobs": None, "finish_reason": None}
        return self.stream_chunk([choice], states)

    def chunk(self, state: SequenceState, d: SequenceDelta, states: list[SequenceState]
              ) -> dict | None:
        if not (d.text or d.finish_reason or d.logprobs):
            return None  # text withheld (partial character or maybe a stop string)
        choice: dict[str, Any] = {"index": state.index,
                                  "delta": {"content": d.text} if d.text else {},
                                  "logprobs": self._logprobs(d.token_ids, d.logprobs),
                                  "finish_reason": d.finish_reason}
        if d.finish_reason is not None:
            choice["stop_reason"] = d.stop_reason
        return self.stream_chunk([choice], states)

    def final(self, states: list[SequenceState]) -> dict[str, Any]:
        choices = []
        for s in states:
            out = s.output()
            choices.append({"index": s.index, "message": {"role": self.role, "content": out.text},
                            "logprobs": self._logprobs(out.token_ids, out.logprobs),
                            "finish_reason": out.finish_reason, "stop_reason": out.stop_reason})
        body = self.envelope("chat.completion", choices)
        body["usage"] = self.usage(states)
        return body


class CompletionShape(_Shape):
    chunk_name = "text_completion"

    def __init__(self, rid: str, model: str, req: Any, num_prompt: int, text: TokenText,
                 logprobs: int | None, echo: list[str]):
        super().__init__(rid, model, req, num_prompt, text)
        self.want_logprobs = logprobs is not None
        self.echo = echo  # per choice: the prompt text to put in front (empty list: no echo)
        self.offsets: dict[int, int] = {}  # choice -> text_offset of its next streamed token

    def _logprobs(self, token_ids: list[int], lps: list[PositionLogprobs] | None,
                  offset: int) -> tuple[Any, int]:
        if not self.want_logprobs or lps is None:
            return None, offset
        return completion_logprobs(token_ids, lps, self.text, offset)

    def head_chunk(self, state: SequenceState, states: list[SequenceState]) -> dict | None:
        if not self.echo:
            return None
        choice = {"index": state.index, "text": self.echo[state.index], "logprobs": None,
                  "finish_reason": None}
        return self.stream_chunk([choice], states)

    def chunk(self, state: SequenceState, d: SequenceDelta, states: list[SequenceState]
              ) -> dict | None:
        if not (d.text or d.finish_reason or d.logprobs):
            return None
        i = state.index
        offset = self.offsets.get(i, len(self.echo[i]) if self.echo else 0)
        lps, self.offsets[i] = self._logprobs(d.token_ids, d.logprobs, offset)
        choice: dict[str, Any] = {"index": i, "text": d.text, "logprobs": lps,
                                  "finish_reason": d.finish_reason}
        if d.finish_reason is not None:
            choice["stop_reason"] = d.stop_reason
        return self.stream_chunk([choice], states)

    def final(self, states: list[SequenceState]) -> dict[str, Any]:
        choices = []
        for s in states:
            out = s.output()
            prefix = self.echo[s.index] if self.echo else ""
            lps, _ = self._logprobs(out.token_ids, out.logprobs, len(prefix))
            choices.append({"index": s.index, "text": prefix + out.text, "logprobs": lps,
                            "finish_reason": out.finish_reason, "stop_reason": out.stop_reason})
        body = self.envelope("text_completion", choices)
        body["usage"] = self.usage(states)
        return body
