"""Continuous batching with a token budget, chunked prefill, prefix caching and preemption.

Each ``schedule()`` builds one step: running requests first (a decode token, or the next chunk
of a prefill), then waiting ones in arrival order while the budget, ``max_num_seqs`` and the KV
cache allow. ``update_from_output()`` applies the step's result: sampled tokens, stop checks,
prefix-cache registration, freeing finished requests.

Progress is counted when a step is scheduled, not when its result comes back, so the next step
can be scheduled while this one runs (asynchronous scheduling, `EngineCore`): a step that ends a
sequence's known tokens leaves one *pending* token (sampled, id not known yet) that the next
step may already extend. Scheduled and applied one after the other, the steps are the same.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from llm_worker.kv_blocks import KVBlockManager
from llm_worker.request import Request, RequestStatus
from protocol.messages import EngineStats, TokenOutput
from protocol.step import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int  # token budget of one step
    max_model_len: int
    block_size: int = 16
    enable_chunked_prefill: bool = True
    # A prefill chunk that stops at a media item still being encoded runs ahead only when it is
    # at least this long. A short one costs a whole weight read (~4.5 ms on a 7B, the same as a
    # 600-token chunk) that contends with the tower on a shared GPU and delays the prefill the
    # first token waits for; deferred, its tokens ride in that prefill almost for free.
    min_partial_prefill: int = 64

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.min_partial_prefill < 0:
            raise ValueError("min_partial_prefill must be >= 0")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            # Without chunking a whole prompt must fit one step, or a long one never runs.
            raise ValueError(
                "max_num_batched_tokens must be >= max_model_len when chunked prefill is off"
            )


def _priority(req: Request) -> int:
    return req.arrival_order  # FCFS: older first; the newest is the first to be preempted


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVBlockManager,
        embeddings_ready: Callable[[str], bool] | None = None,
    ) -> None:
        if kv.block_size != config.block_size:
            raise ValueError(f"block_size {config.block_size} != KV manager's {kv.block_size}")
        if kv.num_total_blocks * kv.block_size < config.max_model_len:
            # Otherwise one max-length request could preempt everyone and still not fit.
            raise ValueError(
                f"KV cache holds {kv.num_total_blocks * kv.block_size} tokens, less than one "
                f"max_model_len={config.max_model_len} request; add blocks or lower max_model_len"
            )
        self.config = config
        self.kv = kv
        self.embeddings_ready = embeddings_ready  # mm key -> embedding present on this decoder
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # sorted by _priority
        self._finished_ids: set[str] = set()  # reported to the workers in the next output
        self.num_preemptions = 0
        self.num_steps = 0

    # -- queue management ---------------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if req.num_prompt_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt has {req.num_prompt_tokens} tokens, max_model_len is "
                f"{self.config.max_model_len}"
            )
        ready = self.request_ready(req) >= req.num_tokens
        req.status = RequestStatus.WAITING if ready else RequestStatus.WAITING_FOR_EMBEDDINGS
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Finish the known ones as aborted and free their blocks now; unknown ids are ignored."""
        aborted = []
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self.kv.free(req)
            req.status = RequestStatus.FINISHED_ABORTED
            self._finished_ids.add(rid)
            aborted.append(req)
        return aborted

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def request_ready(self, req: Request, num_computed: int | None = None) -> int:
        """How many of the request's tokens may be computed now: all of them, or up to the first
        mm item whose embedding is missing. Items already in the KV (ending at or before
        ``num_computed``, default the request's progress) need no embedding."""
        if self.embeddings_ready is None or not req.mm_items:
            return req.num_scheduled_len
        done = req.num_computed_tokens if num_computed is None else num_computed
        for item in req.mm_items:
            if item.offset + item.length > done and not self.embeddings_ready(item.key):
                return item.offset
        return req.num_scheduled_len

    def _computable(self, req: Request, done: int) -> int:
        """Tokens past ``done`` to compute now: up to `request_ready`, or none when that stops
        short of an item being encoded and is shorter than ``min_partial_prefill``."""
        ready = self.request_ready(req, done)
        n = ready - done
        if ready < req.num_scheduled_len and n < self.config.min_partial_prefill:
            return 0
        return n

    # -- one step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput([], [], {}, 0, self._finished_ids)
        self._finished_ids = set()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        # Memory is tight if we just preempted: admitting newcomers would only thrash.
        if not out.preempted_request_ids:
            budget = self._schedule_waiting(out, budget)
        out.total_num_scheduled_tokens = self.config.max_num_batched_tokens - budget
        if out.num_scheduled_tokens:
            self.num_steps += 1
        return out

    def _advance(self, req: Request, n: int) -> None:
        """``n`` tokens of ``req`` go into this step; reaching its end samples one more."""
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_scheduled_len:
            req.num_pending_tokens += 1

    def _done_by_length(self, req: Request) -> bool:
        """Its pending tokens already reach max_tokens or max_model_len: nothing to extend."""
        return (req.num_output_tokens + req.num_pending_tokens >= req.sampling.max_tokens
                or req.num_scheduled_len >= self.config.max_model_len)

    def _chunk(self, n: int, budget: int) -> int:
        """Tokens to schedule of ``n`` computable ones: all, a budget-sized chunk, or none."""
        if n <= budget:
            return n
        return budget if self.config.enable_chunked_prefill else 0

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending_tokens and self._done_by_length(req):
                i += 1
                continue
            n = self._chunk(self._computable(req, req.num_computed_tokens), budget)
            if n <= 0:  # stalled on an embedding (or its chunk can't fit): let others go
                i += 1
                continue
            new_blocks = self.kv.allocate_slots(req, n)
            while new_blocks is None:
                # Everything after index i is unscheduled this step, so the newest request is
                # always safe to preempt; if that is req itself, the rest is gone already.
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is req:
                    return budget
                new_blocks = self.kv.allocate_slots(req, n)
            out.cached_requests.append(
                CachedRequestData(req.request_id, new_blocks, req.num_computed_tokens)
            )
            out.num_scheduled_tokens[req.request_id] = n
            self._advance(req, n)
            budget -= n
            i += 1
        return budget

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        # Recompute, not swap: drop the KV and redo prompt + outputs later (the prefix cache
        # often gives much of it back). Front of the queue: it is older than anything waiting.
        # A token still pending from the step in flight is kept: it arrives while it waits.
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)
        out.preempted_request_ids.add(req.request_id)
        self.num_preemptions += 1

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> int:
        skipped: list[Request] = []  # blocked on embeddings: they keep their place in the queue
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending_tokens:  # preempted with a token in flight: resume once it lands
                skipped.append(self.waiting.popleft())
                continue
            hit = self.kv.get_computed_blocks(req)
            n = self._computable(req, hit.num_tokens)
            if n <= 0:
                req.status = RequestStatus.WAITING_FOR_EMBEDDINGS
                skipped.append(self.waiting.popleft())
                continue
            n = self._chunk(n, budget)
            if n == 0:
                break
            new_blocks = self.kv.allocate_slots(req, n, hit)
            if new_blocks is None:
                break  # never preempt to admit; FCFS: nobody overtakes the head either
            self.waiting.popleft()
            req.num_computed_tokens = hit.num_tokens
            if not req.was_scheduled:
                req.was_scheduled = True
                req.num_cached_tokens = hit.num_tokens
                req.queue_seconds = time.monotonic() - req.queued_at
            req.status = RequestStatus.RUNNING
            bisect.insort(self.running, req, key=_priority)
            out.new_requests.append(
                NewRequestData(
                    request_id=req.request_id,
                    token_ids=req.all_token_ids,
                    num_prompt_tokens=req.num_prompt_tokens,
                    sampling=req.sampling,
                    block_ids=list(req.block_ids),
                    num_computed_tokens=req.num_computed_tokens,
                    mm_items=list(req.mm_items),
                    eos_token_ids=tuple(req.eos_token_ids),
                )
            )
            out.num_scheduled_tokens[req.request_id] = n
            self._advance(req, n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return budget

    # -- results ------------------------------------------------------------------------------

    def update_from_output(
        self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput
    ) -> list[TokenOutput]:
        outputs: list[TokenOutput] = []
        starts = {c.request_id: c.num_computed_tokens for c in sched_out.cached_requests}
        starts.update((r.request_id, r.num_computed_tokens) for r in sched_out.new_requests)
        for rid, n in sched_out.num_scheduled_tokens.items():
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue  # aborted after it was scheduled: its result is dropped
            running = req.status == RequestStatus.RUNNING  # else preempted since (async)
            if running:
                # This step wrote the KV, so full blocks are safe to share from now on (a later
                # step, maybe in flight, may have computed more: not ours to register yet).
                self.kv.cache_full_blocks(req, starts[rid] + n)
            tok = runner_out.sampled_token_ids.get(rid)
            if tok is None:
                continue  # a prefill chunk that is not the last
            req.num_pending_tokens -= 1
            req.output_token_ids.append(tok)
            self._check_stop(req, tok)
            lp = runner_out.logprobs.get(rid)
            outputs.append(
                TokenOutput(
                    request_id=rid,
                    new_token_ids=[tok],
                    finish_reason=req.finish_reason,
                    stop_token_id=req.stop_token_id,
                    logprobs=[lp] if lp is not None else None,
                    num_cached_tokens=req.num_cached_tokens if req.num_output_tokens == 1 else 0,
                    queue_seconds=req.queue_seconds if req.num_output_tokens == 1 else None,
                )
            )
            if req.is_finished:
                self._free_finished(req, running)
        return outputs

    def _check_stop(self, req: Request, tok: int) -> None:
        sp = req.sampling
        if req.num_output_tokens >= sp.min_tokens:
            if (not sp.ignore_eos and tok in req.eos_token_ids) or tok in sp.stop_token_ids:
                req.status = RequestStatus.FINISHED_STOPPED
                req.stop_token_id = tok
                return
        if req.num_output_tokens >= sp.max_tokens or req.num_tokens >= self.config.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH

    def _free_finished(self, req: Request, running: bool = True) -> None:
        (self.running if running else self.waiting).remove(req)
        self.kv.free(req)
        del self.requests[req.request_id]
        self._finished_ids.add(req.request_id)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.kv.num_total_blocks,
            prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
            num_steps=self.num_steps,
        )
