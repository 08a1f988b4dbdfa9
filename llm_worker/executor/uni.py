"""TP=1 in the engine-core process: no IPC between scheduling and the forward pass."""

from __future__ import annotations

from llm_worker.config import LLMWorkerConfig
from llm_worker.executor import Executor
from llm_worker.sched_output import ModelRunnerOutput, SchedulerOutput
from llm_worker.worker import Worker


class UniExecutor(Executor):
    def __init__(self, config: LLMWorkerConfig):
        super().__init__(config)
        self.worker = Worker(config, rank=0)

    def num_available_blocks(self) -> int:
        return self.worker.num_available_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks)

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute(out)

    @property
    def vocab_size(self) -> int:
        return self.worker.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.worker.max_model_len

    @property
    def hidden_size(self) -> int:
        return self.worker.runner.model.hidden_size
