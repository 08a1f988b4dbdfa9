"""The same engine code on a CUDA device: greedy parity with transformers (fp32), and a bf16
smoke run. Skipped without a GPU."""

from __future__ import annotations

import pytest
from test_offline_parity import MAX_NEW, PROMPTS, assert_greedy_equal

from frontend.llm import LLM
from frontend.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_cuda_greedy_parity(request, name):
    model_dir = request.getfixturevalue(name)
    llm = LLM(model_dir, device="cuda", dtype="float32", max_num_batched_tokens=32)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))
    assert_greedy_equal([o.outputs[0].token_ids for o in outs], model_dir,
                        [o.prompt_token_ids for o in outs])


def test_cuda_bf16_sampling_and_preemption(tiny_llama):
    llm = LLM(tiny_llama, device="cuda", dtype="bfloat16", num_kv_blocks=14, max_model_len=192,
              max_num_batched_tokens=64)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1, max_tokens=40,
                            ignore_eos=True, logprobs=2)
    outs = llm.generate([p + str(i) for i, p in enumerate(PROMPTS * 2)], params)
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    assert llm.engine.stats().num_preemptions > 0
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_total_blocks
