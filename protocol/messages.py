"""Every message that crosses a process boundary.

Data-plane structs are ``array_like`` (positional, compact) and ``gc=False`` (no cycles, cheap to
allocate); handshakes are maps so either side can add fields. Fields are append-only: a new field
goes last and has a default, so an older peer still decodes the message.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec


class MsgType(enum.IntEnum):
    """Frame 0 of every multipart message: selects the typed decoder for frame 1."""

    HELLO = 1
    READY = 2
    HEARTBEAT = 3
    GENERATE = 4
    ABORT = 5
    TOKEN_OUTPUTS = 6
    ERROR = 7
    SHUTDOWN = 8
    ENCODE = 9
    EMBEDDING = 10
    ENCODE_DONE = 11
    ENCODER_HEARTBEAT = 12
    # Engine core <-> its TP workers (protocol/step.py).
    SCHEDULER_OUTPUT = 13
    RUNNER_OUTPUT = 14
    WORKER_INFO = 15
    INIT_KV_CACHE = 16
    WORKER_ACK = 17
    WORKER_BEAT = 18
    # The encoder pool's registry, and finding an item in an encoder's store (protocol/registry.py).
    REGISTRY_BEAT = 32
    REGISTRY_LEAVE = 33
    REGISTRY_WATCH = 34
    REGISTRY_VIEW = 35
    ITEM_LOOKUP = 36
    ITEM_FOUND = 37


class _Data(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Base of the data-plane messages (also those of protocol/step.py)."""


class _Handshake(msgspec.Struct, omit_defaults=True):
    """Base of the handshakes: maps, so either side can add fields."""


class TensorRef(_Data):
    """A tensor carried out of band: its bytes are zmq frame ``frame`` of the same message."""

    dtype: str
    shape: list[int]
    frame: int


class Sampling(_Data):
    """What the engine needs to sample. Stop strings and detokenization stay in the frontend."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # <= 0 disables
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's plus the top k


class MMItem(_Data):
    """One media item inside a prompt: its embedding (by key) fills positions
    ``[offset, offset + length)`` of the prompt's token ids."""

    key: str  # "uuid:<id>" or "blake3:<hex>"
    modality: str
    offset: int
    length: int
    meta: dict[str, Any] = {}


class GenerateRequest(_Data):
    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    eos_token_ids: list[int]
    reply_to: str  # the frontend's output address
    mm_items: list[MMItem] = []
    arrival_time: float = 0.0


class Abort(_Data):
    request_ids: list[str]


