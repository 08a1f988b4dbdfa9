"""The model runner of one TP worker: turns a SchedulerOutput delta into one forward + sample.

The step is three stages, each in its own module: the input batch (`input_batch.py`: this step's
ids, positions, KV slots and block tables into persistent buffers), the forward (the attention
backend builds its metadata from those buffers; decode steps replay a CUDA graph from
`graphs.py`, everything else runs eagerly) and the sampler (`sampling.py`). `warm_up` runs every
kernel shape once and captures the graphs before the engine reports ready.

`execute_async` returns once the step is queued on the device: its sampled ids are read when
the engine asks for them (`SampledStep.result`), after it has scheduled and queued the next
step, whose inputs take them from the device (asynchronous scheduling). `execute` is the same
step waited for.

Under tensor parallelism every rank runs the same step on its shard (the same branches, so the
same collectives in the same order) and ends with the full logits (the LM head all-gathers).
Only rank 0 samples; it broadcasts the sampled ids, which every rank appends to its copy of the
request. (Sampling on every rank would need their random streams to stay in lockstep.)
"""

from __future__ import annotations

import logging
import time
from collections import deque

import numpy as np
import torch
import torch.distributed as dist

from llm_worker.attention import ATTENTION_BACKENDS, TritonAttentionBackend
from llm_worker.executor import StepResult
from llm_worker.graphs import DecodeGraphs, MixedGraphs, capture_sizes
from llm_worker.input_batch import InputBatch, PositionScheme, RequestState, StepBatch
from llm_worker.sampling import Sampler, SamplingRow
from llm_worker.weights import load_model
from protocol.codec import tensor_from
from protocol.messages import Sampling
from protocol.step import ModelRunnerOutput, NewRequestData, SchedulerOutput

