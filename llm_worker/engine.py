"""The engine core: scheduler + executor, with no sockets.

`EngineCore` is socket-free (the offline `LLM` drives it directly; `llm_worker/engine_proc.py`
serves it over ZeroMQ). With asynchronous scheduling its `step()` schedules and queues step N+1
before it waits for step N's sampled ids, so the host's scheduling, input staging and launches
overlap the device's work; it returns step N's outputs.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import msgspec
import torch
import transformers

from llm_worker.config import LLMWorkerConfig
from llm_worker.embedding_cache import EmbeddingCache
from llm_worker.executor import Executor, StepResult, make_executor
from llm_worker.kv_blocks import KVBlockManager
from llm_worker.models import get_model_class, text_config
from llm_worker.request import Request
from llm_worker.scheduler import Scheduler, SchedulerConfig
from protocol import timeline
from protocol.codec import tensor_frames
from protocol.messages import (
    EngineStats,
    GenerateRequest,
    TokenOutput,
)
from protocol.step import SchedulerOutput

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: LLMWorkerConfig):
        self.config = config
        self.step_seconds = 0.0  # in steps that ran work (stats)
        self.async_scheduling = config.resolved_async_scheduling()
        # Steps sent to the executor whose results are not applied yet (at most one between
        # calls of step(), and only with asynchronous scheduling), oldest first.
        self.in_flight: deque[tuple[SchedulerOutput, StepResult]] = deque()
        self.num_applied = 0  # steps whose results were applied (progress, with num_steps)
        self.executor = make_executor(config)
        try:
            self._build_core(config)
        except BaseException:
            self.executor.shutdown()  # no worker process may outlive a failed start
            raise

    def _build_core(self, config: LLMWorkerConfig) -> None:
        """Everything past the executor: sized from what the workers report."""
        # The model's position rule (M-RoPE models), to check a request's items before it is
        # queued: a bad grid must fail that request, not a step of the runner.
        hf_config = transformers.AutoConfig.from_pretrained(config.model, trust_remote_code=False)
        scheme = getattr(get_model_class(hf_config), "position_scheme", None)
        self.position_scheme = scheme(hf_config) if scheme is not None else None
        self.max_model_len = self.executor.max_model_len
        self.vocab_size = self.executor.vocab_size
        self.max_position = max(self.max_model_len,  # the rotary table's length (llama.py)
                                text_config(hf_config).max_position_embeddings)
        num_blocks = self.executor.num_available_blocks()
        self.executor.init_kv_cache(num_blocks)
        self.kv = KVBlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.embeds = EmbeddingCache(int(config.embedding_cache_gb * (1 << 30)))
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                block_size=config.block_size,
            ),
            self.kv,
            embeddings_ready=self.embeds.__contains__,
        )
        self.hidden_size = self.executor.hidden_size
        self.req_keys: dict[str, list[str]] = {}  # request -> mm keys it pins
        self.worker_keys: set[str] = set()  # keys the workers hold on the device
        self.pending_free: list[str] = []  # keys to drop from the workers at the next step
        # Host copies of device embeddings not yet sent to the runner: the cache keeps the
        # device tensor until then (the runner takes it as it is), the host copy after.
        self.host_copies: dict[str, torch.Tensor] = {}
        self.errors: list[tuple[str, int, str]] = []  # (request id, status, message) to report

    def add_embedding(self, key: str, tensor) -> str | None:
        """Store an arriving embedding ([num_tokens, hidden], floating); error text if invalid.
        Bytes that follow a device copy of the same shape are its host copy (`_host_copy`)."""
        if tensor.dim() != 2 or tensor.shape[1] != self.hidden_size or tensor.shape[0] < 1:
            return f"embedding {key} has shape {list(tensor.shape)}, expected [n, {self.hidden_size}]"
        if not tensor.is_floating_point():
            return f"embedding {key} has dtype {tensor.dtype}, expected a floating type"
        held = self.embeds.entries.get(key)
        if (held is not None and held.device.type != "cpu" and tensor.device.type == "cpu"
                and held.shape == tensor.shape):
            self._host_copy(key, tensor)
            return None
        self.embeds.put(key, tensor)
        self.host_copies.pop(key, None)
        return None

    def _host_copy(self, key: str, host: torch.Tensor) -> None:
        """The host copy of device embedding ``key`` replaces it in the cache once the runner
        has the device tensor (device memory is not the cache's budget)."""
        if key in self.worker_keys or key not in self.embeds.refs:
            self.embeds.put(key, host)
        else:
            self.host_copies[key] = host

    def embedding_lost(self, key: str, reason: str) -> None:
        """An embedding was sent but its bytes could not be read: the requests waiting on it
        fail (503, a retry sends it again) instead of waiting for it forever."""
        if key in self.embeds:
            return  # an earlier copy serves them
        waiting = [rid for rid, keys in self.req_keys.items() if key in keys]
        for rid in waiting:
            log.warning("%s fails: embedding %s lost (%s)", rid, key, reason)
            self.errors.append((rid, 503, f"the embedding of media item {key} was lost on its "
                                          "way to the decoder; retry the request"))
        self.abort(waiting)

    def _validate_mm(self, msg: GenerateRequest) -> str | None:
        end = 0
        for item in msg.mm_items:
            if item.offset < end or item.length < 1:
                return "mm items must be sorted, non-overlapping and non-empty"
            end = item.offset + item.length
            if end > len(msg.prompt_token_ids):
                return "an mm item reaches past the end of the prompt"
        if msg.mm_items and self.position_scheme is not None:
            n = len(msg.prompt_token_ids)
            try:  # M-RoPE places each item by its grid: one missing or not fitting is refused
                positions, delta = self.position_scheme.prompt_positions(n, msg.mm_items)
            except ValueError as e:
                return str(e)
            # A time-scaled video (Qwen2.5-VL) can place tokens far past their index; the
            # rotary table ends at max_position.
            last = max(int(positions.max(initial=0)), n + msg.sampling.max_tokens - 1 + delta)
            if last >= self.max_position:
                return (f"the prompt's media place tokens at position {last}, past the "
                        f"model's {self.max_position} positions")
        return None

    def validate(self, msg: GenerateRequest) -> str | None:
        """Defence in depth: the frontend already validated, but the engine trusts no peer."""
        n = len(msg.prompt_token_ids)
        if n == 0:
            return "prompt is empty"
        if n >= self.max_model_len:
            return f"prompt has {n} tokens; the maximum context length is {self.max_model_len}"
        if msg.sampling.max_tokens < 1:
            return "max_tokens must be >= 1"
        return self._validate_mm(msg) or self._validate_ids(msg)

    def _validate_ids(self, msg: GenerateRequest) -> str | None:
        """Ids in the vocabulary, except at media positions (mm items checked first): those
        rows are the items' embeddings, and a placeholder id may lie past the vocabulary
        (Ultravox's audio_token_index); the runner never looks them up."""
        ids = msg.prompt_token_ids
        if min(ids) >= 0 and max(ids) < self.vocab_size:
            return None  # the common case, in C: no per-token Python loop over a long prompt
        spans = [(m.offset, m.offset + m.length) for m in msg.mm_items]
        for i, t in enumerate(ids):
            if t < 0 or (t >= self.vocab_size and not any(a <= i < b for a, b in spans)):
                return (f"prompt token ids must be in [0, {self.vocab_size}) outside media "
                        "items")
        return None

    def add_request(self, msg: GenerateRequest) -> str | None:
        """Queue a request; returns an error message instead when it can't be served."""
        err = self.validate(msg)
        if err is None:
            self.scheduler.add_request(Request.from_msg(msg))
            if msg.mm_items:
                keys = [item.key for item in msg.mm_items]
                self.embeds.ref(keys)  # pinned from now on, even before they arrive
                self.req_keys[msg.request_id] = keys
        return err

    def abort(self, request_ids: list[str]) -> None:
        self.scheduler.abort_requests(request_ids)
        for rid in request_ids:
            self._release(rid)

    def _release(self, request_id: str) -> None:
        for key in self.embeds.unref(self.req_keys.pop(request_id, [])):
            if key in self.host_copies:
                self.embeds.put(key, self.host_copies.pop(key))
            if key in self.worker_keys:
                self.worker_keys.discard(key)
                self.pending_free.append(key)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.in_flight)

    def step(self) -> list[TokenOutput]:
        """Schedule and send one step; apply the results of the steps before it (with
        asynchronous scheduling the one just sent stays in flight)."""
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        sent = not out.is_empty
        if sent:
            frames = self._attach_embeddings(out)
            prefills = self._mark_scheduled(out) if timeline.enabled() else []
            self.in_flight.append((out, self.executor.execute_async(out, frames)))
            for rid in prefills:  # launched on a GPU; computed by an in-process CPU runner
                timeline.mark("prefill_launched", rid)
        outputs: list[TokenOutput] = []
        keep = 1 if sent and self.async_scheduling else 0
        while len(self.in_flight) > keep:
            done, result = self.in_flight.popleft()
            outputs += self.scheduler.update_from_output(done, result.result())
            self.num_applied += 1
        for o in outputs:
            if o.finish_reason is not None:
                self._release(o.request_id)
            if o.queue_seconds is not None:  # set on a request's first output only
                timeline.mark("first_token", o.request_id)
        if sent or outputs:
            self.step_seconds += time.perf_counter() - t0
        return outputs

    def _mark_scheduled(self, out: SchedulerOutput) -> list[str]:
        """Timeline: the requests this step schedules first, and those whose last prompt token
        it computes (it samples their first token: a later step when the media came late).
        Returns the latter."""
        for r in out.new_requests:
            timeline.mark("first_scheduled", r.request_id)
        prefills = []
        for rid, n in out.num_scheduled_tokens.items():
            req = self.scheduler.requests[rid]
            if req.num_computed_tokens - n < req.num_prompt_tokens <= req.num_computed_tokens:
                timeline.mark("prefill_scheduled", rid)
                prefills.append(rid)
        return prefills

    def _attach_embeddings(self, out) -> list:
        """Send the workers each embedding this step's tokens need, once; drop released ones.
        Returns the step's extra frames (the embeddings' bytes, zero-copy)."""
        out.freed_embeddings, self.pending_free = self.pending_free, []
        bad: list[str] = []
        tensors = {}
        in_process = self.executor.local_device is not None
        for rid, n in out.num_scheduled_tokens.items():
            req = self.scheduler.requests[rid]
            start = req.num_computed_tokens - n  # advanced: this step computes [start, start+n)
            for item in req.mm_items:
                if item.offset >= start + n or item.offset + item.length <= start:
                    continue
                if item.key in self.worker_keys:
                    continue
                tensor = self.embeds.get(item.key)
                if tensor.shape[0] != item.length:
                    self.errors.append((rid, 400, f"the embedding of {item.key} has "
                                        f"{tensor.shape[0]} rows but the prompt reserves "
                                        f"{item.length} positions for it"))
                    bad.append(rid)
                    break
                # Host frames, which any executor can send; an in-process runner takes a
                # device tensor as it is.
                tensors[item.key] = tensor if in_process else tensor.cpu()
                self.worker_keys.add(item.key)
                if item.key in self.host_copies:  # the runner holds the device tensor now
                    self.embeds.put(item.key, self.host_copies.pop(item.key))
        if bad:
            # Rare (a uuid reused for different media): drop those requests from this step.
            self.abort(bad)
            for rid in bad:
                out.total_num_scheduled_tokens -= out.num_scheduled_tokens.pop(rid)
            out.new_requests = [r for r in out.new_requests if r.request_id not in bad]
            out.cached_requests = [r for r in out.cached_requests if r.request_id not in bad]
        frames: list = []
        out.embeddings = tensor_frames(tensors, frames, device=in_process)
        return frames

    def replace_executor(self, executor: Executor) -> None:
        """Serve on a fresh TP group (the old one failed, its requests already answered):
        nothing the old workers held on their devices is there any more."""
        self.executor = executor
        self.in_flight.clear()  # the old group's steps: their requests are answered already
        self.abort(list(self.scheduler.requests))  # none are left unless a caller kept some
        self.kv.reset_prefix_cache()  # the cached blocks' KV lived in the dead workers
        self.worker_keys.clear()  # so did the embeddings they had been sent
        self.pending_free.clear()

    def stats(self) -> EngineStats:
        return msgspec.structs.replace(self.scheduler.stats(), step_seconds=self.step_seconds)

    def shutdown(self) -> None:
        self.executor.shutdown()
