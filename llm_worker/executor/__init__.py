"""Executors run the TP workers of one decoder replica: `uni` in the engine process (TP=1),
`mp` as local worker processes, `ray` as Ray actors in a placement group."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from llm_worker.config import LLMWorkerConfig
from protocol.step import ModelRunnerOutput, SchedulerOutput


class ExecutorError(RuntimeError):
    """The TP group cannot run steps any more (a worker died or failed): every later step
    raises this at once, so requests fail fast instead of waiting on a dead group."""


class StepResult:
    """A step sent to the workers: `result()` is its ModelRunnerOutput, waiting for it if the
    step still runs (the in-process runner returns before its device work is done)."""

    def __init__(self, output: ModelRunnerOutput | None):
        self.output = output

    def result(self) -> ModelRunnerOutput:
        return self.output


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
    def execute(self, out: SchedulerOutput, frames: Sequence[Any] = ()) -> ModelRunnerOutput:
        """Run one step. ``frames`` are the step's extra frames: the buffers its
        ``embeddings`` refs point at (`protocol.codec.tensor_frames`)."""

    def execute_async(self, out: SchedulerOutput, frames: Sequence[Any] = ()) -> StepResult:
        """Send one step and return before its result if the workers can (asynchronous
        scheduling); a group that answers each step before the next returns it done."""
        return StepResult(self.execute(out, frames))

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

    @property
    def local_device(self) -> Any:
        """The torch device of a runner in this process (it can take device tensors as they
        are), or None: the workers are other processes."""
        return None

    def check(self) -> None:  # noqa: B027 - an in-process worker cannot die on its own
        """Raise ExecutorError if the group has failed: lets an idle engine notice a dead
        worker before a request is sent to it."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook, most executors hold nothing
        """Release workers and devices."""


# name -> "module:Class", imported on use (Ray is optional and heavy to import).
EXECUTORS = {
    "uni": "llm_worker.executor.uni:UniExecutor",
    "mp": "llm_worker.executor.mp:MPExecutor",
    "ray": "llm_worker.executor.ray:RayExecutor",
}


def make_executor(config: LLMWorkerConfig) -> Executor:
    module, name = EXECUTORS[config.resolved_executor()].split(":")
    cls: type[Executor] = getattr(importlib.import_module(module), name)
    return cls(config)
