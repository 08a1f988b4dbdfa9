from __future__ import annotations

import pytest

from frontend.outputs import SequenceState
from frontend.random_model import build_tokenizer
from frontend.sampling_params import SamplingParams
from protocol.messages import TokenLogprobs, TokenOutput


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def char_ids(tok, text):
    """One token per character (several for multi-byte ones): stops then span token boundaries."""
    return [i for ch in text for i in tok.encode(ch, add_special_tokens=False)]


def run(tok, ids, finish="length", per_update=1, **params):
    """Feeds ``ids`` as engine outputs; returns (deltas, state)."""
    state = SequenceState(tok, SamplingParams(**params))
    deltas = []
    for k in range(0, len(ids), per_update):
        chunk = ids[k:k + per_update]
        last = k + per_update >= len(ids)
        deltas.append(state.update(TokenOutput("r-0", chunk, finish if last else None)))
        if state.finished:
            break
    return deltas, state


def text_of(deltas):
    return "".join(d.text for d in deltas)


def test_stop_string_spanning_tokens_truncates(tok):
    ids = char_ids(tok, "Hello world, bye")
    deltas, state = run(tok, ids, stop=["world"])
    assert text_of(deltas) == "Hello "
    out = state.output()
    assert (out.text, out.finish_reason, out.stop_reason) == ("Hello ", "stop", "world")
    # The token that completed the stop string is the last one kept.
    assert out.token_ids == ids[:len("Hello world")]
    assert deltas[-1].finish_reason == "stop"


def test_stop_text_is_never_shown_before_it_resolves(tok):
    ids = char_ids(tok, "abcXYZdef")
    deltas, _ = run(tok, ids, stop="XYZ")
    shown = ""
    for d in deltas:
        shown += d.text
        assert "X" not in shown
    assert shown == "abc"


def test_withheld_text_is_released_when_not_a_stop(tok):
    ids = char_ids(tok, "one wor two")
    deltas, state = run(tok, ids, stop=["world"])
    texts = [d.text for d in deltas]
    # "w", "o", "r" are held while they could begin "world", then released together with " ".
    assert "".join(texts[:7]) == "one "
    assert texts[7] == "wor "
    assert "".join(texts) == "one wor two"
    assert state.output().finish_reason == "length"
    assert state.output().stop_reason is None


def test_held_prefix_released_at_finish(tok):
    deltas, state = run(tok, char_ids(tok, "text ending in wo"), stop=["world"])
    assert text_of(deltas) == "text ending in wo"
    assert state.output().text == "text ending in wo"


def test_include_stop_str_in_output(tok):
    deltas, state = run(tok, char_ids(tok, "Hello world, bye"), stop=["world"],
                        include_stop_str_in_output=True)
    assert text_of(deltas) == "Hello world"
    assert state.output().stop_reason == "world"


def test_multiple_stops_earliest_wins(tok):
    ids = tok.encode("The quick brown fox jumps", add_special_tokens=False)
    deltas, state = run(tok, ids, per_update=len(ids), stop=["fox", "quick", "zebra"])
    assert text_of(deltas) == "The "
    assert state.output().stop_reason == "quick"


def test_stop_inside_one_multi_token_update_drops_later_tokens(tok):
    ids = char_ids(tok, "abc;def")
    deltas, state = run(tok, ids, per_update=len(ids), stop=";")
    assert text_of(deltas) == "abc"
    assert state.output().token_ids == ids[:4]


def test_stop_after_multibyte_characters(tok):
    deltas, state = run(tok, char_ids(tok, "你好🙂世界"), stop=["🙂"])
    assert text_of(deltas) == "你好"
    assert state.output().finish_reason == "stop"


def test_stop_token_id_gives_stop_reason_and_no_text(tok):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = char_ids(tok, "hi") + [end]
    state = SequenceState(tok, SamplingParams(stop_token_ids=[end], skip_special_tokens=False))
    state.update(TokenOutput("r", ids[:-1]))
    d = state.update(TokenOutput("r", ids[-1:], "stop", stop_token_id=end))
    out = state.output()
    assert (out.text, out.finish_reason, out.stop_reason) == ("hi", "stop", end)
    assert out.token_ids == ids and d.finish_reason == "stop"


def test_eos_has_no_stop_reason(tok):
    eos = tok.eos_token_id
    state = SequenceState(tok, SamplingParams(skip_special_tokens=False))
    state.update(TokenOutput("r", [*char_ids(tok, "ok"), eos], "stop", stop_token_id=eos))
    out = state.output()
    assert (out.text, out.finish_reason, out.stop_reason) == ("ok", "stop", None)


def test_logprobs_accumulate_and_stop_truncates_them(tok):
    ids = char_ids(tok, "ab;c")
    state = SequenceState(tok, SamplingParams(stop=";", logprobs=2))
    for t in ids:
        lp = TokenLogprobs([t, t, 7], [-0.5, -0.5, -1.5], [1])
        state.update(TokenOutput("r", [t], logprobs=[lp]))
        if state.finished:
            break
    out = state.output()
    assert out.token_ids == ids[:3] and len(out.logprobs) == 3
    assert out.cumulative_logprob == pytest.approx(-1.5)
    pos = out.logprobs[0]
    assert list(pos) == [ids[0], 7]  # the sampled token (also top-1) once, then the rest
    assert pos[ids[0]].rank == 1 and pos[7].rank == 2
    assert pos[ids[0]].decoded_token == "a"


def test_no_updates_after_finish(tok):
    deltas, state = run(tok, char_ids(tok, "a;b"), stop=";")
    again = state.update(TokenOutput("r", char_ids(tok, "zz")))
    assert again.text == "" and again.token_ids == [] and state.output().text == "a"
