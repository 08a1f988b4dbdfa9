"""What the scheduler tells the workers each step, and what the workers answer.

Deltas, not state: a request's tokens, sampling params and block table travel once (when it is
first scheduled, or when it resumes after preemption); afterwards a step only carries its new
blocks and where its computation starts. Workers keep their own per-request token lists and
append the tokens they sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.messages import MMItem, Sampling, TokenLogprobs


@dataclass
class NewRequestData:
    """A request the worker must (re)create. A resumed request was preempted by recompute: the
    worker replaces its old state; ``token_ids`` is prompt + outputs so far, all to recompute."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: Sampling
    block_ids: list[int]  # the whole block table, prefix-cache hits first
    num_computed_tokens: int  # prefix-cache hit: KV already in block_ids; compute from here
    mm_items: list[MMItem] = field(default_factory=list)
    # Ids that end generation (the sampler keeps them out until min_tokens is reached).
    eos_token_ids: tuple[int, ...] = ()


@dataclass
class CachedRequestData:
    """A request the worker already knows, scheduled again this step."""

    request_id: str
    new_block_ids: list[int]  # append to the worker's block table
    num_computed_tokens: int  # before this step: this step's tokens start at this position


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    # request_id -> tokens to compute this step. Insertion order is the batch order: requests
    # that were already running first (oldest first), then the newly scheduled ones.
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Finished or aborted since the last step: the worker may drop their state.
    finished_request_ids: set[str] = field(default_factory=set)
    # Preempted this step (blocks freed). They resume later as NewRequestData; a worker may
    # drop their state now, but should keep e.g. a seeded RNG stream to resume it.
    preempted_request_ids: set[str] = field(default_factory=set)
    # Media embeddings the worker must hold from now on (key -> [num_tokens, hidden], host
    # memory), and keys no running request needs any more. Sent once each, like the requests.
    embeddings: dict[str, Any] = field(default_factory=dict)
    freed_embeddings: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        # Finished/preempted ids count as content: skipping such a step would leak worker state.
        return not (
            self.total_num_scheduled_tokens
            or self.finished_request_ids
            or self.preempted_request_ids
        )

    @classmethod
    def empty(cls, finished_request_ids: set[str] | None = None) -> SchedulerOutput:
        return cls([], [], {}, 0, finished_request_ids or set())


@dataclass
class ModelRunnerOutput:
    # Only requests whose tokens are all computed after this step get a token
    # (num_computed_tokens + scheduled == len(token ids)); a prefill chunk that is not the
    # last gets none.
    sampled_token_ids: dict[str, int]
    # Only for requests that asked for logprobs (Sampling.logprobs is not None).
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
