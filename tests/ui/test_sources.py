"""The sources block under an answer (chat page) and the staff transcript: supporting spans highlighted,
document text shown literally, withheld sentences visible to staff only."""

from __future__ import annotations

from chatbot.service import Citation
from ui.chat import escape_markdown, format_sources, highlight_spans
from ui.console import render_transcript

PASSAGE = "Intro line.\nStandard shipping costs $8.00 per order.\nSee ![x](http://evil.example/b.png) <b>now</b>."


def test_the_supporting_span_is_bold_and_the_rest_is_escaped():
    start = PASSAGE.index("Standard")
    end = start + len("Standard shipping costs $8.00 per order.")
    assert highlight_spans(PASSAGE, [(start, end)], window=12) == (
        "Intro line. **Standard shipping costs $8.00 per order.** See \\!\\[x\\](ht…")
    assert escape_markdown("<img src=x> *a*") == "&lt;img src=x&gt; \\*a\\*"


def test_sources_list_only_the_passages_the_answer_rests_on():
    used = Citation(2, "ship.md", "Shipping cost", "kb/ship.md", 0.6, PASSAGE, [(12, 52)])
    unused = Citation(1, "other.md", "Other", "kb/other.md", 0.7, "Unrelated.")
    block = format_sources([unused, used])
    assert block.splitlines()[-2:] == ["- [2] Shipping cost (kb/ship.md)",
                                       "  > Intro line. **Standard shipping costs $8.00 per order.** See \\!\\[x\\]"
                                       "(http://evil.example/b.png) &lt;b&gt;now&lt;/b&gt;."]
    # generate mode (no spans): every passage is listed, as before
    assert [ln for ln in format_sources([unused]).splitlines() if ln.startswith("- ")] == ["- [1] Other (kb/other.md)"]
    assert format_sources([]) == ""


def test_the_transcript_shows_staff_the_withheld_sentences_and_the_supporting_span():
    t = {"conversation": {"id": "c1", "status": "bot", "channel": "web", "started_at": None}, "handoffs": [],
         "messages": [{"id": 7, "role": "assistant", "text": "Standard shipping costs $8.00 per order [2].",
                       "created_at": None, "answer_kind": "verified",
                       "citations": [{"number": 2, "doc_id": "ship.md", "title": "Shipping cost", "source": "s",
                                      "score": 0.6, "passage": PASSAGE, "spans": [[12, 52]]}],
                       "withheld": [{"text": "Shipping costs 4% of the total.", "reason": "unsupported_claim",
                                     "claims": ["4"], "overlap": 0.5}]}]}
    md = render_transcript(t)
    assert "answer verified" in md
    assert "**Standard shipping costs $8.00 per order.**" in md
    assert "- ~~Shipping costs 4% of the total.~~ (unsupported_claim: 4)" in md
