"""What the engine core tells its TP workers each step, what they answer, and their handshake.

Deltas, not state: a request's tokens, sampling params and block table travel once (when it is
first scheduled, or when it resumes after preemption); afterwards a step only carries its new
blocks and where its computation starts. Workers keep their own per-request token lists and
append the tokens they sample.

A step is one message, framed once (`protocol.codec.encode`) and sent to every worker of the
group; media embeddings ride as extra zero-copy frames (``SchedulerOutput.embeddings`` holds
their `TensorRef`s, `protocol.codec.tensor_frames` makes both). The same Structs pass in-process (the `uni` executor) with the frames as a
plain list, so one worker loop serves every executor.
"""

from __future__ import annotations

import msgspec

from protocol.messages import (
    MMItem,
    MsgType,
    Sampling,
    TensorRef,
    TokenLogprobs,
    _Data,
    _Handshake,
)


class NewRequestData(_Data):
    """A request the worker must (re)create. A resumed request was preempted by recompute: the
    worker replaces its old state; ``token_ids`` is prompt + outputs so far, all to recompute."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: Sampling
    block_ids: list[int]  # the whole block table, prefix-cache hits first
    num_computed_tokens: int  # prefix-cache hit: KV already in block_ids; compute from here
    mm_items: list[MMItem] = []
    # Ids that end generation (the sampler keeps them out until min_tokens is reached).
    eos_token_ids: tuple[int, ...] = ()


class CachedRequestData(_Data):
    """A request the worker already knows, scheduled again this step."""

    request_id: str
    new_block_ids: list[int]  # append to the worker's block table
    num_computed_tokens: int  # before this step: this step's tokens start at this position


class SchedulerOutput(_Data):
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    # request_id -> tokens to compute this step. Insertion order is the batch order (msgpack
    # keeps it): requests that were already running first (oldest first), then the new ones.
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Finished or aborted since the last step: the worker may drop their state.
    finished_request_ids: set[str] = set()
    # Preempted this step (blocks freed). They resume later as NewRequestData; a worker may
    # drop their state now, but should keep e.g. a seeded RNG stream to resume it.
    preempted_request_ids: set[str] = set()
    # Media embeddings the worker must hold from now on (key -> [num_tokens, hidden] as an
    # extra frame of this message), and keys no running request needs any more. Sent once each.
    embeddings: dict[str, TensorRef] = {}
    freed_embeddings: list[str] = []

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


class ModelRunnerOutput(_Data):
    # Only requests whose tokens are all computed after this step get a token
    # (num_computed_tokens + scheduled == len(token ids)); a prefill chunk that is not the
    # last gets none.
    sampled_token_ids: dict[str, int]
    # Only for requests that asked for logprobs (Sampling.logprobs is not None).
    logprobs: dict[str, TokenLogprobs] = {}


class WorkerInfo(_Handshake):
    """Worker -> engine, once its shard is loaded: what the engine sizes itself by."""

    rank: int
    vocab_size: int
    max_model_len: int
    hidden_size: int
    num_available_blocks: int  # KV blocks this rank can hold; the group takes the minimum


class InitKVCache(_Handshake):
    """Engine -> every worker: allocate this many KV blocks, then warm up."""

    num_blocks: int


class WorkerAck(_Handshake):
    """Worker -> engine: a control message is done, or (``error`` set) this worker failed and
    is exiting; the engine then fails the group."""

    rank: int
    error: str = ""


class WorkerBeat(_Handshake):
    """Worker -> engine, from a thread beside the step loop, every `WORKER_BEAT_S`: the process
    still runs. A long step keeps beating (busy); a stopped or wedged process does not (hung)."""

    rank: int


WORKER_BEAT_S = 0.5

STEP_MESSAGE_TYPES: dict[MsgType, type[msgspec.Struct]] = {
    MsgType.SCHEDULER_OUTPUT: SchedulerOutput,
    MsgType.RUNNER_OUTPUT: ModelRunnerOutput,
    MsgType.WORKER_INFO: WorkerInfo,
    MsgType.INIT_KV_CACHE: InitKVCache,
    MsgType.WORKER_ACK: WorkerAck,
    MsgType.WORKER_BEAT: WorkerBeat,
}
