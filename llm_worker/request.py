"""The engine core's view of one generation request: its tokens, progress and KV blocks."""

from __future__ import annotations

import enum
import itertools
import time

from protocol.messages import GenerateRequest, MMItem, Sampling

# Arrival order is the scheduling priority (lower = older = higher priority); a process-wide
# counter keeps it unique even when two requests share an arrival_time.
_arrival_counter = itertools.count()


class RequestStatus(enum.IntEnum):
    WAITING = 0
    WAITING_FOR_EMBEDDINGS = 1  # some mm item's embedding has not reached this decoder yet
    RUNNING = 2
    PREEMPTED = 3  # blocks freed; back in the waiting queue, will recompute prompt + outputs
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_ERROR = 7

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "output_token_ids",
        "sampling",
        "eos_token_ids",
        "mm_items",
        "reply_to",
        "arrival_time",
        "arrival_order",
        "status",
        "num_computed_tokens",
        "num_pending_tokens",
        "block_ids",
        "num_cached_tokens",
        "block_hashes",
        "stop_token_id",
        "was_scheduled",
        "queued_at",
        "queue_seconds",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: Sampling,
        eos_token_ids: list[int] | tuple[int, ...] = (),
        mm_items: list[MMItem] | None = None,
        reply_to: str = "",
        arrival_time: float = 0.0,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id}: empty prompt")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling = sampling
        self.eos_token_ids = frozenset(eos_token_ids)
        # Sorted by offset so "the first item whose embedding is missing" is a linear scan.
        self.mm_items = sorted(mm_items or [], key=lambda m: m.offset)
        self.reply_to = reply_to
        self.arrival_time = arrival_time
        self.arrival_order = next(_arrival_counter)
        self.status = RequestStatus.WAITING
        # Tokens whose KV is in this request's blocks, or is computed by a step already sent
        # to the workers (advanced when a step is scheduled, not when its result comes back).
        self.num_computed_tokens = 0
        # Tokens sampled by steps still in flight: counted as this request's length when the
        # next step is scheduled (asynchronous scheduling), their ids not known yet.
        self.num_pending_tokens = 0
        self.block_ids: list[int] = []
        self.num_cached_tokens = 0  # prefix-cache hit of the first schedule (reported once)
        # Chained hashes of this request's full blocks, filled lazily by the KV block manager.
        # Tokens are only ever appended, so a full block's hash never changes (even across
        # preemption), and a resumed request does not rehash.
        self.block_hashes: list[bytes] = []
        self.stop_token_id: int | None = None
        self.was_scheduled = False  # set at the first schedule: num_cached_tokens is final then
        # The engine's own clock (arrival_time is the frontend's): first schedule - queued_at is
        # the queue time reported with the first output.
        self.queued_at = time.monotonic()
        self.queue_seconds: float | None = None

    @classmethod
    def from_msg(cls, msg: GenerateRequest) -> Request:
        return cls(
            request_id=msg.request_id,
            prompt_token_ids=msg.prompt_token_ids,
            sampling=msg.sampling,
            eos_token_ids=msg.eos_token_ids,
            mm_items=msg.mm_items,
            reply_to=msg.reply_to,
            arrival_time=msg.arrival_time,
        )

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_scheduled_len(self) -> int:
        """The length the next step extends: known tokens plus those still being sampled."""
        return self.num_tokens + self.num_pending_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self.status)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )
