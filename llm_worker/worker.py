"""One TP worker: picks its device, builds the model runner, sizes and allocates the KV cache."""

from __future__ import annotations

import logging

import torch
import transformers

import kernels
from llm_worker.config import LLMWorkerConfig
from llm_worker.runner import ModelRunner
from llm_worker.sched_output import ModelRunnerOutput, SchedulerOutput

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: LLMWorkerConfig, rank: int = 0):
        self.config = config
        self.rank = rank
        device = torch.device(config.resolved_device())
        if device.type == "cuda":
            device = torch.device("cuda", rank if device.index is None else device.index)
            torch.cuda.set_device(device)
        self.device = device
        torch.manual_seed(config.seed)
        # Never the checkpoint's own code (and never transformers' interactive y/N question).
        hf_config = transformers.AutoConfig.from_pretrained(config.model, trust_remote_code=False)
        self.max_model_len = config.resolved_max_model_len()
        self.runner = ModelRunner(
            config.model,
            hf_config,
            device=device,
            dtype=getattr(torch, config.resolved_dtype()),
            max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            block_size=config.block_size,
            # "auto": the Triton kernel where the dispatch table picks Triton (CUDA, unless
            # MMSERVE_KERNELS=reference), else the torch reference (SDPA per sequence).
            attention_backend=(("triton" if kernels.use_triton(device) else "torch")
                               if config.attention_backend == "auto" else config.attention_backend),
            tp_rank=rank,
            tp_size=config.tensor_parallel_size,
            enforce_eager=config.enforce_eager,
        )

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    def num_available_blocks(self) -> int:
        """KV blocks that fit: an explicit count, CPU memory budget, or free GPU memory."""
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = self.runner.kv_block_bytes()
        # Never more than every sequence at full length needs (+1 for the null block).
        cap = cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size) + 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info(self.device)
            # Leave room for activations of the largest step: rough but safe upper bound.
            reserve = 4 * cfg.max_num_batched_tokens * self.runner.model.hidden_size * 8
            budget = free - (1 - cfg.gpu_memory_utilization) * total - reserve
        else:
            budget = cfg.kv_cache_memory_gb * (1 << 30)
        return int(max(2, min(cap, budget // per_block)))

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)
        log.info("KV cache: %d blocks of %d tokens on %s", num_blocks, self.config.block_size,
                 self.device)
        if self.device.type == "cuda":  # nothing compiles or captures on CPU
            self.runner.warm_up()

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(out)
