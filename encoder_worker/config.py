"""Configuration of the encoder role (decode + preprocess + tower + projector + embedding store)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from encoder_worker.models import ENCODER_REGISTRY
from protocol.checkpoint import resolve_device, resolve_dtype
from protocol.registry import check_registry_addr

DTYPES = ("float32", "float16", "bfloat16")


# Each field is a flag of `mmserve encoder` and `mmserve serve` (protocol/config_flags.py);
# `--encoder-` names keep them apart from the engine's and the frontend's own.
@dataclass(frozen=True)
class EncoderConfig:
    model: str  # local Hugging Face checkpoint folder
    device: str = field(default="auto", metadata={
        "flag": "--encoder-device", "help": "device of the encoder worker(s): auto (cuda if "
        "available, else cpu), cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={
        "flag": "--encoder-dtype", "choices": ("auto", *DTYPES),
        "help": "auto: bfloat16 on CUDA, float32 on CPU"})
    store_bytes: int = field(default=2 << 30, metadata={
        "flag": "--encoder-store-gb", "unit": 1 << 30,
        "help": "embedding store of each encoder (LRU by bytes), host memory, in GiB"})
    ring_bytes: int = field(default=256 << 20, metadata={
        "flag": "--encoder-device-ring-mb", "unit": 1 << 20,
        "help": "device ring (MiB) through which embeddings reach an engine on the same GPU by "
                "CUDA IPC, with no host copy on the way; 0: always send the bytes"})
    max_batch_items: int = field(default=32, metadata={
        "flag": "--encoder-max-batch-items", "help": "images per tower forward"})
    max_wait_ms: float = field(default=5.0, metadata={
        "flag": "--encoder-max-wait-ms",
        "help": "how long a ready image may wait for others to fill its batch"})
    decode_threads: int = field(default=4, metadata={
        "flag": "--encoder-decode-threads",
        "help": "decode + preprocess pool (PIL releases the GIL while decoding)"})
    max_image_pixels: int = field(default=50_000_000, metadata={
        "flag": "--encoder-max-image-pixels",
        "help": "decompression-bomb bound on the declared width * height"})
    min_image_side: int = field(default=2, metadata={
        "flag": "--encoder-min-image-side",
        "help": "thinner images can't be resized into the tower's input"})
    heartbeat_s: float = field(default=0.2, metadata={
        "flag": "--encoder-heartbeat-s",
        "help": "EncoderHeartbeat period to every frontend that said Hello"})
    # On CUDA, small batches of fixed-size inputs replay CUDA graphs; the flag is vLLM's
    # --enforce-eager (off), the same one as the engine's under `serve`.
    cuda_graphs: bool = field(default=True, metadata={
        "flag": "--enforce-eager", "invert": True, "shared": True,
        "help": "no CUDA graphs: every decoder step and tower batch launches its kernels eagerly"})
    # The pool's registry to join (`mmserve encoder --join ADDR`); None: frontends were given
    # this encoder's address.
    join: str | None = field(default=None, metadata={
        "metavar": "ADDR", "help": "join the encoder pool through its registry at ADDR (live)"})
    drain_timeout_s: float = field(default=30.0, metadata={
        "flag": "--drain-timeout",
        "help": "on SIGTERM, seconds to finish the items in hand before exiting"})

    def __post_init__(self) -> None:
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model: no config.json in {self.model!r} (a local HF checkpoint folder)")
        archs = json.loads((Path(self.model) / "config.json").read_text()).get("architectures")
        if not any(a in ENCODER_REGISTRY for a in archs or []):
            raise ValueError(f"{self.model}: no encoder for architecture {archs}; supported: "
                             f"{', '.join(sorted(ENCODER_REGISTRY))}")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be auto or one of {DTYPES}, got {self.dtype!r}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.store_bytes < 0:
            raise ValueError("store_bytes must be >= 0 (0 disables the embedding store)")
        if self.ring_bytes < 0:
            raise ValueError("ring_bytes must be >= 0 (0 disables the device ring)")
        if self.max_batch_items < 1:
            raise ValueError("max_batch_items must be >= 1")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if self.decode_threads < 1:
            raise ValueError("decode_threads must be >= 1")
        if self.max_image_pixels < 1:
            raise ValueError("max_image_pixels must be >= 1")
        if self.min_image_side < 1:
            raise ValueError("min_image_side must be >= 1")
        if self.heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be > 0")
        if self.join is not None:
            check_registry_addr(self.join, "join")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")

    def resolved_device(self) -> str:
        return resolve_device(self.device)

    def resolved_dtype(self) -> str:
        return resolve_dtype(self.dtype, self.device)
