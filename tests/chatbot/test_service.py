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


def test_citations_one_per_passage_numbered_as_in_the_prompt():
    # one per passage (not per document): a reply sentence cites the passage [n] it rests on, with a span in it
    hits = [Hit(1, "a.md", "A", "sa", "t1", 0.9, 1), Hit(2, "b.md", "B", "sb", "t2", 0.8, 2),
            Hit(3, "a.md", "A", "sa", "t3", 0.7, 3)]
    cites = citations_from_hits(hits)
    assert [(c.number, c.doc_id, c.passage, c.spans) for c in cites] == [
        (1, "a.md", "t1", []), (2, "b.md", "t2", []), (3, "a.md", "t3", [])]


def test_company_field_markers_are_filled_in_the_stream_and_the_log(tmp_path):
    """A fine-tuned reply says [[phone]]; the customer and the log get the configured number."""
    import asyncio

    from tests.chatbot.fakes import ScriptedEngine, make_assistant

    a = make_assistant(tmp_path, ScriptedEngine("Call us on [[phone]] or visit [[website_url]] [1]."),
                       company_fields={"phone": "555-0100", "website_url": "shop.example"})

    async def run():
        turn = await a.start_turn(None, "How do I reach you?")
        return turn, [d async for d in turn.stream()]

    turn, deltas = asyncio.run(run())
    assert "".join(deltas) == turn.text == "Call us on 555-0100 or visit shop.example [1]."
    assert not any("[[" in d for d in deltas)
    assert a.store.messages(turn.conversation_id)[-1].text == turn.text