log = logging.getLogger(__name__)


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
        enforce_eager: bool = False,
    ):
        self.device, self.dtype = device, dtype
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.block_size = block_size
        self.max_model_len = max_model_len
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
        self.sampler = Sampler(self.vocab_size, device, max_num_seqs)
        # The model's position scheme (M-RoPE models name one; it reads the vision settings, so
        # it gets the whole config, not the LM's); None: 1-D, token i at position i.
        scheme = getattr(self.model, "position_scheme", None)
        self.positions: PositionScheme | None = scheme(hf_config) if scheme is not None else None
        self.kv_caches: list[torch.Tensor] = []
        self.requests: dict[str, RequestState] = {}
        self.embeddings: dict[str, torch.Tensor] = {}  # mm key -> [num_tokens, hidden] on device
        self.inputs = InputBatch(
            max_num_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
            max_blocks_per_seq=self.max_blocks_per_seq, block_size=block_size, device=device,
            position_rows=self.positions.rows if self.positions is not None else 1,
        )
        # CUDA graphs need a kernel path that reads only device metadata: the Triton backend.
        # Not under TP yet: capturing the NCCL collectives is untested, so TP steps run eagerly.
        self.use_graphs = (device.type == "cuda" and not enforce_eager and tp_size == 1
                           and isinstance(self.attn_backend, TritonAttentionBackend))
        self.graphs: DecodeGraphs | None = None
        self.mixed: MixedGraphs | None = None
        # A mixed graph reads its input embeddings here (lookup + media splices run before it).
        self.embeds_buf: torch.Tensor | None = None
        # Steps whose sampled ids are still on their way to the host, oldest first.
        self.in_flight: deque[SampledStep] = deque()
        # Pinned landing slots for those ids, used in turn (at most two steps are in flight).
        pin = device.type == "cuda"
        self._landing = [torch.zeros(self.inputs.num_seq_slots, dtype=torch.int64,
                                     pin_memory=pin) for _ in range(3)]

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

    # -- warm-up ----------------------------------------------------------------------------

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run every kernel shape once (Triton compiles, cuBLAS and the allocator settle) and
        capture the decode graphs, so no served step pays for either. Dummy rows write no KV."""
        t0 = time.perf_counter()
        chunk = min(self.max_num_tokens, self.max_model_len)
        # Prefill tile configs differ by chunk length: one long chunk, and short ones in a batch
        # (within the step's token budget).
        rows = min(2, self.max_num_seqs)
        shapes = [[chunk], [max(1, min(32, chunk // rows))] * rows, [1]]
        for lens in shapes:
            self._dummy_forward(lens)
        if self.use_graphs:
            pool = torch.cuda.graph_pool_handle()  # one memory pool for every graph
            self.graphs = DecodeGraphs(self.inputs, self._decode_logits, self._graph_metadata,
                                       capture_sizes(self.max_num_seqs, self.max_num_tokens),
                                       self._decode_splits,
                                       self.max_model_len)
            self.graphs.capture(pool)
            self.mixed = MixedGraphs(self.inputs, self._mixed_logits, self.max_num_tokens)
            self.embeds_buf = torch.zeros(max(self.mixed.sizes, default=0),
                                          self.model.hidden_size, dtype=self.dtype,
                                          device=self.device)
            self.mixed.capture(pool)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("warm-up done in %.1f s", time.perf_counter() - t0)

    def _dummy_forward(self, lens: list[int]) -> None:
        """One eager step over rows of the given query lengths, prompts at position 0, every
        K/V write skipped (slot -1) and every key read from the null block."""
        b = self.inputs
        t = sum(lens)
        b.cpu_ids[:t] = 0
        b.cpu_pos[:t].view(t, -1)[:] = torch.cat([torch.arange(n) for n in lens])[:, None]
        b.cpu_slots[:t] = -1
        b.cpu_blocks[: len(lens)] = 0
        qsl = [0]
        for n in lens:
            qsl.append(qsl[-1] + n)
        batch = StepBatch([], t, qsl, list(lens), [len(lens) - 1], [])
        b.upload(batch)
        meta = self.attn_backend.build_metadata(b, batch)
        hidden = self.model(b.input_ids[:t], b.positions[:t], self.kv_caches, meta)
        self.model.compute_logits(hidden[b.sample_idx[:1]])

    def _decode_logits(self, ids: torch.Tensor, pos: torch.Tensor, meta) -> torch.Tensor:
        """What a decode graph holds: the forward and the LM head of every row."""
        return self.model.compute_logits(self.model(ids, pos, self.kv_caches, meta))

    def _mixed_logits(self, num_tokens: int) -> torch.Tensor:
        """What a mixed graph holds: the forward from the embeddings buffer, the LM head at the
        sample indices of every sequence slot."""
        b, slots = self.inputs, self.inputs.num_seq_slots
        meta = self.attn_backend.graph_metadata(
            b, num_tokens, slots, max_query_len=num_tokens, max_seq_len=self.max_model_len,
            num_splits=1)  # the tile shape of a num_tokens-token chunk; never a split
        hidden = self.model(None, b.positions[:num_tokens], self.kv_caches, meta,
                            inputs_embeds=self.embeds_buf[:num_tokens])
        return self.model.compute_logits(hidden[b.sample_idx[:slots]])

    def _graph_metadata(self, size: int, num_splits: int):
        return self.attn_backend.graph_metadata(self.inputs, size, size, 1, self.max_model_len,
                                                num_splits)

    def _decode_splits(self, num_seqs: int, max_seq_len: int) -> int:
        return self.attn_backend.decode_splits(self.device, num_seqs, self.model.num_kv_heads,
                                               max_seq_len)

    # -- one step ---------------------------------------------------------------------------

    def _update_states(self, out: SchedulerOutput, frames=()) -> None:
        for key in out.freed_embeddings:
            self.embeddings.pop(key, None)
        for key, ref in out.embeddings.items():  # views of the step's frames until copied here
            tensor = tensor_from(ref, frames)
            self.embeddings[key] = tensor.to(self.device, self.dtype, non_blocking=True)
        for rid in out.finished_request_ids:
            self.requests.pop(rid, None)
        for new in out.new_requests:
            self._add(new)
        for c in out.cached_requests:
            st = self.requests[c.request_id]
            st.add_blocks(c.new_block_ids)
            st.num_computed_tokens = c.num_computed_tokens

    def _add(self, new: NewRequestData) -> None:
        old = self.requests.get(new.request_id)  # resumed after preemption: keep its RNG stream
        gen = old.generator if old is not None else None
        if gen is None and new.sampling.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(new.sampling.seed)
        st = RequestState(
            token_ids=list(new.token_ids),
            num_prompt_tokens=new.num_prompt_tokens,
            block_ids=np.asarray(new.block_ids, dtype=np.int32),
            num_computed_tokens=new.num_computed_tokens,
            sampling=new.sampling,
            mm_items=list(new.mm_items),
            generator=gen,
            min_tokens_block=_stop_ids(new.sampling, new.eos_token_ids),
            penalized=_uses_penalties(new.sampling),
        )
        if self.positions is not None:
            st.prompt_positions, st.position_delta = self.positions.prompt_positions(
                new.num_prompt_tokens, st.mm_items)
        self.requests[new.request_id] = st

    def execute(self, out: SchedulerOutput, frames=()) -> ModelRunnerOutput:
        """One step, waited for; ``frames`` are the step message's extra frames (its
        embeddings)."""
        return self.execute_async(out, frames).result()

    @torch.inference_mode()
    def execute_async(self, out: SchedulerOutput, frames=()) -> StepResult:
        """One step queued on the device; its result is read when asked for."""
        self._update_states(out, frames)
        if not out.num_scheduled_tokens:
            return StepResult(ModelRunnerOutput(sampled_token_ids={}, logprobs={}))
        if self.in_flight and any(self.requests[rid].penalized for rid in out.num_scheduled_tokens):
            self.in_flight[-1].result()  # penalties read the whole history, on the host
        bufs = self.inputs
        batch = bufs.prepare(self.requests, out.num_scheduled_tokens, self.positions)
        size = tokens = None
        if self.graphs is not None and batch.is_uniform_decode:
            size = self.graphs.padded_size(batch.num_seqs)
        elif self.mixed is not None:
            tokens = self.mixed.padded_size(batch.num_tokens)
        if tokens is not None:  # a short step that is not uniform decode: the mixed graph
            num_sampled = len(batch.sample_rows)
            bufs.pad_mixed(batch, tokens)
            self._upload(batch)
            self._embed(batch, self.embeds_buf[:tokens])
            logits = self.mixed.replay(tokens)[:num_sampled]
        elif size is not None:
            num_seqs = batch.num_seqs
            splits = self.graphs.num_splits(size, max(batch.seq_lens))
            bufs.pad_to(batch, size)
            self._upload(batch)
            logits = self.graphs.replay(size, splits)  # [size, vocab]: row i is batch row i
            if len(batch.sample_rows) != num_seqs:
                logits = logits[bufs.sample_idx[: len(batch.sample_rows)]]
            else:
                logits = logits[:num_seqs]
        else:
            self._upload(batch)
            logits = self._forward(batch)
        return self._sample(batch, logits)

    def _upload(self, batch: StepBatch) -> None:
        """The staged step to the device, then the input ids the step in flight samples, copied
        there from its output (one device copy when rows keep their order, the steady state)."""
        self.inputs.upload(batch)
        if not batch.pending:
            return
        src = self.in_flight[-1]  # every earlier step has landed: its ids are in token_ids
        dst = [t for t, _ in batch.pending]
        rows = [src.rows[rid] for _, rid in batch.pending]
        ids = self.inputs.input_ids
        if dst == rows == list(range(len(dst))):
            ids[: len(dst)].copy_(src.tokens[: len(dst)])
        else:
            idx = torch.tensor([dst, rows], dtype=torch.int64, device=self.device)
            ids[idx[0]] = src.tokens[idx[1]]

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        """The eager step: the forward over every token, the LM head over the sampled ones."""
        bufs, t = self.inputs, batch.num_tokens
        meta = self.attn_backend.build_metadata(bufs, batch)
        embeds = None
        if batch.splices:
            embeds = self._lookup(bufs.input_ids[:t])  # [t, hidden]
            self._embed(batch, embeds, lookup=False)
        hidden = self.model(bufs.input_ids[:t], bufs.positions[:t], self.kv_caches, meta,
                            inputs_embeds=embeds)
        if not batch.sample_rows:
            return hidden[:0]
        return self.model.compute_logits(hidden[bufs.sample_idx[: len(batch.sample_rows)]])

    def _embed(self, batch: StepBatch, out: torch.Tensor, lookup: bool = True) -> None:
        """Token embeddings of the step into `out` [num_tokens, hidden], media embeddings
        spliced over their placeholder rows."""
        if lookup:
            out.copy_(self._lookup(self.inputs.input_ids[: out.shape[0]]))
        for dst, key, src, count in batch.splices:
            out[dst : dst + count] = self.embeddings[key][src : src + count]

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, hidden] of ``ids`` [T]. A media placeholder id may lie past the
        vocabulary (Ultravox's audio_token_index; the engine lets such ids through only at
        media positions): those rows read the last id's embedding, which the splice then
        overwrites, instead of indexing out of range (a device assert on CUDA)."""
        return self.model.embed_tokens(ids.clamp(max=self.vocab_size - 1))

    def _sample(self, batch: StepBatch, logits: torch.Tensor) -> StepResult:
        if not batch.sample_rows:
            return StepResult(ModelRunnerOutput(sampled_token_ids={}, logprobs={}))
        rids = [batch.request_ids[row] for row in batch.sample_rows]
        if self.tp_size > 1:  # the group answers each step before the next: no ids in flight
            lps: list = [None] * len(rids)
            if self.tp_rank == 0:
                tokens, lps = self.sampler(logits, [self._sampling_row(rid) for rid in rids])
                self._broadcast_tokens(tokens)
            else:
                tokens = self._broadcast_tokens([0] * len(rids))
            for rid, tok in zip(rids, tokens):
                self.requests[rid].token_ids.append(tok)
            return StepResult(_runner_output(rids, tokens, lps))
        tokens, lps = self.sampler.sample(logits, [self._sampling_row(rid) for rid in rids])
        for rid in rids:
            self.requests[rid].num_pending += 1
        self._landing.append(landing := self._landing.pop(0))
        step = SampledStep(self, rids, tokens, lps, landing)
        self.in_flight.append(step)
        return step

    def _land(self, step: SampledStep) -> None:
        """Read the ids of every step up to ``step``, oldest first, into their requests."""
        while self.in_flight:
            s = self.in_flight.popleft()
            ids = s.read()
            for rid, tok in zip(s.rids, ids):
                st = self.requests.get(rid)  # gone: finished (or aborted) meanwhile
                if st is not None:
                    st.token_ids.append(tok)
                    st.num_pending -= 1
            if s is step:
                return

    def _sampling_row(self, rid: str) -> SamplingRow:
        st = self.requests[rid]
        num_out = len(st.token_ids) + st.num_pending - st.num_prompt_tokens
        # Only penalties read the history: copying it for every row every step cost
        # O(context) host time per token (0.2+ ms a step at batch 64, context 700).
        history = st.penalized
        return SamplingRow(
            params=st.sampling,
            prompt_ids=st.token_ids[: st.num_prompt_tokens] if history else [],
            output_ids=st.token_ids[st.num_prompt_tokens :] if history else [],
            generator=st.generator,
            blocked_ids=st.min_tokens_block if num_out < st.sampling.min_tokens else (),
        )

    def _broadcast_tokens(self, tokens: list[int]) -> list[int]:
        """Rank 0's sampled ids to every rank (the other ranks pass placeholders of the same
        length): the next step's inputs include them."""
        t = torch.tensor(tokens, dtype=torch.int64, device=self.device)  # [num_sampled]
        dist.broadcast(t, src=0)
        return t.tolist()


