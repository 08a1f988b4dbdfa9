"""Tensor parallelism under the `mp` and the `ray` executors (issue 10, acceptance 1): TP=2 over
gloo equals TP=1 token for token, logprobs within 1e-4 (fp32), for tiny Llama, Qwen2 and LLaVA
checkpoints whose every shard holds something (4 heads, 2 KV heads: one KV head per rank;
intermediate 128, vocab 384). Through the offline `LLM`: chunked prefill (a 16-token budget),
a prefix-cache hit, a seeded random sample (only rank 0 samples: the others must follow it),
and for LLaVA image embeddings framed to both workers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from frontend import LLM, SamplingParams

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. A serving system answers requests, "
    "one step at a time.",  # past the 16-token step budget: a chunked prefill
    "Hello world, again",  # shares a first block with prompt 0 (prefix cache)
]
HAS_RAY = importlib.util.find_spec("ray") is not None
EXECUTORS = ["mp", pytest.param("ray", marks=pytest.mark.skipif(not HAS_RAY,
                                                                 reason="Ray not installed"))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, logprobs=3, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, seed=7, max_tokens=10, logprobs=3, ignore_eos=True)


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 50, 3), np.uint8))


def _prompts(model: str) -> list:
    if "llava" not in model:
        return PROMPTS
    # Two images in one prompt, the same image again in another (a second step that sends it).
    a, b = _image(1), _image(2)
    return [{"prompt": "<image>Describe<image>", "multi_modal_data": {"image": [a, b]}},
            {"prompt": "What is in <image>?", "multi_modal_data": {"image": [a]}},
            PROMPTS[1]]


def _run(model: str, **engine) -> list:
    llm = LLM(model, max_num_batched_tokens=16, block_size=8, max_model_len=256, **engine)
    try:
        prompts = _prompts(model)
        outs = llm.generate(prompts, [GREEDY] * (len(prompts) - 1) + [SEEDED])
        procs = list(getattr(llm.engine.executor, "procs", []))
    finally:
        llm.engine.shutdown()
    # Every mp worker left on the Shutdown message, none was killed.
    assert [p.wait(10) for p in procs] == [0] * len(procs)
    return [o.outputs[0] for o in outs]


@pytest.fixture(scope="module", autouse=True)
def _ray_down():
    yield
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_llava"])
def test_tp2_equals_tp1(fixture, executor, request):
    model = request.getfixturevalue(fixture)
    text = json.loads((Path(model) / "config.json").read_text())
    text = text.get("text_config") or text
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (4, 2)
    assert text["intermediate_size"] % 2 == 0 and text["vocab_size"] % 2 == 0
    want = _run(model)
    got = _run(model, tensor_parallel_size=2, executor=executor)
    for i, (a, b) in enumerate(zip(want, got)):
        assert b.token_ids == a.token_ids, f"prompt {i}"
        assert len(a.token_ids) == GREEDY.max_tokens
        for pos, (pa, pb) in enumerate(zip(a.logprobs, b.logprobs)):
            assert pa.keys() == pb.keys(), (i, pos)
            for tok in pa:
                assert abs(pa[tok].logprob - pb[tok].logprob) < 1e-4, (i, pos, tok)
