"""Nothing a customer types can be turned against staff (issue 13, item 2), in headless Chromium against a
real ``chatbot serve``: messages that are HTML or Markdown show as their exact text on the customer's chat
page and in the staff console, no element of theirs reaches the DOM and no browser fetches the URL in them."""

from __future__ import annotations

import pytest

from tests.ui.test_console_browser import (  # noqa: F401  (server is a fixture)
    STAFF,
    _ask,
    _bot_texts,
    _conversation_id,
    _field,
    _login,
    _open_chat,
    _stored,
    _wait,
    server,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

HOSTILE = ["<script>alert(1)</script>", '<iframe src="http://attacker.example/frame"></iframe>', "<img src=x>",
           "![t](http://attacker.example/beacon.png)"]
STAFF_REPLY = "Seen: ![s](http://attacker.example/staff.png) <img src=x> **not bold**"


def _watch(ctx) -> list[str]:
    """Record every request of the browser context that goes to attacker.example or to ``/x`` (what
    ``<img src=x>`` would load), and stop it there."""
    seen: list[str] = []

    def block(route):
        seen.append(route.request.url)
        route.abort()

    ctx.route("**/*attacker.example*/**", block)
    ctx.route("**/x", block)
    ctx.on("request", lambda r: seen.append(r.url) if "attacker.example" in r.url or r.url.endswith("/x") else None)
    return seen


def _no_elements(page, selector: str) -> None:
    for tag in ("img", "iframe", "script"):
        assert page.locator(f"{selector} {tag}").count() == 0, f"a <{tag}> in {selector}"


def test_hostile_messages_show_as_text_to_customer_and_staff(browser, server):  # noqa: F811
    cctx, chat = _open_chat(browser, server.url)
    customer_requests = _watch(cctx)
    chat.click("#talk-to-person")  # a person has the conversation: the bot stays silent, nothing is generated
    _wait(lambda: any("in the queue" in t for t in _bot_texts(chat)), 60, "the queued notice")
    cid = _conversation_id(chat)
    for i, text in enumerate(HOSTILE, 1):
        _ask(chat, text)
        _wait(lambda n=i: len(_stored(server, cid)["messages"]) == n and (
            "Your message has been passed to our support team" in _bot_texts(chat)[-1]),
            60, f"the held notice of message {i}")
    assert [m["text"] for m in _stored(server, cid)["messages"] if m["role"] == "user"] == HOSTILE
    users = chat.locator("#chat .message-row.user-row")
    assert [users.nth(i).inner_text().strip() for i in range(users.count())] == HOSTILE
    _no_elements(chat, "#chat")

    sctx, console = _login(browser, server.url, STAFF)
    staff_requests = _watch(sctx)
    _field(console, "conv-id").fill(cid)
    console.click("#open")
    _wait(lambda: HOSTILE[-1] in console.locator("#transcript").inner_text(), 60, "the transcript")
    shown = console.locator("#transcript").inner_text()
    assert all(text in shown for text in HOSTILE), shown
    _no_elements(console, "#transcript")

    console.get_by_role("tab", name="Handoff queue").click()
    _field(console, "handoff-conv").fill(cid)
    console.click("#take")
    _wait(lambda: "You have conversation" in console.locator("#handoff-status").inner_text(), 30, "taking it")
    _field(console, "staff-reply").fill(STAFF_REPLY)
    console.click("#send-reply")
    _wait(lambda: "Reply sent" in console.locator("#handoff-status").inner_text(), 30, "sending")
    _wait(lambda: STAFF_REPLY in console.locator("#handoff-transcript").inner_text(), 30, "the reply in the transcript")
    _no_elements(console, "#handoff-transcript")

    # the customer sees the staff reply as its text, after the console's own "Support agent:" label
    _wait(lambda: any(t.endswith(STAFF_REPLY) for t in _bot_texts(chat)), 60, "the staff reply")
    assert "Support agent: " + STAFF_REPLY in _bot_texts(chat)[-1]
    _no_elements(chat, "#chat")
    assert customer_requests == [] and staff_requests == []
    cctx.close()
    sctx.close()