class SampledStep(StepResult):
    """One step's sampled ids: on the device (the next step's inputs read them there), copied
    to a pinned landing buffer behind the step; `result` waits for that copy alone."""

    def __init__(self, runner: ModelRunner, rids: list[str], tokens: torch.Tensor,
                 lps: list, landing: torch.Tensor):
        super().__init__(None)
        self.runner, self.rids, self.tokens, self.lps = runner, rids, tokens, lps
        self.rows = {rid: i for i, rid in enumerate(rids)}
        n = len(rids)
        if tokens.device.type == "cuda":
            self._host = landing[:n]
            self._host.copy_(tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = tokens, None

    def read(self) -> list[int]:
        """Wait for the ids (the runner calls this once, in step order) and keep the output."""
        if self._event is not None:
            self._event.synchronize()
        ids = self._host.tolist()
        self.output = _runner_output(self.rids, ids, self.lps)
        self.tokens = self._host = None  # nothing left to hold on to
        return ids

    def result(self) -> ModelRunnerOutput:
        if self.output is None:
            self.runner._land(self)
        return self.output


def _runner_output(rids: list[str], tokens: list[int], lps: list) -> ModelRunnerOutput:
    return ModelRunnerOutput(
        sampled_token_ids=dict(zip(rids, tokens)),
        logprobs={rid: lp for rid, lp in zip(rids, lps) if lp is not None})


def _uses_penalties(p: Sampling) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _stop_ids(sampling: Sampling, eos_token_ids: tuple[int, ...]) -> tuple[int, ...]:
    """What min_tokens keeps out (vLLM's rule): the stop token ids, and EOS unless ignored."""
    if sampling.min_tokens <= 0:
        return ()
    ids = list(sampling.stop_token_ids)
    if not sampling.ignore_eos:
        ids += eos_token_ids
    return tuple(dict.fromkeys(ids))
