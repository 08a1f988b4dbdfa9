"""min_tokens keeps EOS and stop token ids out of the sample until enough tokens exist (vLLM's
rule), so an output never carries a hidden EOS in its middle."""

from __future__ import annotations

import torch

from frontend import LLM, SamplingParams
from llm_worker.runner import _stop_ids
from llm_worker.sampling import Sampler, SamplingRow
from protocol.messages import Sampling


def _row(blocked: tuple[int, ...], temperature: float = 0.0) -> SamplingRow:
    return SamplingRow(params=Sampling(max_tokens=8, temperature=temperature), prompt_ids=[1],
                       output_ids=[], generator=None, blocked_ids=blocked)


def test_sampler_never_draws_a_blocked_id():
    sampler = Sampler(vocab_size=16, device=torch.device("cpu"))
    logits = torch.zeros(3, 16)
    logits[:, 5] = 50.0  # id 5 (say EOS) dominates every row
    logits[:, 7] = 40.0  # id 7 (a stop id) comes next
    tokens, _ = sampler(logits.clone(), [_row((5, 7)), _row(()), _row((5,))])
    assert tokens == [tokens[0], 5, 7] and tokens[0] not in (5, 7)
    for _ in range(20):  # random sampling too: the blocked ids have probability 0
        tokens, _ = sampler(logits.clone(), [_row((5, 7), temperature=1.0)])
        assert tokens[0] not in (5, 7)


def test_blocked_ids_follow_vllm():
    s = Sampling(max_tokens=8, min_tokens=3, stop_token_ids=[9])
    assert set(_stop_ids(s, (2,))) == {2, 9}
    s_ignore = Sampling(max_tokens=8, min_tokens=3, stop_token_ids=[9], ignore_eos=True)
    assert _stop_ids(s_ignore, (2,)) == (9,)
    assert _stop_ids(Sampling(max_tokens=8, stop_token_ids=[9]), (2,)) == ()


def test_min_tokens_masks_stop_ids_end_to_end(tiny_llama):
    llm = LLM(tiny_llama, max_model_len=128, num_kv_blocks=64)
    prompt = "Hello world"
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    free = llm.generate(prompt, greedy)[0].outputs[0].token_ids
    first = free[0]
    # The greedy first token as a stop id ends generation at once without min_tokens ...
    stopped = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                  stop_token_ids=[first]))[0].outputs[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    # ... and can't be sampled before min_tokens outputs exist.
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, min_tokens=4,
                                              ignore_eos=True, stop_token_ids=[first]))[0]
    ids = out.outputs[0].token_ids
    assert first not in ids[:4] and len(ids) >= 4, ids
    # EOS too: make the greedy first token the EOS id and ask for min_tokens.
    llm.processor.eos_token_ids = [first]
    eos_out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6,
                                                  min_tokens=3))[0].outputs[0]
    assert first not in eos_out.token_ids[:3] and len(eos_out.token_ids) >= 3
    no_min = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6))[0].outputs[0]
    assert no_min.token_ids == [first] and no_min.finish_reason == "stop"
