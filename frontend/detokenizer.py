"""Token ids -> text, one token at a time, without breaking multi-byte characters.

A byte-level BPE token can hold half of an emoji; decoding it alone gives U+FFFD. The prefix/read
offset technique decodes only a short window of recent tokens and emits the new text once it no
longer ends in U+FFFD, so the cost per token is O(window), not O(sequence).
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as left context: sentencepiece tokenizers drop a leading space when a token is
# decoded at the start of a string, so the first generated token needs something before it.
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.decode_kwargs = {"skip_special_tokens": skip_special_tokens}
        if not spaces_between_special_tokens:
            # Only slow tokenizers read this; fast ones never add those spaces.
            self.decode_kwargs["spaces_between_special_tokens"] = False
        context = list(prompt_token_ids or [])[-_PROMPT_CONTEXT:]
        # A prompt that ends mid-character would make the offsets lie: start without context then.
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []
        self.token_ids: list[int] = context
        self.prefix_offset = 0  # start of the window that gives new text its left context
        self.read_offset = len(context)  # tokens before this are already emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self.decode_kwargs)

    def add(self, token_id: int) -> str:
        """Appends one token; returns the newly complete text (may be '')."""
        self.token_ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end, as U+FFFD):
        the sequence is over, so it is final as it is."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset == len(self.token_ids):
            return ""
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) and not final:
            # e.g. a skipped special token, or bytes that do not form a character yet
            return ""
        if new_text.endswith(_REPLACEMENT) and not final:
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        # Drop ids left of the window so the list does not grow with the sequence.
        if self.prefix_offset > 64:
            del self.token_ids[:self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        return delta


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


class TokenText:
    """Per-token strings and bytes for logprobs (cached: vocabularies are small, lookups hot).

    ``bytes`` is exact for byte-level BPE (half an emoji gives its real bytes, as OpenAI's
    ``bytes`` field intends); other tokenizers fall back to the UTF-8 of the decoded text.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._compute(token_id)
        return hit

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self.get(token_id)[1]

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        raw = None
        if self.byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece and all(c in _BYTE_OF_CHAR for c in piece):
                raw = [_BYTE_OF_CHAR[c] for c in piece]
        return text, raw if raw is not None else list(text.encode("utf-8"))
