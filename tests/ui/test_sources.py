"""The sources block under an answer (chat page) and the staff transcript: supporting spans highlighted,
document text shown literally, withheld sentences visible to staff only, what customers and staff write
shown as text. The Markdown is rendered with a CommonMark renderer (markdown-it-py), so the tests check
what a browser shows, not how the Markdown is spelled."""

from __future__ import annotations

import html.parser

import pytest

from chatbot.service import Citation
from ui.chat import customer_text, escape_markdown, format_sources, highlight_spans, safe_reply
from ui.console import render_transcript

PASSAGE = "Intro line.\nStandard shipping costs $8.00 per order.\nSee ![x](http://evil.example/b.png) <b>now</b>."

#: what issue 13 typed into the chat, and a few more ways Markdown and HTML could take over text
HOSTILE = ["<script>alert(1)</script>", '<iframe src="http://attacker.example/frame"></iframe>', "<img src=x>",
           "![t](http://attacker.example/beacon.png)", "[open](javascript:alert(1)) <http://attacker.example/a>",
           "**bold** _it_ `code` ~~gone~~ # not a heading", "1. not a list\n- nor this\n> nor a quote",
           "&lt;img src=x&gt; &amp; &#60;b&#62;", "| a | b |\n|---|---|\n| 1 | 2 |", "back\\slash \\*",
           "Mi pedido 123 no llegó 😀", "<<>>\n\n  two spaces"]


def _lines(dom) -> list[str]:
    return [x for x in "".join(dom.text).splitlines() if x.strip()]


class _Dom(html.parser.HTMLParser):
    """Tags and visible text of an HTML fragment."""

    def __init__(self, src: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(src)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def render(md: str) -> _Dom:
    """Markdown -> HTML as CommonMark (with GFM tables and strikethrough; raw HTML allowed, as Gradio's
    renderer does before sanitising) -> tags and text."""
    from markdown_it import MarkdownIt

    return _Dom(MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).render(md))


@pytest.mark.parametrize("text", HOSTILE)
def test_customer_text_renders_as_exactly_the_text(text):
    dom = render(customer_text(text))
    assert {tag for tag, _ in dom.tags} <= {"p", "br"}, dom.tags
    shown = "".join(dom.text).replace("\xa0", " ").replace("\n", "")
    assert shown == text.replace("\n", "").replace("\r", "")
    assert "\n" in customer_text("a\nb")  # line breaks are kept (as hard breaks)


def test_bot_replies_keep_their_markdown_but_no_html_and_no_image():
    dom = render(safe_reply("**Yes**, see [the policy](https://shop.example/returns). ![t](http://attacker.example/"
                            "beacon.png) <img src=x> <script>alert(1)</script>"))
    tags = [tag for tag, _ in dom.tags]
    assert "strong" in tags and ("a", {"href": "https://shop.example/returns"}) in dom.tags
    assert not {"img", "script", "iframe"} & set(tags)
    assert "<img src=x>" in "".join(dom.text) and "attacker.example/beacon.png" in "".join(dom.text)


def test_the_supporting_span_is_bold_and_the_rest_is_escaped():
    start = PASSAGE.index("Standard")
    end = start + len("Standard shipping costs $8.00 per order.")
    dom = render(highlight_spans(PASSAGE, [(start, end)], window=12))
    assert _lines(dom) == ["Intro line. Standard shipping costs $8.00 per order. See ![x](ht…"]
    assert [tag for tag, _ in dom.tags] == ["p", "strong"]
    assert escape_markdown("<img src=x> *a*\nb") == "\\<img src\\=x\\> \\*a\\* b"


def test_sources_list_only_the_passages_the_answer_rests_on():
    used = Citation(2, "ship.md", "Shipping cost", "kb/ship.md", 0.6, PASSAGE, [(12, 52)])
    unused = Citation(1, "other.md", "Other", "kb/other.md", 0.7, "Unrelated.")
    dom = render(format_sources([unused, used]))
    assert _lines(dom)[-2:] == [
        "[2] Shipping cost",
        "Intro line. Standard shipping costs $8.00 per order. See ![x](http://evil.example/b.png) <b>now</b>."]
    assert not {"img", "b", "a"} & {tag for tag, _ in dom.tags}
    # generate mode (no spans): every passage is listed, as before
    assert _lines(render(format_sources([unused]))) == ["Sources", "[1] Other"]
    assert format_sources([]) == ""


