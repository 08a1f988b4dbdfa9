from __future__ import annotations

import pytest

from frontend.detokenizer import IncrementalDetokenizer, TokenText
from frontend.random_model import build_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def stream(tok, ids, prompt=None, **kw):
    d = IncrementalDetokenizer(tok, prompt, **kw)
    deltas = [d.add(t) for t in ids]
    deltas.append(d.flush())
    return deltas


@pytest.mark.parametrize("text", [
    "Hello world! How are you today?",
    "🙂🚀 emoji 🙂",
    "你好世界 こんにちは",
    "Über café naïve — “quotes”",
    "mixed 🙂你好 ascii🚀",
])
def test_deltas_concatenate_to_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    # Never a replacement character for a character that is merely incomplete so far.
    assert all("\ufffd" not in d for d in deltas)


def test_emoji_split_across_tokens_is_held_then_emitted_whole(tok):
    ids = tok.encode("a🙂", add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the emoji should span several byte tokens"
    deltas = stream(tok, ids)
    assert deltas[0] == "a"
    assert "🙂" in deltas
    assert deltas.count("") >= 1  # the incomplete bytes produced nothing


def test_arbitrary_byte_splits(tok):
    # Encode character by character so multi-byte characters become several byte tokens.
    text = "x🚀y你z"
    ids = [i for ch in text for i in tok.encode(ch, add_special_tokens=False)]
    assert "".join(stream(tok, ids)) == text


def test_prompt_context_does_not_leak_into_output(tok):
    prompt = tok.encode("Hello 你", add_special_tokens=False)
    ids = tok.encode(" world 🙂", add_special_tokens=False)
    assert "".join(stream(tok, ids, prompt)) == " world 🙂"


def test_skip_special_tokens(tok):
    end, start = tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    ids = tok.encode("Hi", add_special_tokens=False) + [end, start] + tok.encode(
        " there", add_special_tokens=False)
    assert "".join(stream(tok, ids, skip_special_tokens=True)) == "Hi there"
    assert "".join(stream(tok, ids, skip_special_tokens=False)) == (
        "Hi<|im_end|><|im_start|> there")


def test_incomplete_tail_flushed_at_end(tok):
    ids = tok.encode("ok🙂", add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    out = "".join(d.add(t) for t in ids[:-1])  # the emoji's last byte never comes
    assert out == "ok"
    tail = d.flush()
    assert tail and set(tail) == {"\ufffd"}
    assert out + tail == tok.decode(ids[:-1])


def test_long_sequence_window_stays_small(tok):
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 40, add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    text = "".join(d.add(t) for t in ids) + d.flush()
    assert text == tok.decode(ids)
    assert len(d.token_ids) < 100  # ids left of the window are dropped


def test_token_text_bytes_are_exact_for_partial_characters(tok):
    tt = TokenText(tok)
    ids = tok.encode("🙂", add_special_tokens=False)
    assert b"".join(bytes(tt.bytes(i)) for i in ids) == "🙂".encode()
    hi = tok.encode("Hello", add_special_tokens=False)
    assert "".join(tt.text(i) for i in hi) == "Hello"
