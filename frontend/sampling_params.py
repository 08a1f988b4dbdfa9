"""User-facing sampling parameters (vLLM-compatible names), validated with OpenAI's ranges.

Everything a user can get wrong raises `RequestError(message, param=<field>)`, so the HTTP layer
answers 400 naming the field and the offline API raises the same error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from frontend.errors import RequestError
from protocol.messages import Sampling

_INT64_MAX = 2**63 - 1
_INT32_MAX = 2**31 - 1
# Hard caps that hold offline too (the server adds its own max_n / max_logprobs): each bounds
# work done per token (stop matching) or per request (copies, wire size), far above real use.
MAX_N = 4096
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024  # per stop string: the matcher rescans this much text per token
MAX_STOP_TOKEN_IDS = 1024  # the engine checks each sampled token against the list


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: none; k: the sampled token's logprob plus the top k
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Derived: `stop` as a list (empty when none).
    stop_strings: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self._check_types()
        if isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check_ranges()

    def _check_types(self) -> None:
        for name in ("n", "top_k", "min_tokens"):
            _expect_int(name, getattr(self, name))
        for name in ("seed", "max_tokens", "logprobs"):
            if getattr(self, name) is not None:
                _expect_int(name, getattr(self, name))
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RequestError(f"{name} must be a number, got {type(value).__name__}", name)
            if not math.isfinite(value):
                raise RequestError(f"{name} must be finite, got {value}", name)
        stop = self.stop
        if stop is not None and not isinstance(stop, str):
            if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
                raise RequestError("stop must be a string or a list of strings", "stop")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise RequestError("stop_token_ids must be a list of integers", "stop_token_ids")
            for t in self.stop_token_ids:
                _expect_int("stop_token_ids", t)

    def _check_ranges(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise RequestError(f"n must be in [1, {MAX_N}], got {self.n}", "n")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not -1 <= self.top_k <= _INT32_MAX:
            raise RequestError(f"top_k must be -1 (disabled) or in [1, {_INT32_MAX}], got "
                               f"{self.top_k}", "top_k")
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if self.repetition_penalty <= 0:
            raise RequestError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
                "repetition_penalty",
            )
        if self.seed is not None and not -_INT64_MAX - 1 <= self.seed <= _INT64_MAX:
            raise RequestError("seed must fit in 64 bits", "seed")
        # Past the int32 range no context fits anyway; the wire and kernels then never overflow.
        if self.max_tokens is not None and not 1 <= self.max_tokens <= _INT32_MAX:
            raise RequestError(f"max_tokens must be in [1, {_INT32_MAX}], got {self.max_tokens}",
                               "max_tokens")
        if not 0 <= self.min_tokens <= _INT32_MAX:
            raise RequestError(f"min_tokens must be in [0, {_INT32_MAX}], got {self.min_tokens}",
                               "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
                "min_tokens",
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= _INT32_MAX:
            raise RequestError(f"logprobs must be in [0, {_INT32_MAX}], got {self.logprobs}",
                               "logprobs")
        if len(self.stop_strings) > MAX_STOP_STRINGS:
            raise RequestError(f"stop has {len(self.stop_strings)} strings; at most "
                               f"{MAX_STOP_STRINGS} are allowed", "stop")
        if any(s == "" for s in self.stop_strings):
            raise RequestError("stop cannot contain an empty string", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop_strings):
            raise RequestError(f"each stop string must be at most {MAX_STOP_CHARS} characters",
                               "stop")
        ids = self.stop_token_ids or []
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise RequestError(f"stop_token_ids has {len(ids)} ids; at most "
                               f"{MAX_STOP_TOKEN_IDS} are allowed", "stop_token_ids")
        if any(not 0 <= t <= _INT32_MAX for t in ids):
            raise RequestError(f"stop_token_ids must be in [0, {_INT32_MAX}]", "stop_token_ids")

    def check_limits(self, max_n: int, max_logprobs: int) -> None:
        """The server's own caps (FrontendConfig.max_n / max_logprobs)."""
        if self.n > max_n:
            raise RequestError(f"n must be at most {max_n}, got {self.n}", "n")
        if self.logprobs is not None and self.logprobs > max_logprobs:
            raise RequestError(
                f"logprobs must be at most {max_logprobs}, got {self.logprobs}", "logprobs"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_wire(self, max_tokens: int | None = None, index: int = 0) -> Sampling:
        """The engine's view of choice ``index``. ``max_tokens`` is the resolved budget (the
        processor fills it in when the user left it None)."""
        budget = max_tokens if max_tokens is not None else self.max_tokens
        if budget is None:
            raise ValueError("max_tokens must be resolved before to_wire")
        # With n > 1 and a seed, each choice gets its own stream, else all n would be identical;
        # wrapped into int64 so seed + index fits the wire (and torch) for any valid seed.
        seed = None if self.seed is None else (self.seed + index + 2**63) % 2**64 - 2**63
        return Sampling(
            max_tokens=budget,
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            top_k=self.top_k if self.top_k > 0 else -1,
            min_p=float(self.min_p),
            seed=seed,
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            repetition_penalty=float(self.repetition_penalty),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=self.logprobs,
        )


def _expect_int(name: str, value: object) -> None:
    # bool is an int subclass; `n=True` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {type(value).__name__}", name)
