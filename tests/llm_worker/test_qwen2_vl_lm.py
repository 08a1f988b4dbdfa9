"""Qwen2-VL / Qwen2.5-VL language models through the real ModelRunner equal transformers (fp32,
CPU, tiny random checkpoints): a prompt with two images of different grids, their embeddings
spliced in the way the engine sends them, M-RoPE positions from the items' meta; prefill and
greedy decode, chunked prefill and a resume after preemption. Swapped grids or 1-D positions
change the logits, so the parity is not blind to the positions. What the CUDA graphs replay
(padded mixed and decode steps over the fixed [tokens, 3] positions buffer) equals the eager
step, also through the Triton kernels under the interpreter (a child pytest)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
import transformers
from interp_child import run_interpreter_cases

from llm_worker.config import LLMWorkerConfig
from llm_worker.engine import EngineCore
from llm_worker.input_batch import PositionScheme
from llm_worker.models import get_model_class
from llm_worker.runner import ModelRunner
from protocol.codec import tensor_frames
from protocol.messages import GenerateRequest, MMItem, Sampling
from protocol.step import CachedRequestData, NewRequestData, SchedulerOutput

IMAGE_TOKEN, BS, STEPS = 300, 4, 6
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HF = {
    "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration),
}
TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=320, max_position_embeddings=128, tie_word_embeddings=False,
    # A small theta: the height/width sections' slow frequencies still turn over a few positions.
    rope_parameters={"rope_type": "default", "rope_theta": 100.0, "mrope_section": [2, 3, 3]},
)
VISION = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, out_hidden_size=64,
              intermediate_size=64)
# text, image A (grid 1x4x6 patches -> 2x3 merged = 6 tokens), text, image B (1x6x4), text
GRIDS = {"blake3:a": [1, 4, 6], "blake3:b": [1, 6, 4]}
OFFSETS = {"blake3:a": 3, "blake3:b": 13}
PROMPT_LEN = 24


@pytest.fixture(scope="module", params=list(HF))
def checkpoint(request, tmp_path_factory):
    config_cls, model_cls = HF[request.param]
    cfg = config_cls(text_config=TEXT, vision_config=VISION, image_token_id=IMAGE_TOKEN,
                     video_token_id=301, vision_start_token_id=302, vision_end_token_id=303,
                     tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = model_cls(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.15)
            else:
                p.normal_(0.0, 0.15)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return str(path), hf.eval()


def prompt() -> tuple[list[int], torch.Tensor, dict[str, torch.Tensor]]:
    """(token ids, mm_token_type_ids, key -> image embeddings [6, hidden])."""
    rng = random.Random(1)
    ids = [rng.randrange(3, IMAGE_TOKEN) for _ in range(PROMPT_LEN)]
    types = torch.zeros(PROMPT_LEN, dtype=torch.int64)
    gen = torch.Generator().manual_seed(2)
    embeds = {}
    for key, offset in OFFSETS.items():
        ids[offset : offset + 6] = [IMAGE_TOKEN] * 6
        types[offset : offset + 6] = 1
        embeds[key] = torch.randn(6, TEXT["hidden_size"], generator=gen) * 0.5
    return ids, types, embeds


def mm_items(grids: dict[str, list[int]]) -> list[MMItem]:
    """The items as the frontend sends them: the geometry's meta (grid in patches)."""
    return [MMItem(key, "image", OFFSETS[key], 6,
                   {"num_tokens": 6, "grid_thw": grids[key], "resized_hw": [g * 14 for g in
                                                                           grids[key][1:]]})
            for key in OFFSETS]


