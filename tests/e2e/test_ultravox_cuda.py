"""Ultravox's released layout on a CUDA device: ``audio_token_index`` one past the LM's
vocabulary reaches the token-embedding lookup in every path that runs one (eager, the mixed
CUDA graphs' lookup before replay, decode graphs after), where an out-of-range id would be a
device assert. Same answers as the in-vocab checkpoint of the same weights. Skipped without a
GPU."""

from __future__ import annotations

import numpy as np
import pytest

from frontend import LLM, SamplingParams

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def tones(seed: int, seconds: float, rate: int = 16_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = sum(0.2 * np.sin(2 * np.pi * f * t) for f in rng.uniform(100, 3000, 3))
    return (x + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from frontend.random_audio import build_random_ultravox

    root = tmp_path_factory.mktemp("ultravox_cuda")
    return (str(build_random_ultravox(root / "in_vocab")),
            str(build_random_ultravox(root / "released", audio_token_in_vocab=False)))


@pytest.mark.parametrize("eager", [False, True])
def test_released_layout_on_cuda_answers_as_in_vocab(checkpoints, eager):
    a, b = tones(1, 5.0), tones(2, 1.3)
    body = [("Listen <|audio|>What is it?", [a]), ("<|audio|> and <|audio|>?", [a, b])]
    prompts = [{"prompt": f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
                "multi_modal_data": {"audio": [(c, 16_000) for c in clips]}}
               for text, clips in body]
    answers = []
    for ckpt in checkpoints:
        llm = LLM(ckpt, device="cuda", dtype="float32", max_num_batched_tokens=32,
                  enforce_eager=eager)
        try:
            outs = llm.generate(prompts, GREEDY)
        finally:
            llm.engine.shutdown()
        answers.append([(o.prompt_token_ids, o.outputs[0].token_ids) for o in outs])
    assert answers[0] == answers[1]
