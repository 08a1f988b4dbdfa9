"""The model runner of one TP worker: turns a SchedulerOutput delta into one forward + sample.

It keeps its own copy of each request's token ids and block table (the scheduler only sends what
changed) and fixed-address input buffers, so a step allocates no new device tensors for inputs
(which is also what CUDA-graph replay will need).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from llm_worker.attention import ATTENTION_BACKENDS, AttentionMetadata
from llm_worker.sampling import Sampler, SamplingRow
from llm_worker.sched_output import ModelRunnerOutput, NewRequestData, SchedulerOutput
from llm_worker.weights import load_model
from protocol.messages import MMItem, Sampling

log = logging.getLogger(__name__)


@dataclass
class _ReqState:
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: Sampling
    block_ids: list[int]
    num_computed_tokens: int
    mm_items: list[MMItem] = field(default_factory=list)
    generator: torch.Generator | None = None
    # Token ids kept out of the sample until min_tokens outputs exist (EOS and stop ids).
    min_tokens_block: tuple[int, ...] = ()


class ModelRunner:
    def __init__(
        self,
        model_dir: str,
        hf_config,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        block_size: int,
        attention_backend: str = "torch",
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        self.device, self.dtype = device, dtype
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_batched_tokens
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.attn_backend = ATTENTION_BACKENDS[attention_backend]()
        self.model = load_model(
            model_dir, hf_config, dtype=dtype, device=device,
            tp_rank=tp_rank, tp_size=tp_size, attn_backend=self.attn_backend,
            max_model_len=max_model_len,
        )
        self.vocab_size = self.model.vocab_size
        self.sampler = Sampler(self.vocab_size, device)
        self.kv_caches: list[torch.Tensor] = []
        self.requests: dict[str, _ReqState] = {}
        self.embeddings: dict[str, torch.Tensor] = {}  # mm key -> [num_tokens, hidden] on device
        self._alloc_buffers()

    def _alloc_buffers(self) -> None:
        t, s, b = self.max_num_tokens, self.max_num_seqs, self.max_blocks_per_seq
        pin = self.device.type == "cuda"
        # Host staging (pinned on CUDA so the copies are async) + device buffers at fixed addresses.
        self.cpu_ids = torch.zeros(t, dtype=torch.int64, pin_memory=pin)
        self.cpu_pos = torch.zeros(t, dtype=torch.int64, pin_memory=pin)
        self.cpu_slots = torch.zeros(t, dtype=torch.int64, pin_memory=pin)
        self.cpu_qstart = torch.zeros(s + 1, dtype=torch.int32, pin_memory=pin)
        self.cpu_seqlens = torch.zeros(s, dtype=torch.int32, pin_memory=pin)
        self.cpu_blocks = torch.zeros(s, b, dtype=torch.int32, pin_memory=pin)
        self.input_ids = torch.zeros(t, dtype=torch.int64, device=self.device)
        self.positions = torch.zeros(t, dtype=torch.int64, device=self.device)
        self.slot_mapping = torch.zeros(t, dtype=torch.int64, device=self.device)
        self.query_start_loc = torch.zeros(s + 1, dtype=torch.int32, device=self.device)
        self.seq_lens = torch.zeros(s, dtype=torch.int32, device=self.device)
        self.block_tables = torch.zeros(s, b, dtype=torch.int32, device=self.device)

    # -- KV cache ---------------------------------------------------------------------------

    def kv_block_bytes(self) -> int:
        m = self.model
        per_layer = 2 * self.block_size * m.num_kv_heads * m.head_dim
        return per_layer * m.num_layers * torch.tensor([], dtype=self.dtype).element_size()

    def init_kv_cache(self, num_blocks: int) -> None:
        m = self.model
        shape = (2, num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(m.num_layers)
        ]

    # -- one step ---------------------------------------------------------------------------

    def _update_states(self, out: SchedulerOutput) -> None:
        for key in out.freed_embeddings:
            self.embeddings.pop(key, None)
        for key, tensor in out.embeddings.items():
            self.embeddings[key] = tensor.to(self.device, self.dtype, non_blocking=True)
        for rid in out.finished_request_ids:
            self.requests.pop(rid, None)
        for new in out.new_requests:
            self._add(new)
        for c in out.cached_requests:
            st = self.requests[c.request_id]
            st.block_ids.extend(c.new_block_ids)
            st.num_computed_tokens = c.num_computed_tokens

    def _add(self, new: NewRequestData) -> None:
        old = self.requests.get(new.request_id)  # resumed after preemption: keep its RNG stream
        gen = old.generator if old is not None else None
        if gen is None and new.sampling.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(new.sampling.seed)
        self.requests[new.request_id] = _ReqState(
            token_ids=list(new.token_ids),
            num_prompt_tokens=new.num_prompt_tokens,
            sampling=new.sampling,
            block_ids=list(new.block_ids),
            num_computed_tokens=new.num_computed_tokens,
            mm_items=list(new.mm_items),
            generator=gen,
            min_tokens_block=_stop_ids(new.sampling, new.eos_token_ids),
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(out)
        if not out.num_scheduled_tokens:
            return ModelRunnerOutput(sampled_token_ids={}, logprobs={})
        ids_np, pos_np = self.cpu_ids.numpy(), self.cpu_pos.numpy()
        slots_np, blocks_np = self.cpu_slots.numpy(), self.cpu_blocks.numpy()
        qstart, seqlens = [0], []
        sample_rows: list[str] = []
        splices: list[tuple[int, str, int, int]] = []  # (batch row, mm key, item row, count)
        t = 0
        for row, (rid, n) in enumerate(out.num_scheduled_tokens.items()):
            st = self.requests[rid]
            start = st.num_computed_tokens
            for item in st.mm_items:  # placeholder positions computed this step take embeddings
                a, b = max(item.offset, start), min(item.offset + item.length, start + n)
                if a < b:
                    splices.append((t + a - start, item.key, a - item.offset, b - a))
            ids_np[t : t + n] = st.token_ids[start : start + n]
            pos = np.arange(start, start + n)
            pos_np[t : t + n] = pos
            table = np.asarray(st.block_ids, dtype=np.int64)
            slots_np[t : t + n] = table[pos // self.block_size] * self.block_size + pos % self.block_size
            blocks_np[row, : len(table)] = table
            t += n
            qstart.append(t)
            seqlens.append(start + n)
            if start + n == len(st.token_ids):  # the prompt (or chunk chain) is complete: sample
                sample_rows.append(rid)
        num_seqs = len(seqlens)
        self.cpu_qstart[: num_seqs + 1] = torch.tensor(qstart, dtype=torch.int32)
        self.cpu_seqlens[:num_seqs] = torch.tensor(seqlens, dtype=torch.int32)
        nb = max(-(-s // self.block_size) for s in seqlens)
        self._copy_inputs(t, num_seqs, nb)
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:t],
            query_start_loc=self.query_start_loc[: num_seqs + 1],
            seq_lens=self.seq_lens[:num_seqs],
            block_tables=self.block_tables[:num_seqs, :nb],
            query_start_loc_cpu=qstart,
            seq_lens_cpu=seqlens,
            max_query_len=max(b - a for a, b in zip(qstart, qstart[1:])),
            max_seq_len=max(seqlens),
        )
        embeds = None
        if splices:
            embeds = self.model.embed_tokens(self.input_ids[:t])  # [t, hidden]
            for dst, key, src, count in splices:
                embeds[dst : dst + count] = self.embeddings[key][src : src + count]
        hidden = self.model(self.input_ids[:t], self.positions[:t], self.kv_caches, meta,
                            inputs_embeds=embeds)
        return self._sample(out, hidden, qstart, sample_rows)

    def _copy_inputs(self, t: int, num_seqs: int, nb: int) -> None:
        nb_ = self.non_blocking = self.device.type == "cuda"
        self.input_ids[:t].copy_(self.cpu_ids[:t], non_blocking=nb_)
        self.positions[:t].copy_(self.cpu_pos[:t], non_blocking=nb_)
        self.slot_mapping[:t].copy_(self.cpu_slots[:t], non_blocking=nb_)
        self.query_start_loc[: num_seqs + 1].copy_(self.cpu_qstart[: num_seqs + 1], non_blocking=nb_)
        self.seq_lens[:num_seqs].copy_(self.cpu_seqlens[:num_seqs], non_blocking=nb_)
        self.block_tables[:num_seqs, :nb].copy_(self.cpu_blocks[:num_seqs, :nb], non_blocking=nb_)

    def _sample(
        self, out: SchedulerOutput, hidden: torch.Tensor, qstart: list[int], sample_rows: list[str]
    ) -> ModelRunnerOutput:
        if not sample_rows:
            return ModelRunnerOutput(sampled_token_ids={}, logprobs={})
        order = {rid: i for i, rid in enumerate(out.num_scheduled_tokens)}
        last = torch.tensor([qstart[order[r] + 1] - 1 for r in sample_rows], device=self.device)
        logits = self.model.compute_logits(hidden[last])  # [num_sampled, vocab]
        rows = []
        for rid in sample_rows:
            st = self.requests[rid]
            num_out = len(st.token_ids) - st.num_prompt_tokens
            rows.append(
                SamplingRow(
                    params=st.sampling,
                    prompt_ids=st.token_ids[: st.num_prompt_tokens],
                    output_ids=st.token_ids[st.num_prompt_tokens :],
                    generator=st.generator,
                    blocked_ids=st.min_tokens_block if num_out < st.sampling.min_tokens else (),
                )
            )
        tokens, lps = self.sampler(logits, rows)
        sampled: dict[str, int] = {}
        logprobs = {}
        for rid, tok, lp in zip(sample_rows, tokens, lps):
            self.requests[rid].token_ids.append(tok)
            sampled[rid] = tok
            if lp is not None:
                logprobs[rid] = lp
        return ModelRunnerOutput(sampled_token_ids=sampled, logprobs=logprobs)


def _stop_ids(sampling: Sampling, eos_token_ids: tuple[int, ...]) -> tuple[int, ...]:
    """What min_tokens keeps out (vLLM's rule): the stop token ids, and EOS unless ignored."""
    if sampling.min_tokens <= 0:
        return ()
    ids = list(sampling.stop_token_ids)
    if not sampling.ignore_eos:
        ids += eos_token_ids
    return tuple(dict.fromkeys(ids))
