"""Incremental detokenization that never splits a multi-byte character."""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turn a growing list of token ids into text deltas.

    Byte-level BPE can split one emoji or CJK character over several tokens;
    decoding a prefix then ends in U+FFFD. We decode the whole sequence each step
    and hold back the tail while it ends in U+FFFD, so the joined deltas equal
    ``tokenizer.decode(all_ids, skip_special_tokens=True)``. (The same idea as
    vLLM's and Hugging Face TGI's incremental detokenizers, without their
    offset windows; replies here are short.)

    Args:
        tokenizer: a Hugging Face tokenizer.
    """

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = 0  # characters of the decoded text already returned

    def push(self, token_ids: list[int]) -> str:
        """Add new token ids; return the newly complete text (may be empty)."""
        self._ids.extend(int(t) for t in token_ids)
        text = self._tok.decode(self._ids, skip_special_tokens=True)
        stable = len(text)
        while stable > self._emitted and text[stable - 1] == REPLACEMENT:
            stable -= 1
        delta = text[self._emitted : stable]
        self._emitted = max(self._emitted, stable)
        return delta

    def flush(self) -> str:
        """Return what is left at the end, without a trailing incomplete character.

        When generation stops in the middle of a multi-byte character (a length
        cut), the partial bytes decode to U+FFFD; they are dropped, not emitted.
        """
        text = self._tok.decode(self._ids, skip_special_tokens=True).rstrip(REPLACEMENT)
        delta = text[self._emitted :]
        self._emitted = max(self._emitted, len(text))
        return delta
