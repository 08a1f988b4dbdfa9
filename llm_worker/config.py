"""Configuration of the decoder role (engine core + executor + TP workers)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from llm_worker.models import model_class_path
from protocol.checkpoint import max_positions, resolve_device, resolve_dtype

DTYPES = ("float32", "float16", "bfloat16")
# auto: uni for one worker, mp for a TP group (llm_worker/executor/).
EXECUTORS = ("auto", "uni", "mp", "ray")
# Ray placement group strategies: STRICT_PACK keeps a group on one node (NVLink, no cross-host
# collectives); SPREAD lets it span nodes.
PLACEMENTS = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")
ATTENTION_BACKENDS = ("auto", "torch", "triton")  # auto: triton where it runs, else torch


# Each field is a flag of `mmserve llm-worker` and `mmserve serve` and a keyword of LLM()
# (protocol/config_flags.py); metadata keeps vLLM's flag names, comments are the help.
@dataclass(frozen=True)
class LLMWorkerConfig:
    model: str  # local Hugging Face checkpoint folder
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill)
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory_gb / GPU free memory
    kv_cache_memory_gb: float = 1.0  # CPU only: memory for the KV cache
    embedding_cache_gb: float = 1.0  # host memory for media embeddings (LRU beyond live requests)
    gpu_memory_utilization: float = 0.85
    # Reuse the KV blocks of a prompt prefix seen before (on by default).
    enable_prefix_caching: bool = field(default=True,
                                        metadata={"no_aliases": ("--no-prefix-caching",)})
    dtype: str = field(default="auto", metadata={"choices": ("auto", *DTYPES),
                       "help": "auto: bfloat16 on CUDA, float32 on CPU"})
    device: str = "auto"  # auto, cpu, cuda (cuda:N with one worker); auto: cuda if available
    # Workers of the decoder group, each holding 1/N of every layer.
    tensor_parallel_size: int = field(default=1, metadata={"aliases": ("-tp",)})
    # True: no CUDA graphs, every decode step launches its kernels eagerly (as vLLM's flag).
    # `serve` hands the same flag to its encoders (EncoderConfig.cuda_graphs).
    enforce_eager: bool = field(default=False, metadata={"shared": True})
    executor: str = field(default="auto", metadata={"choices": EXECUTORS, "help": (
        "how the TP workers run: uni (in the engine process, TP=1), mp (one process each), ray "
        "(one Ray actor each, in a placement group; needs mmserve[ray]); auto: uni for TP=1, "
        "else mp")})
    ray_placement: str = field(default="STRICT_PACK", metadata={
        "choices": PLACEMENTS, "help": "executor ray: how the group's bundles are placed"})
    attention_backend: str = field(default="auto", metadata={
        "choices": ATTENTION_BACKENDS, "help": "auto: triton where it runs, else torch"})
    # Schedule step N+1 while step N runs on the device (its sampled ids stay there as N+1's
    # inputs), so the host's share of a step overlaps the GPU's. auto: on for one worker (uni
    # executor) on CUDA; off: every step waits for its result before the next is scheduled
    async_scheduling: str = field(default="auto", metadata={"choices": ("auto", "on", "off")})
    # mp / ray: a TP worker silent this long (no heartbeat: stopped or wedged) while the engine
    # waits on a step fails the group, as a dead one does; 0: only the collective timeout
    tp_worker_timeout_s: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model: no config.json in {self.model!r} (a local HF checkpoint folder)")
        try:
            model_class_path(self.hf_config_dict())
        except ValueError as e:
            raise ValueError(f"{self.model}: {e}") from None
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be >= block_size")
        if self.block_size not in (8, 16, 32, 64):
            raise ValueError("block_size must be 8, 16, 32 or 64")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be auto or one of {DTYPES}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        self._check_parallel()
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        self.resolved_max_model_len()  # checks it against the checkpoint

    def _check_parallel(self) -> None:
        tp = self.tensor_parallel_size
        if tp < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")
        if self.ray_placement not in PLACEMENTS:
            raise ValueError(f"ray_placement must be one of {PLACEMENTS}, got "
                             f"{self.ray_placement!r}")
        if self.async_scheduling not in ("auto", "on", "off"):
            raise ValueError("async_scheduling must be auto, on or off, got "
                             f"{self.async_scheduling!r}")
        if self.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise ValueError("executor 'ray' needs Ray: pip install 'mmserve[ray]'")
        if tp > 1 and self.executor == "uni":
            raise ValueError("executor 'uni' runs one worker inside the engine process: "
                             f"tensor_parallel_size {tp} needs executor 'mp' or 'ray'")
        if self.resolved_executor() != "uni" and self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device} names one GPU, but each worker process "
                             "takes its own: use device cuda (or auto) and pick the GPUs with "
                             "CUDA_VISIBLE_DEVICES")
        # Every shard must be whole: checked here, before a worker process starts.
        text = self.hf_config_dict()
        text = text.get("text_config") or text
        heads, kv = text.get("num_attention_heads"), text.get("num_key_value_heads")
        kv = kv or heads
        for name, n in (("num_attention_heads", heads),
                        ("intermediate_size", text.get("intermediate_size"))):
            if n is not None and n % tp:
                raise ValueError(f"{name}={n} is not divisible by tensor_parallel_size={tp}")
        if kv is not None and kv % tp and tp % kv:
            raise ValueError(f"num_key_value_heads={kv} and tensor_parallel_size={tp}: one "
                             "must divide the other")

    def resolved_executor(self) -> str:
        if self.executor != "auto":
            return self.executor
        return "uni" if self.tensor_parallel_size == 1 else "mp"

    def resolved_async_scheduling(self) -> bool:
        """Only the in-process worker runs steps asynchronously; a TP group's steps (mp, ray)
        are answered synchronously whatever this says."""
        if self.async_scheduling != "auto":
            return self.async_scheduling == "on"
        return self.resolved_executor() == "uni" and self.resolved_device().startswith("cuda")

    def hf_config_dict(self) -> dict:
        return json.loads((Path(self.model) / "config.json").read_text())

    def resolved_device(self) -> str:
        return resolve_device(self.device)

    def resolved_dtype(self) -> str:
        return resolve_dtype(self.dtype, self.device)

    def resolved_max_model_len(self) -> int:
        limit = max_positions(self.model)
        if self.max_model_len is None:
            return limit
        if self.max_model_len > limit:
            # RoPE beyond the trained positions silently degrades output: refuse, don't guess.
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {limit}")
        return self.max_model_len
