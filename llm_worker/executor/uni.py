"""TP=1 in the engine-core process: no IPC between scheduling and the forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llm_worker.config import LLMWorkerConfig
from llm_worker.executor import Executor, StepResult
from llm_worker.worker import Worker
from protocol.step import ModelRunnerOutput, SchedulerOutput


class UniExecutor(Executor):
    def __init__(self, config: LLMWorkerConfig):
        super().__init__(config)
        self.worker = Worker(config, rank=0)

    def num_available_blocks(self) -> int:
        return self.worker.num_available_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks)

    def execute(self, out: SchedulerOutput, frames: Sequence[Any] = ()) -> ModelRunnerOutput:
        return self.worker.execute(out, frames)

    def execute_async(self, out: SchedulerOutput, frames: Sequence[Any] = ()) -> StepResult:
        return self.worker.runner.execute_async(out, frames)

    @property
    def local_device(self) -> Any:
        return self.worker.runner.device

    @property
    def vocab_size(self) -> int:
        return self.worker.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.worker.max_model_len

    @property
    def hidden_size(self) -> int:
        return self.worker.runner.model.hidden_size
