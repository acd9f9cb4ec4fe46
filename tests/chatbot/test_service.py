"""Input validation and citations of the turn pipeline."""

from __future__ import annotations

import pytest

from chatbot.errors import InvalidInputError
from chatbot.service import citations_from_hits, clean_message
from retrieval.documents import Hit


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("  hello  ", "hello"),
        ("a\x00b\x07c", "abc"),
        ("line1\nline2\tx", "line1\nline2\tx"),
        ("😀", "😀"),
        ("e\u0301", "\u00e9"),  # NFC
    ],
)
def test_clean_message(raw, expected):
    assert clean_message(raw, 100) == expected


@pytest.mark.parametrize("raw,needle", [("", "empty"), (" \n ", "empty"), ("\x1b\x00", "empty"), ("\u200b\u200d", "empty"),
                                        ("x" * 101, "at most 100 characters, got 101"), (5, "string")])
def test_clean_message_rejects(raw, needle):
    with pytest.raises(InvalidInputError, match=needle):
        clean_message(raw, 100)


def test_citations_one_per_document_in_passage_order():
    hits = [Hit(1, "a.md", "A", "sa", "t", 0.9, 1), Hit(2, "b.md", "B", "sb", "t", 0.8, 2),
            Hit(3, "a.md", "A", "sa", "t", 0.7, 3)]
    cites = citations_from_hits(hits)
    assert [(c.number, c.doc_id) for c in cites] == [(1, "a.md"), (2, "b.md")]
