"""One TP worker: takes its device, joins its TP group, builds the model runner, sizes and
allocates the KV cache."""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist
import transformers

import mmkernels
from llm_worker.config import LLMWorkerConfig
from llm_worker.runner import ModelRunner
from protocol.step import ModelRunnerOutput, SchedulerOutput

log = logging.getLogger(__name__)

# How long a collective may wait for a peer. A dead peer is the executor's to notice (process
# sentinels); this only bounds a rank left waiting on one that hangs.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def worker_device(config: LLMWorkerConfig) -> torch.device:
    """The device this process was given. A GPU comes from the launcher (CUDA_VISIBLE_DEVICES,
    Ray's GPU ids): without an explicit index, the first one visible, never one from the rank."""
    device = torch.device(config.resolved_device())
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    return device


def init_tp_group(rank: int, size: int, init_method: str, device: torch.device) -> None:
    """Join the TP group: NCCL between GPUs, gloo on CPU. ``init_method``: tcp://host:port of
    the rendezvous (rank 0 serves it)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # The group's ranks share this host's cores: one thread pool each of all the cores
        # would oversubscribe them tp-fold.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    log.info("rank %d of %d joined (%s on %s)", rank, size, backend, device)


class Worker:
    def __init__(self, config: LLMWorkerConfig, rank: int = 0,
                 dist_init_method: str | None = None):
        self.config = config
        self.rank = rank
        self.device = device = worker_device(config)
        tp = config.tensor_parallel_size
        if tp > 1:
            if dist_init_method is None:
                raise ValueError("a worker of a TP group needs the group's rendezvous address")
            init_tp_group(rank, tp, dist_init_method, device)
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
            attention_backend=(("triton" if mmkernels.use_triton(device) else "torch")
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

    def execute(self, out: SchedulerOutput, frames=()) -> ModelRunnerOutput:
        return self.runner.execute(out, frames)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