def test_sources_show_the_title_linked_to_the_public_url_and_never_the_source_path():
    cited = Citation(1, "gift_cards.md", "Gift cards [FAQ]", "/srv/app/var/uploads/gift_cards.md", 0.6, "Gift cards.",
                     url="https://help.example.com/docs/gift cards.md")
    plain = Citation(2, "returns.md", "Returns", "/srv/app/var/uploads/returns.md", 0.5, "Returns.")
    dom = render(format_sources([cited, plain]))
    assert ("a", {"href": "https://help.example.com/docs/gift%20cards.md"}) in dom.tags
    assert _lines(dom) == ["Sources", "[1] Gift cards [FAQ]", "[2] Returns"]
    assert "/srv/app" not in format_sources([cited, plain])
    # only http(s) addresses become links
    sneaky = Citation(1, "a.md", "A", "a.md", 0.5, "a", url="javascript:alert(1)")
    assert "a" not in {tag for tag, _ in render(format_sources([sneaky])).tags}


def _transcript(messages: list[dict]) -> str:
    return render_transcript({"conversation": {"id": "c1", "status": "bot", "channel": "web", "started_at": None},
                              "handoffs": [], "messages": messages})


def test_the_transcript_shows_staff_the_withheld_sentences_and_the_supporting_span():
    md = _transcript([{"id": 7, "role": "assistant", "text": "Standard shipping costs $8.00 per order [2].",
                       "created_at": None, "answer_kind": "verified",
                       "citations": [{"number": 2, "doc_id": "ship.md", "title": "Shipping cost", "source": "s",
                                      "score": 0.6, "passage": PASSAGE, "spans": [[12, 52]]}],
                       "withheld": [{"text": "Shipping costs 4% of the total.", "reason": "unsupported_claim",
                                     "claims": ["4"], "overlap": 0.5}]}])
    dom = render(md)
    text = "".join(dom.text)
    assert "answer verified" in text
    assert "Standard shipping costs $8.00 per order." in [d for d in dom.text]  # the bold span, one text node
    assert "Shipping costs 4% of the total. (unsupported_claim: 4)" in text
    assert ("s", {}) in dom.tags  # withheld sentences struck through
    assert not {"img", "b"} & {tag for tag, _ in dom.tags}


def test_the_transcript_shows_what_customers_and_staff_wrote_as_text():
    msgs = [{"id": i, "role": "user" if i % 2 else "staff", "author": "sam", "text": t, "created_at": None}
            for i, t in enumerate(HOSTILE, 1)]
    msgs.append({"id": 99, "role": "assistant", "text": "Sure ![t](http://attacker.example/beacon.png)",
                 "created_at": None, "feedback": {"rating": -1, "comment": "![c](http://attacker.example/c.png)"},
                 "annotation": {"corrected_text": "<img src=x>", "author": "sam"},
                 "slots": [{"type": "order_id", "value": "![s](http://attacker.example/s.png)"}]})
    dom = render(_transcript(msgs))
    tags = [t for t, _ in dom.tags]
    assert not {"img", "script", "iframe", "a", "table", "h1", "ol", "ul", "em", "s"} & set(tags), tags
    # only the console's own Markdown: the conversation id, "status **bot**" and one "**#n Role**" per message
    assert tags.count("code") == 1 and tags.count("strong") == 1 + len(msgs)
    text = "".join(dom.text).replace("\xa0", " ")
    for t in HOSTILE:
        assert t.replace("\n", "") in text.replace("\n", ""), t
    assert "![c](http://attacker.example/c.png)" in text and "“<img src=x>”" in text
    assert "order_id=![s](http://attacker.example/s.png)" in text
