"""Executors run the TP workers: `uni` in-process now; `mp` and `ray` drop in behind the same ABC."""

from __future__ import annotations

from abc import ABC, abstractmethod

from llm_worker.config import LLMWorkerConfig
from llm_worker.sched_output import ModelRunnerOutput, SchedulerOutput


class Executor(ABC):
    """Owns the TP group of one decoder replica. Every worker gets the same SchedulerOutput;
    rank 0's ModelRunnerOutput is the answer."""

    def __init__(self, config: LLMWorkerConfig):
        self.config = config

    @abstractmethod
    def num_available_blocks(self) -> int:
        """KV blocks every worker can hold (the minimum over ranks)."""

    @abstractmethod
    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate the cache, then warm up (kernels compiled, decode graphs captured): the
        engine reports ready only after this returns."""

    @abstractmethod
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def max_model_len(self) -> int: ...

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of the LM's input embeddings (what media embeddings must match)."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook, most executors hold nothing
        """Release workers and devices."""


def make_executor(config: LLMWorkerConfig) -> Executor:
    from llm_worker.executor.uni import UniExecutor

    executors: dict[str, type[Executor]] = {"uni": UniExecutor}
    if config.executor not in executors:
        raise ValueError(f"executor must be one of {sorted(executors)}, got {config.executor!r}")
    return executors[config.executor](config)
