"""Result types of the offline API (vLLM's names) and `SequenceState`, which turns one choice's
stream of engine `TokenOutput`s into text deltas: incremental detokenization, stop strings and
logprobs. The HTTP server and the offline `LLM` share it, so both stop and truncate the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from frontend.detokenizer import IncrementalDetokenizer, TokenText
from frontend.sampling_params import SamplingParams
from protocol.messages import TokenLogprobs, TokenOutput


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


# One generated position: token id -> Logprob; the sampled token first, then the top-k by rank.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class SequenceDelta(NamedTuple):
    """What one engine update added to a choice (text may lag the tokens: see SequenceState)."""

    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None


class SequenceState:
    """One choice. Text that could be the start of a stop string is withheld until it is resolved;
    once a stop string matches, the text is cut there and the choice is finished: the caller must
    then stop reading the engine stream (closing `EngineClient.generate` aborts the request)."""

    def __init__(
        self,
        tokenizer: Any,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
        index: int = 0,
        token_text: TokenText | None = None,
    ):
        self.index = index
        self.params = params
        self.detok = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, params.skip_special_tokens,
            params.spaces_between_special_tokens,
        )
        self.token_text = token_text or TokenText(tokenizer)
        self.stops = params.stop_strings
        self.max_stop_len = max((len(s) for s in self.stops), default=0)
        self.text = ""  # everything decoded so far (after truncation at a stop string)
        self.sent = 0  # chars of `text` already released in deltas
        self.token_ids: list[int] = []
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_cached_tokens = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, out: TokenOutput) -> SequenceDelta:
        if self.finished:
            return SequenceDelta("", [], [] if self.logprobs is not None else None, None, None)
        if out.num_cached_tokens:
            self.num_cached_tokens = out.num_cached_tokens
        ids = out.new_token_ids
        # A stop token (eos or stop_token_ids) stays in token_ids but not in the text (vLLM).
        skip_last = (out.finish_reason == "stop" and out.stop_token_id is not None and ids
                     and ids[-1] == out.stop_token_id
                     and not self.params.include_stop_str_in_output)
        new_ids: list[int] = []
        new_lps: list[PositionLogprobs] = []
        for i, tok in enumerate(ids):
            new_ids.append(tok)
            if self.logprobs is not None and out.logprobs is not None and i < len(out.logprobs):
                new_lps.append(self._position_logprobs(out.logprobs[i]))
            if skip_last and i == len(ids) - 1:
                break
            if self._append_text(self.detok.add(tok)):
                break  # stop string: later tokens of this update are dropped
        if not self.finished and out.finish_reason is not None:
            self._append_text(self.detok.flush())
            if not self.finished:
                self.finish_reason = out.finish_reason
                if out.finish_reason == "stop" and out.stop_token_id in self.params.stop_token_ids:
                    self.stop_reason = out.stop_token_id
        self.token_ids.extend(new_ids)
        if self.logprobs is not None:
            self.logprobs.extend(new_lps)
            self.cumulative_logprob = (self.cumulative_logprob or 0.0) + sum(
                p[t].logprob for p, t in zip(new_lps, new_ids) if t in p
            )
        return SequenceDelta(
            self._release(), new_ids, new_lps if self.logprobs is not None else None,
            self.finish_reason, self.stop_reason,
        )

    def _append_text(self, delta: str) -> bool:
        """Adds decoded text; True when it completed a stop string (the choice is finished)."""
        if not delta or not self.stops:
            self.text += delta
            return False
        # Only a match that ends inside the new text is new; earlier ones were ruled out already.
        start = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += delta
        best: tuple[int, str] | None = None
        for stop in self.stops:
            pos = self.text.find(stop, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        if best is None:
            return False
        pos, stop = best
        self.text = self.text[:pos + len(stop) if self.params.include_stop_str_in_output else pos]
        self.finish_reason, self.stop_reason = "stop", stop
        return True

    def _release(self) -> str:
        """Text safe to show now: all of it when finished, else all but a tail that is a prefix
        of some stop string (it may yet become the stop string, which must not be shown)."""
        end = len(self.text)
        if not self.finished and self.stops and not self.params.include_stop_str_in_output:
            end -= self._held_tail()
        end = max(end, self.sent)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta

    def _held_tail(self) -> int:
        longest = 0
        tail = self.text[-self.max_stop_len:]
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(tail)), longest, -1):
                if tail.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _position_logprobs(self, lp: TokenLogprobs) -> PositionLogprobs:
        pos: PositionLogprobs = {}
        sampled_rank = lp.ranks[0] if lp.ranks else None
        for j, (tok, value) in enumerate(zip(lp.token_ids, lp.logprobs)):
            if tok in pos:  # the sampled token is also among the top-k: that gives its rank
                if pos[tok].rank is None:
                    pos[tok].rank = j
                continue
            rank = sampled_rank if j == 0 else j
            pos[tok] = Logprob(value, rank, self.token_text.text(tok))
        return pos

    def output(self) -> CompletionOutput:
        """The choice so far (text only as far as released)."""
        return CompletionOutput(
            index=self.index,
            text=self.text[:self.sent] if not self.finished else self.text,
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )
