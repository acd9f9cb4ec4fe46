"""Review at the speed of real work (issue 14), in headless Chromium against a real ``chatbot serve``: the
"approved" filter and column, export of every approved conversation in one click (JSONL and CSV), the transcript
pane cleared by a new search, headers that do not break inside a word; in the customer chat the handoff notice is
a message of its own and a reply cut at the token limit says so."""

from __future__ import annotations

import csv
import json
import uuid

import pytest

from tests.ui.test_console_browser import STAFF, _ask, _bot_texts, _conversation_id, _field, _login, _open_chat, \
    _stored, _wait, server  # noqa: F401  (the server fixture)
from ui.chat import CUT_NOTICE, QUEUED_NOTICE

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _seed(server, marker: str) -> dict[str, list[str]]:
    """Three conversations whose first message holds ``marker``: two with an approved (corrected) reply, one not."""
    from chatbot.store import Message, Store

    store = Store(server.database_url)
    out: dict[str, list[str]] = {"approved": [], "other": []}
    try:
        staff = store.get_user(STAFF[0])
        for i, approve in enumerate([True, False, True]):
            cid = store.create_conversation(channel="web").id
            store.add_message(Message(conversation_id=cid, role="user", text=f"Question {i} about returns {marker}"))
            r = store.add_message(Message(conversation_id=cid, role="assistant", text=f"Draft answer {i}."))
            if approve:
                store.annotate(r.id, staff.id, f"Corrected answer {i}: returns are free within 30 days.", True)
            out["approved" if approve else "other"].append(cid)
    finally:
        store.close()
    return out


def _bot_messages(chat) -> list[str]:
    """The text of each bot message bubble, in order (one bubble a message: the chat does not group them)."""
    return chat.locator("#chat .message-row.bot-row").all_inner_texts()


def _choose(page, elem_id: str, option: str) -> None:
    _field(page, elem_id).click()
    page.get_by_role("option", name=option, exact=True).click()


def _column(page, key: int, col: int) -> dict[str, str]:
    """``{cell of column key: cell of column col}`` over the result rows (the grid's virtual rows)."""
    n = page.locator("#results [role=row].virtual-row").count()

    def cell(r: int, c: int) -> str:
        return page.locator(f"#results [data-testid='cell-{r}-{c}']").inner_text().strip()

    return {cell(r, key): cell(r, col) for r in range(n)}


def _search(page, text: str, expect: int) -> None:
    _field(page, "search-text").fill(text)
    page.click("#search")
    _wait(lambda: f"{expect} conversation(s)" in page.locator("#search-count").inner_text(), 60,
          f"{expect} search results")


def test_approved_filter_export_all_and_a_cleared_transcript_pane(browser, server):
    marker = f"ref-{uuid.uuid4().hex[:8]}"
    ids = _seed(server, marker)
    ctx, page = _login(browser, server.url, STAFF)
    _search(page, marker, 3)
    # the "approved" column counts the approved replies of each conversation
    headers = [h.strip() for h in page.locator("#results thead th").all_inner_texts()]
    assert "approved" in headers, headers
    col = headers.index("approved")
    by_id = _column(page, 0, col)
    assert by_id == {**{c: "1" for c in ids["approved"]}, **{c: "0" for c in ids["other"]}}
    # headers are not squeezed into one syllable a line: "messages" takes as many lines as "id"
    one_line = page.locator("#results thead th", has_text="id").first.bounding_box()["height"]
    messages = page.locator("#results thead th", has_text="messages").first.bounding_box()["height"]
    assert messages <= one_line + 1, (messages, one_line)

    # open one conversation, then filter on "approved": the old transcript is gone
    page.locator("#results [role=gridcell]", has_text=ids["other"][0]).first.click()
    _wait(lambda: ids["other"][0] in page.locator("#transcript").inner_text(), 60, "the transcript")
    _choose(page, "search-approved", "approved")
    _search(page, marker, 2)
    assert page.locator("#transcript").inner_text().strip() == ""
    assert _field(page, "conv-id").input_value() == ""
    assert set(_column(page, 0, col)) == set(ids["approved"])

    # one click exports every approved conversation
    with page.expect_download() as dl:
        page.click("#export-approved-jsonl")
    lines = [json.loads(x) for x in open(dl.value.path()).read().splitlines()]
    got = {x["id"] for x in lines}
    assert {f"store:{c}" for c in ids["approved"]} <= got and f"store:{ids['other'][0]}" not in got
    assert dl.value.suggested_filename.startswith("approved-") and dl.value.suggested_filename.endswith(".jsonl")
    with page.expect_download() as dl:
        page.click("#export-approved-csv")
    rows = list(csv.DictReader(open(dl.value.path(), newline="")))
    mine = [r for r in rows if r["conversation_id"] in ids["approved"] + ids["other"]]
    assert len(mine) == 4 and {r["conversation_id"] for r in mine} == set(ids["approved"])
    assert sum(r["approved"] == "True" for r in mine) == 2
    ctx.close()


def test_handoff_notice_is_its_own_message_and_a_cut_reply_says_so(browser, server):
    cctx, chat = _open_chat(browser, server.url)
    _ask(chat, "How do I reset my password?")
    _wait(lambda: any("Sources" in t for t in _bot_messages(chat)), 300, "an answer with sources")
    cid = _conversation_id(chat)
    reply = _wait(lambda: [m for m in _stored(server, cid)["messages"] if m["role"] == "assistant"], 30,
                  "the stored reply")[0]
    cut = reply["finish_reason"] == "length"
    if cut:  # the server generates at most 48 tokens: a reply cut there says so, above its sources
        last = _wait(lambda: CUT_NOTICE in _bot_messages(chat)[-1] and _bot_messages(chat)[-1], 30, "the cut notice")
        assert last.index(CUT_NOTICE) < last.index("Sources")
        assert last.split(CUT_NOTICE)[0].rstrip().endswith((".", "!", "?", "…", ":", ")", "]"))
    else:
        assert all(CUT_NOTICE not in t for t in _bot_messages(chat))
    before = len(_bot_messages(chat))
    chat.click("#talk-to-person")
    _wait(lambda: len(_bot_messages(chat)) == before + 1, 60, "the queued notice as a new message")
    texts = _bot_messages(chat)
    assert QUEUED_NOTICE in texts[-1] and "Sources" not in texts[-1]
    assert QUEUED_NOTICE not in texts[-2]
    cctx.close()


def test_handoff_by_intent_chart_reads_with_30_intents(browser, server):
    from chatbot.store import Message, Store
    from tests.ui.test_console_browser import OPERATOR

    store = Store(server.database_url)
    try:
        for k in range(30):
            cid = store.create_conversation(channel="web").id
            store.add_message(Message(conversation_id=cid, role="user", text=f"Help with topic {k}",
                                      intent=f"topic_number_{k:02d}"))
            store.request_handoff(cid, "handoff_intent", intent=f"topic_number_{k:02d}")
    finally:
        store.close()
    ctx, op = _login(browser, server.url, OPERATOR, path="/operator/")
    op.get_by_role("tab", name="Analytics").click()
    plot = op.locator("#plot-handoff-intent")
    _wait(lambda: plot.locator("svg, canvas").count() > 0, 60, "the handoff-by-intent chart")
    box = _wait(lambda: (b := plot.bounding_box()) and b["height"] > 700 and b, 60, "a chart tall enough for 30 bars")
    assert box["height"] > box["width"] * 0.5  # horizontal bars: it grows downwards, one row an intent
    ctx.close()
