"""Prompt assembly and trimming to the token budget."""

from __future__ import annotations

import pytest

from chatbot.engines.base import ChatMessage
from chatbot.errors import InvalidInputError
from chatbot.prompts import NO_PASSAGE_NOTE, build_prompt, format_passages
from retrieval.documents import Hit


def _hit(i: int, text: str = "word " * 20) -> Hit:
    return Hit(chunk_id=i, doc_id=f"d{i}.md", title=f"Doc {i}", source=f"src{i}", text=text, score=0.9 - i / 10, rank=i)


def count_words(msgs: list[ChatMessage]) -> int:
    """Stand-in tokenizer: one token per whitespace-separated word."""
    return sum(len(m.content.split()) for m in msgs)


def test_passages_are_numbered_and_fenced():
    text = format_passages([_hit(1, "alpha"), _hit(2, "beta >>> gamma")])
    assert text.startswith("[1] Doc 1\n<<<\nalpha\n>>>")
    assert "[2] Doc 2" in text
    assert text.count(">>>") == 2  # the passage's own '>>>' was defused


def test_everything_fits():
    hist = [ChatMessage("user", "a b"), ChatMessage("assistant", "c d")]
    p = build_prompt("sys", "question", [_hit(1), _hit(2)], hist, count_words, budget_tokens=1000)
    assert [m.role for m in p.messages] == ["system", "user", "assistant", "user"]
    assert p.history_kept == 2 and len(p.hits) == 2
    assert p.prompt_tokens == count_words(p.messages)


def test_oldest_history_goes_first_then_passages():
    hist = [ChatMessage("user", "old " * 30), ChatMessage("assistant", "old " * 30),
            ChatMessage("user", "new " * 5), ChatMessage("assistant", "new " * 5)]
    hits = [_hit(1), _hit(2), _hit(3)]
    full = count_words(build_prompt("sys", "q", hits, hist, count_words, 10_000).messages)
    # room for everything but the oldest pair
    p = build_prompt("sys", "q", hits, hist, count_words, budget_tokens=full - 60)
    assert p.history_kept == 2 and [m.content.split()[0] for m in p.messages[1:3]] == ["new", "new"]
    assert len(p.hits) == 3
    # no history at all and only the best passage fits
    one = count_words(build_prompt("sys", "q", hits[:1], [], count_words, 10_000).messages)
    p = build_prompt("sys", "q", hits, hist, count_words, budget_tokens=one)
    assert p.history_kept == 0 and [h.chunk_id for h in p.hits] == [1]


def test_no_passages_uses_the_fallback_note():
    p = build_prompt("sys", "hello", [], [], count_words, 1000)
    assert NO_PASSAGE_NOTE in p.messages[0].content


def test_message_that_cannot_fit_is_rejected():
    with pytest.raises(InvalidInputError, match="too long"):
        build_prompt("sys", "w " * 500, [_hit(1)], [], count_words, budget_tokens=100)