class TokenLogprobs(_Data):
    """Logprobs for one generated token: index 0 is the sampled token, then the top-k."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int] = []  # rank of the sampled token (1 = most likely), one entry


class TokenOutput(_Data):
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_token_id: int | None = None
    logprobs: list[TokenLogprobs] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first output only)
    # First output only: seconds from the request's arrival at the engine to its first schedule
    # (both on the engine's clock, so no cross-host clock skew enters the queue-time histogram).
    queue_seconds: float | None = None


class TokenOutputs(_Data):
    outputs: list[TokenOutput]


class EngineStats(_Data):
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    num_preemptions: int = 0
    num_steps: int = 0
    step_seconds: float = 0.0  # wall time inside steps that ran work (divide by num_steps)
    # The TP group: False from a worker's death until a new group serves (the engine restarts
    # it); restarts counts the groups brought back.
    executor_healthy: bool = True
    executor_restarts: int = 0


class Heartbeat(_Data):
    engine_id: str
    time: float
    stats: EngineStats  # the busy loop's latest snapshot (num_steps counts finished steps)
    # How long the step in flight has run when the beat left (None: no step running). Read live
    # by the beat thread, so a 30 s step shows as "busy" while it runs, not after.
    step_running_s: float | None = None


class ErrorMsg(_Data):
    """A request the engine could not serve; ``status`` is the HTTP status to answer with."""

    request_id: str
    status: int
    message: str


class Hello(_Handshake):
    """Frontend -> engine: 'send my outputs and heartbeats to reply_to'."""

    frontend_id: str
    reply_to: str


class Ready(_Handshake):
    """Engine -> frontend: the engine is serving; what the frontend must know about it."""

    engine_id: str
    model: str
    max_model_len: int
    vocab_size: int
    num_total_blocks: int = 0
    block_size: int = 16
    embed_addr: str = ""  # the engine's embedding inbox: encoders push Embedding messages here
    hidden_size: int = 0  # width of the LM's input embeddings (image_embeds are checked against it)
    # The same inbox as a Unix socket, for encoders on the engine's machine (`host`, its boot
    # id): 3x the throughput of loopback TCP for a 4.7 MB image embedding.
    embed_local: str = ""
    host: str = ""
    # UUIDs of the GPUs the engine's model runs on when its runner is in-process: an encoder on
    # one of them hands embeddings over on the device (`DeviceRef`), through ``embed_local``.
    gpus: list[str] = []


class Shutdown(_Handshake):
    reason: str = ""


class EncodeRequest(_Data):
    """Frontend -> encoder: make (or find) the embedding of one media item and push it to every
    address in ``deliver_to`` (decoder inboxes). ``data`` is None for a uuid-only item: a cache
    miss is then an error, since there is nothing to encode."""

    key: str
    modality: str
    data: bytes | None
    kwargs: dict[str, Any]  # media_io / processor kwargs (part of the key's hash)
    deliver_to: list[str]
    reply_to: str  # the frontend's address, for EncodeDone
    request_id: str = ""  # for logs
    # User-supplied embeddings (image_embeds), in an extra frame: the encoder stores and
    # publishes them like its own, so a uuid can reuse them later.
    embeds: TensorRef | None = None
    # What the frontend sized the prompt by (`protocol.geometry.ItemGeometry.to_meta()`:
    # num_tokens, grid_thw, resized_hw); the encoder's output must agree with it.
    geometry: dict[str, Any] | None = None
    # deliver_to address -> its Unix-socket twin, which an encoder takes when its own boot id
    # is ``deliver_host`` and it can reach the socket (`protocol.addresses.local_inbox_path`).
    deliver_local: dict[str, str] = {}
    deliver_host: str = ""
    # Unix-socket twin -> UUIDs of the GPUs behind it (`Ready.gpus`): an encoder on one of them
    # sends a `DeviceRef` there instead of the bytes.
    deliver_gpus: dict[str, list[str]] = {}


class DeviceRef(_Data):
    """An embedding left on the GPU: bytes ``[start, start + nbytes)`` (absolute positions; the
    slot is ``start % storage_bytes``) of an encoder's device ring, shared by CUDA IPC. The first
    eight fields are what `torch.UntypedStorage._share_cuda_` returns for the ring (``device`` is
    the encoder's index for it: a reader maps ``gpu`` to its own). ``guard`` is the ring's
    /dev/shm counter of bytes reserved: the slot was not overwritten while that is at most
    ``start + storage_bytes`` (`encoder_worker/device_ring.py`)."""

    device: int
    handle: bytes
    storage_bytes: int
    storage_offset: int
    ref_counter: bytes
    ref_counter_offset: int
    event: bytes
    event_sync: bool
    gpu: str
    start: int
    guard: str


class Embedding(_Data):
    """Encoder -> decoder inbox: embeddings of one item; the tensor is frame ``tensor.frame``,
    or with ``device`` a slot of the encoder's device ring (then ``tensor`` gives dtype and
    shape, and no frame is sent)."""

    key: str
    tensor: TensorRef  # [num_tokens, hidden]
    meta: dict[str, Any] = {}
    device: DeviceRef | None = None


class EncodeDone(_Data):
    """Encoder -> frontend: the item was published (status 200) or could not be (4xx/5xx)."""

    key: str
    request_id: str
    status: int
    message: str = ""
    cache_hit: bool = False


class BucketCounts(_Data):
    """A histogram as a role reports it: per-bucket counts (not cumulative) for the ascending
    upper ``bounds``, plus a last one for +Inf, and the sum of the observations. The bounds travel
    with the counts, so the frontend can fold reports from a peer built with other buckets."""

    bounds: list[float]
    counts: list[int]  # len(bounds) + 1
    sum: float = 0.0


class EncoderStats(_Data):
    num_requests: int = 0
    num_encoded: int = 0  # items that ran through the tower
    num_cache_hits: int = 0
    num_errors: int = 0
    store_bytes: int = 0
    store_items: int = 0
    # Where an encoded item's time goes (sums over items; divide by num_encoded): bytes ->
    # pixels on the decode pool, waiting for a batch, the batch's upload + tower + download (each
    # item counts its batch's time), and in all from the request's arrival to its publication.
    decode_seconds: float = 0.0
    queue_seconds: float = 0.0
    tower_seconds: float = 0.0
    item_seconds: float = 0.0
    num_batches: int = 0  # tower forwards (a packed batch of any sizes is one)
    num_cache_misses: int = 0  # lookups the store could not answer (the item encodes, or fails)
    batch_size: BucketCounts | None = None  # items per tower forward
    latency: BucketCounts | None = None  # an encoded item's seconds from arrival to publication
    num_device_handoffs: int = 0  # Embeddings sent as a DeviceRef (CUDA IPC), not as bytes


class EncoderHeartbeat(_Data):
    encoder_id: str
    time: float
    stats: EncoderStats
    addr: str = ""  # the encoder's input address, as frontends know it


MESSAGE_TYPES: dict[MsgType, type[msgspec.Struct]] = {
    MsgType.HELLO: Hello,
    MsgType.READY: Ready,
    MsgType.HEARTBEAT: Heartbeat,
    MsgType.GENERATE: GenerateRequest,
    MsgType.ABORT: Abort,
    MsgType.TOKEN_OUTPUTS: TokenOutputs,
    MsgType.ERROR: ErrorMsg,
    MsgType.SHUTDOWN: Shutdown,
    MsgType.ENCODE: EncodeRequest,
    MsgType.EMBEDDING: Embedding,
    MsgType.ENCODE_DONE: EncodeDone,
    MsgType.ENCODER_HEARTBEAT: EncoderHeartbeat,
}
TYPE_OF: dict[type[msgspec.Struct], MsgType] = {cls: t for t, cls in MESSAGE_TYPES.items()}

Message = (
    Hello | Ready | Heartbeat | GenerateRequest | Abort | TokenOutputs | ErrorMsg | Shutdown
    | EncodeRequest | Embedding | EncodeDone | EncoderHeartbeat
)
