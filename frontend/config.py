"""Configuration of the API tier (one frontend replica), built from the CLI in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from protocol.addresses import LOOPBACK

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class FrontendConfig:
    model: str  # local Hugging Face checkpoint folder (tokenizer, chat template, generation config)
    # Names clients may put in `model`; the first one is reported by /v1/models and in responses.
    served_model_name: tuple[str, ...] | list[str] | str | None = None
    host: str = LOOPBACK
    port: int = 8000
    engine_addr: str | None = None  # the engine core's input address (tcp://host:port)
    tokenizer: str | None = None  # None: the model folder
    chat_template: str | None = None  # a Jinja file, or None for the tokenizer's own template
    max_n: int = 16
    max_logprobs: int = 20
    response_role: str = "assistant"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies answer 413
    engine_ready_timeout_s: float = 0.0  # how long a request waits for a starting engine (0: 503)
    # Where engines push outputs to this frontend; None: a free loopback port. Another host's
    # engine needs an address it can reach (explicit config, never a default).
    reply_addr: str | None = None

    def __post_init__(self) -> None:
        if not Path(self.model).is_dir():
            raise ValueError(f"model: {self.model!r} is not a local checkpoint folder")
        names = self.served_model_name
        if names is None or names == [] or names == ():
            names = (self.model,)
        elif isinstance(names, str):
            names = (names,)
        names = tuple(names)
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError("served_model_name: names must be non-empty strings")
        # Frozen: normalizing a field in __post_init__ needs object.__setattr__.
        object.__setattr__(self, "served_model_name", names)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.engine_addr is not None and not self.engine_addr.startswith(
            ("tcp://", "ipc://", "inproc://")
        ):
            raise ValueError(f"engine_addr must be a zmq address (tcp://...), got {self.engine_addr!r}")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ValueError(f"chat_template: no such file {self.chat_template!r}")
        if self.tokenizer is not None and not Path(self.tokenizer).is_dir():
            raise ValueError(f"tokenizer: {self.tokenizer!r} is not a folder")
        if self.max_n < 1:
            raise ValueError("max_n must be >= 1")
        if self.max_logprobs < 0:
            raise ValueError("max_logprobs must be >= 0")
        if not self.response_role:
            raise ValueError("response_role must be non-empty")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if self.reply_addr is not None and not self.reply_addr.startswith(("tcp://", "ipc://")):
            raise ValueError(f"reply_addr must be a zmq address (tcp://...), got {self.reply_addr!r}")
        if self.engine_ready_timeout_s < 0:
            raise ValueError("engine_ready_timeout_s must be >= 0")

    @property
    def model_name(self) -> str:
        """The primary served name."""
        return self.served_model_name[0]  # type: ignore[index]

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model
