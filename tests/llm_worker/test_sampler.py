"""The sampler on a known distribution: each rule keeps exactly the tokens it should, a mixed
batch applies each row's own parameters, and unfiltered draws follow the softmax."""

from __future__ import annotations

from collections import Counter

import torch

from llm_worker.sampling import Sampler, SamplingRow
from protocol.messages import Sampling

# Probabilities 0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005 (token 0 most likely).
PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005])
LOGITS = PROBS.log()
DRAWS = 3000


def draw(params: Sampling, n: int = DRAWS, sampler: Sampler | None = None) -> Counter:
    """n draws of one parameter set, as n rows of one batch (also grows the table past 256)."""
    sampler = sampler or Sampler(len(PROBS), torch.device("cpu"), max_num_seqs=4)
    rows = [SamplingRow(params, [], [], None) for _ in range(n)]
    tokens, _ = sampler(LOGITS.repeat(n, 1), rows)
    return Counter(tokens)


def test_each_rule_keeps_exactly_its_tokens():
    torch.manual_seed(0)
    assert set(draw(Sampling(temperature=1.0, top_k=3))) == {0, 1, 2}
    # top_p 0.6: keep a token while the mass before it is < 0.6 -> 0 (0), 1 (0.4), not 2 (0.65).
    assert set(draw(Sampling(temperature=1.0, top_p=0.6))) == {0, 1}
    # min_p 0.3: keep p >= 0.3 * 0.4 = 0.12 -> tokens 0, 1, 2.
    assert set(draw(Sampling(temperature=1.0, min_p=0.3))) == {0, 1, 2}
    assert set(draw(Sampling(temperature=0.0, top_k=5))) == {0}
    assert set(draw(Sampling(temperature=1.0, top_k=1000))) == set(range(8))  # k > vocab: all


def test_unfiltered_draws_follow_the_softmax_and_temperature():
    torch.manual_seed(1)
    for temp in (1.0, 0.5):
        want = torch.softmax(LOGITS / temp, -1)
        got = draw(Sampling(temperature=temp), 20000)
        for tok in range(8):
            assert abs(got[tok] / 20000 - want[tok].item()) < 0.015, (temp, tok)


def test_mixed_batch_applies_each_rows_parameters():
    torch.manual_seed(2)
    kinds = [Sampling(temperature=0.0), Sampling(temperature=1.0, top_k=2),
             Sampling(temperature=1.0, top_p=0.6, min_p=0.0), Sampling(temperature=1.0)]
    n = 800
    rows = [SamplingRow(kinds[i % 4], [], [], None) for i in range(4 * n)]
    tokens, _ = Sampler(len(PROBS), torch.device("cpu"))(LOGITS.repeat(4 * n, 1), rows)
    by_kind = [Counter(tokens[i::4]) for i in range(4)]
    assert set(by_kind[0]) == {0}
    assert set(by_kind[1]) == {0, 1} and set(by_kind[2]) == {0, 1}
    assert len(by_kind[3]) >= 6  # unfiltered: the tail shows up


def test_seeded_rows_repeat_and_penalties_apply_per_row():
    s = Sampler(len(PROBS), torch.device("cpu"))

    def seeded() -> SamplingRow:
        return SamplingRow(Sampling(temperature=1.0), [], [],
                           torch.Generator().manual_seed(5))

    a, _ = s(LOGITS.repeat(3, 1), [seeded(), seeded(), seeded()])
    assert len(set(a)) == 1
    # A huge repetition penalty on token 0 (in the row's prompt) moves greedy off it; the
    # plain greedy row beside it keeps token 0.
    pen = SamplingRow(Sampling(temperature=0.0, repetition_penalty=100.0), [0], [], None)
    plain = SamplingRow(Sampling(temperature=0.0), [0], [], None)
    got, _ = s(LOGITS.repeat(2, 1), [pen, plain])
    assert got == [1, 0]