@torch.no_grad()
def hf_greedy(hf, ids, types, embeds) -> list[torch.Tensor]:
    """transformers' logits of the prompt's last token and of STEPS - 1 greedy decode steps:
    inputs_embeds with the images spliced, its own get_rope_index, then its cache and rope
    deltas."""
    hf.model.rope_deltas = None
    x = hf.get_input_embeddings()(torch.tensor([ids]))
    for key, offset in OFFSETS.items():
        x[0, offset : offset + 6] = embeds[key]
    out = hf(input_ids=torch.tensor([ids]), inputs_embeds=x, mm_token_type_ids=types[None],
             image_grid_thw=torch.tensor(list(GRIDS.values())), use_cache=True)
    logits = [out.logits[0, -1]]
    for _ in range(STEPS - 1):
        out = hf(input_ids=logits[-1].argmax().view(1, 1), cache=out.cache, use_cache=True)
        logits.append(out.logits[0, -1])
    return logits


class Session:
    """One request driven through ModelRunner.execute step by step, as the scheduler would."""

    def __init__(self, path: str, scheme: PositionScheme | None = None,
                 attention_backend: str = "torch"):
        cfg = transformers.AutoConfig.from_pretrained(path)
        self.runner = ModelRunner(path, cfg, device=torch.device("cpu"), dtype=torch.float32,
                                  max_model_len=64, max_num_seqs=2, max_num_batched_tokens=32,
                                  block_size=BS, attention_backend=attention_backend)
        self.runner.init_kv_cache(40)
        if scheme is not None:
            self.runner.positions = scheme
        self.logits: list[torch.Tensor] = []
        sample = self.runner.sampler.sample
        self.runner.sampler.sample = lambda logits, rows: (self.logits.append(logits[0].clone()),
                                                           sample(logits, rows))[1]
        self.free = list(range(1, 40))
        random.Random(0).shuffle(self.free)

    def add(self, token_ids, grids, chunk: int | None = None, embeds=None) -> None:
        """Schedule the request (new or resumed): its prompt in one step or two."""
        n = len(token_ids)
        first = chunk or n
        self.blocks = [self.free.pop() for _ in range(-(-(PROMPT_LEN + STEPS) // BS))]
        new = NewRequestData("r", list(token_ids), PROMPT_LEN,
                             Sampling(max_tokens=STEPS, temperature=0.0, ignore_eos=True),
                             self.blocks, 0, mm_items(grids))
        frames: list = []
        step = SchedulerOutput([new], [], {"r": first}, first,
                               embeddings=tensor_frames(embeds or {}, frames))
        self.runner.execute(step, frames)
        if first < n:
            self.runner.execute(SchedulerOutput([], [CachedRequestData("r", [], first)],
                                                {"r": n - first}, n - first))

    def decode(self) -> None:
        computed = len(self.runner.requests["r"].token_ids) - 1
        self.runner.execute(SchedulerOutput([], [CachedRequestData("r", [], computed)],
                                            {"r": 1}, 1))

    def preempt(self) -> None:
        """Free the blocks; the request resumes later as new (the runner replaces its state)."""
        self.free += self.blocks
        self.runner.execute(SchedulerOutput([], [], {}, 0, preempted_request_ids={"r"}))

    @property
    def tokens(self) -> list[int]:
        return self.runner.requests["r"].token_ids[PROMPT_LEN:]


def run(path, grids=GRIDS, chunk=None, scheme=None) -> Session:
    ids, _, embeds = prompt()
    s = Session(path, scheme)
    s.add(ids, grids, chunk, embeds)
    for _ in range(STEPS - 1):
        s.decode()
    return s


def assert_logits_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-5)


def test_registry(checkpoint):
    path, hf = checkpoint
    cls = get_model_class(transformers.AutoConfig.from_pretrained(path))
    assert cls.__name__ == type(hf).__name__ and cls.position_scheme.rows == 3


def test_prefill_and_decode_equal_transformers(checkpoint):
    path, hf = checkpoint
    ids, types, embeds = prompt()
    want = hf_greedy(hf, ids, types, embeds)
    s = run(path)
    assert_logits_equal(s.logits, want)
    assert s.tokens == [int(w.argmax()) for w in want]
    # The decoder holds the LM alone: no tower weight was built or loaded.
    assert not any("visual" in n for n, _ in s.runner.model.named_parameters())


def test_chunked_prefill_equals_one_step(checkpoint):
    """The prompt in two steps, split inside image B: its embedding rows and its positions
    are sliced at the cut."""
    path, _ = checkpoint
    whole, chunked = run(path), run(path, chunk=OFFSETS["blake3:b"] + 2)
    assert_logits_equal(chunked.logits, whole.logits)
    assert chunked.tokens == whole.tokens


def test_resume_after_preemption_keeps_positions(checkpoint):
    """Preempted after 3 tokens, the request is recomputed as prompt + outputs in one step:
    positions come from its prompt's items and the delta, not from the steps it ran."""
    path, _ = checkpoint
    whole = run(path)
    ids, _, embeds = prompt()
    s = Session(path)
    s.add(ids, GRIDS, embeds=embeds)
    for _ in range(2):
        s.decode()
    outputs = s.tokens
    s.preempt()
    s.add(ids + outputs, GRIDS)  # the worker kept the embeddings; the engine sends them once
    for _ in range(STEPS - 4):
        s.decode()
    assert_logits_equal(s.logits[3:], whole.logits[3:])
    assert s.tokens == whole.tokens


def test_engine_core_greedy_equals_transformers(checkpoint):
    """The whole decoder role: the engine core schedules the prompt in 16-token chunks once the
    embeddings arrive, and its greedy tokens are transformers'."""
    path, hf = checkpoint
    ids, types, embeds = prompt()
    want = [int(w.argmax()) for w in hf_greedy(hf, ids, types, embeds)]
    core = EngineCore(LLMWorkerConfig(model=path, max_num_batched_tokens=16))
    sampling = Sampling(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
    assert core.add_request(GenerateRequest("r", ids, sampling, [], "",
                                            mm_items=mm_items(GRIDS))) is None
    for key, tensor in embeds.items():
        assert core.add_embedding(key, tensor.clone()) is None
    got: list[int] = []
    while core.has_work():
        for o in core.step():
            got += o.new_token_ids
    assert got == want


class FlatPositions(PositionScheme):
    """1-D RoPE in all three rows: what a decoder that ignored the grids would run."""

    rows = 3

    def prompt_positions(self, num_prompt_tokens, mm_items):
        return np.repeat(np.arange(num_prompt_tokens)[:, None], 3, axis=1), 0


def test_positions_matter(checkpoint):
    """Swapping the images' grids (same token counts) or flattening positions to 1-D changes
    the logits: the parity above checks the positions, not only the layers."""
    path, _ = checkpoint
    whole = run(path)
    swapped = run(path, grids={"blake3:a": GRIDS["blake3:b"], "blake3:b": GRIDS["blake3:a"]})
    flat = run(path, scheme=FlatPositions())
    for other in (swapped, flat):
        assert (other.logits[0] - whole.logits[0]).abs().max() > 1e-2


def _padded_steps_equal_eager(path: str, attention_backend: str) -> None:
    """The prompt padded as the 32-token mixed graph runs it (padding at position 0 in every
    row, owned by the spare slot), then a decode step padded to 2 rows: the same logits as the
    eager steps. With the Triton backend, through the graphs' own forwards (graph metadata,
    embeddings read from the fixed buffer)."""
    graphs = attention_backend == "triton"
    ids, _, embeds = prompt()
    s = Session(path, attention_backend=attention_backend)
    r, bufs = s.runner, s.runner.inputs
    r.warm_up()  # dummy steps over the 3-row buffer; no graphs on CPU
    assert bufs.positions.shape == (32, 3)
    r.embeds_buf = torch.zeros(32, r.model.hidden_size)
    s.add(ids, GRIDS, embeds=embeds)  # the eager prefill
    s.preempt()
    new = NewRequestData("r", ids, PROMPT_LEN, Sampling(max_tokens=STEPS, temperature=0.0),
                         s.blocks, 0, mm_items(GRIDS))
    r._update_states(SchedulerOutput([new], [], {"r": PROMPT_LEN}, PROMPT_LEN))
    batch = bufs.prepare(r.requests, {"r": PROMPT_LEN}, r.positions)
    bufs.pad_mixed(batch, 32)
    bufs.upload(batch)
    assert not bufs.positions[PROMPT_LEN:].any()
    if graphs:
        r._embed(batch, r.embeds_buf)
        logits = r._mixed_logits(32)[:1]
    else:
        logits = r._forward(batch)
    torch.testing.assert_close(logits[0], s.logits[0], rtol=1e-4, atol=1e-4)
    r._sample(batch, logits).result()

    decode = SchedulerOutput([], [CachedRequestData("r", [], PROMPT_LEN)], {"r": 1}, 1)
    r._update_states(decode)
    kv = [c.clone() for c in r.kv_caches]
    batch = bufs.prepare(r.requests, decode.num_scheduled_tokens, r.positions)
    bufs.upload(batch)
    eager = r._forward(batch)
    for c, b in zip(r.kv_caches, kv):
        c.copy_(b)
    batch = bufs.prepare(r.requests, decode.num_scheduled_tokens, r.positions)
    bufs.pad_to(batch, 2)
    bufs.upload(batch)
    if graphs:
        got = r._decode_logits(bufs.input_ids[:2], bufs.positions[:2], r._graph_metadata(2, 1))
    else:
        got = r._forward(batch)
    torch.testing.assert_close(got[:1], eager, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(INTERPRETED, reason="the child runs the interpreted case only")
def test_padded_steps_equal_eager(checkpoint):
    _padded_steps_equal_eager(checkpoint[0], "torch")


def test_interpreter_child():
    if INTERPRETED:
        pytest.skip("already under the interpreter")
    # One architecture: the two share every layer and kernel.
    run_interpreter_cases(__file__, "test_interp_ and not qwen2_5_vl", kernels="triton")


@pytest.mark.skipif(not INTERPRETED, reason="runs in test_interpreter_child")
def test_interp_graph_forwards_equal_eager(checkpoint):
    _padded_steps_equal_eager(checkpoint[0], "triton")


def test_engine_refuses_items_without_a_fitting_grid(tmp_path_factory):
    """A request whose item has no grid, or a grid that is not its length, is refused when it
    arrives (an error for that request), and the engine keeps serving."""
    from frontend.random_model import build_random_qwen2_vl

    ckpt = str(build_random_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl_engine")))
    core = EngineCore(LLMWorkerConfig(model=ckpt, device="cpu", dtype="float32"))
    greedy = Sampling(max_tokens=2, temperature=0.0)
    prompt = list(range(5, 17))
    for meta in ({}, {"grid_thw": [1, 4, 4]}):  # none; 4 tokens, not the item's 6
        err = core.add_request(GenerateRequest("bad", prompt, greedy, [], "",
                                               [MMItem("k", "image", 2, 6, meta)]))
        assert err is not None and "grid" in err
    assert core.add_request(GenerateRequest("ok", prompt, greedy, [], "")) is None
    while core.has_work():
        core.step()


def test_engine_refuses_media_placed_past_the_rotary_table(tmp_path_factory):
    """A Qwen2.5-VL video whose timing puts its frames (and so the text after it) past the
    rotary table's last position is refused when it arrives, not an index error in a step."""
    from frontend.random_model import build_random_qwen2_vl

    ckpt = str(build_random_qwen2_vl(tmp_path_factory.mktemp("qwen25_positions"),
                                     arch="qwen2_5_vl"))
    core = EngineCore(LLMWorkerConfig(model=ckpt, device="cpu", dtype="float32"))
    prompt = list(range(5, 17))
    video = MMItem("v", "video", 2, 8, {"grid_thw": [2, 4, 4], "seconds_per_grid_t": 1e7})
    err = core.add_request(GenerateRequest("far", prompt, Sampling(max_tokens=2), [], "",
                                           [video]))
    assert err is not None and "past the model's" in err
    ok = MMItem("v", "video", 2, 8, {"grid_thw": [2, 4, 4], "seconds_per_grid_t": 1.0})
    assert core.add_request(GenerateRequest("near", prompt, Sampling(max_tokens=2), [], "",
                                            [ok])) is None
    core.abort(["near"])
