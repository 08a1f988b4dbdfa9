"""The engine core: scheduler + executor, and the busy loop that serves them over ZeroMQ.

`EngineCore` is socket-free (the offline `LLM` drives it directly). With asynchronous
scheduling its `step()` schedules and queues step N+1 before it waits for step N's sampled ids,
so the host's scheduling, input staging and launches overlap the device's work; it returns step
N's outputs.
`EngineCoreProc` wraps it in the three-step loop: drain inputs, step, emit. Sockets live on
the IO threads of `llm_worker/io_threads.py`, so the loop never blocks on the network and the
forward pass never waits on it.
A TP group that fails is rebuilt by a `GroupSupervisor` while the loop goes on answering.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
import uuid
from collections import deque

import msgspec
import torch
import transformers

from llm_worker.config import LLMWorkerConfig
from llm_worker.device_inbox import make_device_inbox
from llm_worker.embedding_cache import EmbeddingCache
from llm_worker.executor import Executor, ExecutorError, StepResult, make_executor
from llm_worker.executor.supervisor import GroupSupervisor
from llm_worker.io_threads import Arrived, EngineIO, Lost
from llm_worker.kv_blocks import KVBlockManager
from llm_worker.models import get_model_class, text_config
from llm_worker.request import Request
from llm_worker.scheduler import Scheduler, SchedulerConfig
from protocol import timeline
from protocol.addresses import host_id
from protocol.codec import tensor_frames
from protocol.messages import (
    Abort,
    EngineStats,
    ErrorMsg,
    GenerateRequest,
    Heartbeat,
    Hello,
    Ready,
    Shutdown,
    TokenOutput,
    TokenOutputs,
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


class EngineCoreProc:
    """Serves one EngineCore: GenerateRequest/Abort/Hello in, TokenOutputs/Heartbeat out."""

    def __init__(self, config: LLMWorkerConfig, input_addr: str, heartbeat_s: float = 0.2,
                 embed_addr: str | None = None, debug_slow_step_s: float = 0.0):
        self.engine_id = f"engine-{uuid.uuid4().hex[:8]}"
        self.core = EngineCore(config)
        # Brings the TP group back after a failure, with the KV cache the engine is sized to.
        self.supervisor = GroupSupervisor(config, self.core.kv.num_total_blocks)
        self.model_name = config.model
        self.heartbeat_s = heartbeat_s
        self.frontends: set[str] = set()  # reply_to addresses that said Hello
        self.owner: dict[str, str] = {}  # request_id -> reply_to
        self.running = True
        device = self.core.executor.local_device
        self.io = EngineIO(input_addr, embed_addr,
                           make_device_inbox(device) if device is not None else None)
        self.inbox, self.outbox, self.receiver = self.io.inbox, self.io.outbox, self.io.receiver
        # Heartbeats come from their own thread: a long step (a big prefill, a first compile) is
        # "busy", not "dead". They carry the busy loop's latest stats (num_steps shows progress)
        # and how long the step in flight has run, from when the loop began it (None: idle).
        self._stats = self._snapshot()
        self._step_started: float | None = None
        # Fault injection for tests (MMSERVE_DEBUG_SLOW_STEP_S): the first step with work sleeps
        # this long, as a first compile would on a GPU. 0 (the default) does nothing.
        self.debug_slow_step_s = debug_slow_step_s
        threading.Thread(target=self._beat_loop, name="engine-beat", daemon=True).start()

    # -- busy loop --------------------------------------------------------------------------

    def _beat(self) -> Heartbeat:
        started = self._step_started  # read once: the busy loop may clear it meanwhile
        running = None if started is None else time.monotonic() - started
        return Heartbeat(self.engine_id, time.time(), self._stats, running)

    def _beat_loop(self) -> None:
        while self.running:
            beat = self._beat()
            for dest in tuple(self.frontends):
                self.outbox.put((dest, beat))
            time.sleep(self.heartbeat_s)

    def run(self) -> None:
        log.info("%s serving %s", self.engine_id, self.model_name)
        next_stats = 0.0
        stalled = False
        try:
            while self.running:
                # Block on the inbox when idle, and when the last step found nothing to run
                # (every request waits for an embedding): only an input can change that, and
                # spinning would burn a core the encoders may be sharing.
                self._drain_inputs(block=stalled or not self.core.has_work())
                self._watch_group()
                progress = self.core.scheduler.num_steps, self.core.num_applied
                self._emit(self._step())
                stalled = (self.core.scheduler.num_steps, self.core.num_applied) == progress
                now = time.monotonic()
                if now >= next_stats:  # a snapshot for the beat thread (never reads live state)
                    self._stats = self._snapshot()
                    next_stats = now + self.heartbeat_s
        finally:
            self.supervisor.close()
            self.io.close()

    def _snapshot(self) -> EngineStats:
        return msgspec.structs.replace(self.core.stats(), executor_healthy=not self.supervisor.down,
                                       executor_restarts=self.supervisor.restarts)

    def _watch_group(self) -> None:
        """Swap in a rebuilt group once it is ready; while idle, notice a worker that died
        (so /health says so before a request finds out)."""
        if self.supervisor.down:
            group = self.supervisor.take()
            if group is not None:
                self.core.replace_executor(group)
                self._stats = self._snapshot()
                log.warning("%s: TP group back (restart %d)", self.engine_id,
                            self.supervisor.restarts)
        elif not self.core.has_work():
            try:
                self.core.executor.check()
            except ExecutorError as e:
                self._group_failed(e)

    def _group_failed(self, e: ExecutorError) -> None:
        log.error("%s: TP group down (%s); starting a new one", self.engine_id, e)
        self.supervisor.failed(self.core.executor)
        self._stats = self._snapshot()  # the beats say so from now on, not at the next snapshot

    def _step(self) -> list[TokenOutput]:
        if not self.core.has_work():
            return []
        self._step_started = time.monotonic()
        try:
            if self.debug_slow_step_s:
                time.sleep(self.debug_slow_step_s)
                self.debug_slow_step_s = 0.0
            return self.core.step()
        except Exception as e:
            # A bug or a device fault: fail what is in flight (5xx, no internals to clients)
            # and keep serving; a broken device (or a failed TP group) fails the next step the
            # same way.
            ids = list(self.core.scheduler.requests)
            self.core.in_flight.clear()  # their results are lost with the failed step
            if isinstance(e, ExecutorError):  # the executor logged the cause when it failed
                log.error("engine step failed (%s); failing %d requests", e, len(ids))
                self._group_failed(e)
            else:
                log.exception("engine step failed; failing %d requests", len(ids))
            self.core.abort(ids)
            for rid in ids:
                dest = self.owner.pop(rid, None)
                if dest is not None:
                    self.outbox.put((dest, ErrorMsg(rid, 500, "engine step failed")))
            return []
        finally:
            self._step_started = None

    def _drain_inputs(self, block: bool) -> None:
        try:
            if block:
                self._handle(self.inbox.get(timeout=self.heartbeat_s))
            while True:
                self._handle(self.inbox.get_nowait())
        except queue.Empty:
            pass

    def _handle(self, msg) -> None:
        if isinstance(msg, Arrived):
            err = self.core.add_embedding(*msg)
            if err is not None:
                log.warning("dropped embedding: %s", err)
        elif isinstance(msg, Lost):
            self.core.embedding_lost(*msg)
        elif isinstance(msg, GenerateRequest):
            if self.supervisor.down:  # fail fast: nothing could run it until the group is back
                self.outbox.put((msg.reply_to, ErrorMsg(
                    msg.request_id, 503, "the decoder group is restarting; retry later")))
                return
            if msg.request_id in self.owner:
                err = f"duplicate request id {msg.request_id}"
            else:
                err = self.core.add_request(msg)
            if err is not None:
                log.info("rejected %s: %s", msg.request_id, err)
                self.outbox.put((msg.reply_to, ErrorMsg(msg.request_id, 400, err)))
            else:
                self.owner[msg.request_id] = msg.reply_to
        elif isinstance(msg, Abort):
            ids = [r for r in msg.request_ids if r in self.owner]
            self.core.abort(ids)
            for r in ids:
                del self.owner[r]
            if ids:
                log.info("aborted %s", ",".join(ids))
        elif isinstance(msg, Hello):
            self.frontends.add(msg.reply_to)
            self.outbox.put((msg.reply_to, self._ready()))
            # A beat right behind Ready (same socket, so in order): a frontend that calls the
            # engine ready has its stats too, and /metrics never shows a ready engine as 0s.
            self.outbox.put((msg.reply_to, self._beat()))
        elif isinstance(msg, Shutdown):
            self.running = False
        else:
            log.warning("unexpected %s on the engine input", type(msg).__name__)

    def _ready(self) -> Ready:
        return Ready(
            engine_id=self.engine_id,
            model=self.model_name,
            max_model_len=self.core.max_model_len,
            vocab_size=self.core.vocab_size,
            num_total_blocks=self.core.kv.num_total_blocks,
            block_size=self.core.config.block_size,
            embed_addr=self.io.embed_addr,
            hidden_size=self.core.hidden_size,
            embed_local=self.io.embed_local,
            host=host_id() if self.io.embed_local else "",
            gpus=[self.io.device_inbox.gpu] if self.io.device_inbox is not None else [],
        )

    def _emit(self, outputs: list[TokenOutput]) -> None:
        for rid, status, message in self.core.errors:
            dest = self.owner.pop(rid, None)
            if dest is not None:
                self.outbox.put((dest, ErrorMsg(rid, status, message)))
        self.core.errors.clear()
        by_dest: dict[str, list[TokenOutput]] = {}
        for o in outputs:
            dest = self.owner.get(o.request_id)
            if dest is None:
                continue
            by_dest.setdefault(dest, []).append(o)
            if o.finish_reason is not None:
                del self.owner[o.request_id]
        for dest, outs in by_dest.items():
            self.outbox.put((dest, TokenOutputs(outs)))


def run_engine_core(config: LLMWorkerConfig, input_addr: str, embed_addr: str | None = None,
                    debug_slow_step_s: float = 0.0,
                    metrics_addr: tuple[str, int] | None = None) -> None:
    """Serve until Shutdown; with ``metrics_addr`` (host, port), also serve this engine's
    Prometheus metrics there (read from the snapshot the heartbeats carry)."""
    proc = EngineCoreProc(config, input_addr, embed_addr=embed_addr,
                          debug_slow_step_s=debug_slow_step_s)
    # SIGTERM ends the loop (within a heartbeat period, or when the step in hand is done), so
    # the finally blocks run: the TP workers stop and the Unix socket's folder goes.
    signal.signal(signal.SIGTERM, lambda *_: setattr(proc, "running", False))
    if metrics_addr is not None:
        # The names live with the frontend's, so a scrape of any role reads alike.
        from frontend.role_metrics import RoleCollector, serve_role_metrics

        serve_role_metrics(metrics_addr, RoleCollector(config.model, engine=lambda: proc._stats))
    try:
        proc.run()
    finally:
        proc.core.shutdown()
