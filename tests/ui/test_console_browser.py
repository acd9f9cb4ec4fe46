"""Customer chat, staff console and handoff in headless Chromium (Debian chromium, driven by Playwright)
against a real ``chatbot serve`` (transformers engine, SmolLM2, the KB slice)."""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

STAFF = ("review_staff", "staff-password-1")
OPERATOR = ("review_operator", "operator-password-1")


@pytest.fixture(scope="module")
def server(tf_server):
    """The shared server, with a staff account in its store."""
    from chatbot.auth import Auth
    from chatbot.store import Store

    store = Store(tf_server.database_url)
    try:
        if store.get_user(STAFF[0]) is None:
            Auth(store).add_user(*STAFF, role="staff")
        if store.get_user(OPERATOR[0]) is None:
            Auth(store).add_user(*OPERATOR, role="operator")
    finally:
        store.close()
    return tf_server


def _field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def _ask(page, text: str) -> None:
    box = page.locator("#message textarea")
    box.fill(text)
    box.press("Enter")


def _bot_texts(page) -> list[str]:
    rows = page.locator("#chat .message-row.bot-row, #chat [data-testid='bot']")
    return [rows.nth(i).inner_text() for i in range(rows.count())]


def _wait(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # the page is still rendering
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def _conversation_id(page) -> str:
    """The conversation id the page shows (once its first answer is complete)."""
    m = _wait(lambda: re.search(r"\b[0-9a-f]{32}\b", page.locator("#conversation-ref").inner_text()), 300,
              "the conversation reference")
    return m.group(0)


def _open_chat(browser, url: str):
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(url + "/", wait_until="load")
    page.wait_for_selector("#message textarea", timeout=60_000)
    return ctx, page


def _login(browser, url: str, user: tuple[str, str], path: str = "/console/"):
    ctx = browser.new_context(accept_downloads=True)
    page = ctx.new_page()
    page.goto(url + path, wait_until="load")
    assert "/console/login" in page.url  # not logged in: sent to the form
    page.fill("#username", user[0])
    page.fill("#password", user[1])
    page.click("#login")
    page.wait_for_selector("#search-text, #queue, #reindex", timeout=60_000)
    return ctx, page


def _stored(server, cid: str):
    from chatbot.store import Store

    store = Store(server.database_url)
    try:
        return store.transcript(cid)
    finally:
        store.close()


def test_customer_answer_thumbs_down_then_staff_review_and_jsonl_export(browser, server, tmp_path):
    question = f"How do I return an item I bought? (ref {uuid.uuid4().hex[:6]})"
    cctx, chat = _open_chat(browser, server.url)
    _ask(chat, question)
    seen: list[str] = []

    def answered():
        texts = _bot_texts(chat)
        if texts and (not seen or texts[-1] != seen[-1]):
            seen.append(texts[-1])
        return texts and "Sources" in texts[-1]

    _wait(answered, 300, "a streamed answer with sources", interval=0.1)
    assert len(seen) >= 3, seen  # it grew in steps
    cid = _conversation_id(chat)
    reply_id = _wait(lambda: [m for m in _stored(server, cid)["messages"] if m["role"] == "assistant"], 30,
                     "the stored reply")[0]["id"]
    chat.locator("#chat button[aria-label='Dislike']").last.click()
    fb = _wait(lambda: _stored(server, cid)["messages"][1]["feedback"], 30, "the thumbs-down in the store")
    assert fb["rating"] == -1
    cctx.close()

    sctx, console = _login(browser, server.url, STAFF)
    _wait(lambda: "Logged in as review_staff (staff)" in console.locator("body").inner_text(), 60, "the header")
    _field(console, "search-text").fill(question.split("(ref ")[1].rstrip(")"))
    console.click("#search")
    _wait(lambda: "1 conversation(s)" in console.locator("#search-count").inner_text(), 60, "the search result")
    console.locator("#results [role=gridcell]", has_text=cid).first.click()
    _wait(lambda: cid in console.locator("#transcript").inner_text(), 60, "the transcript")
    transcript = console.locator("#transcript").inner_text()
    assert question in transcript and "thumbs down" in transcript and "sources [1]" in transcript
    corrected = "To return an item, open Orders, choose Return and print the label [1]."
    _field(console, "corrected").fill(corrected)
    console.locator("#approved input").check()
    console.click("#save-annotation")
    _wait(lambda: "approved for training" in console.locator("#annotation-status").inner_text(), 60, "saving")
    ann = _stored(server, cid)["messages"][1]["annotation"]
    assert ann == {"corrected_text": corrected, "approved": True, "author": STAFF[0], "approved_by": STAFF[0]}
    assert _stored(server, cid)["messages"][1]["id"] == reply_id
    console.click("#add-export")
    console.wait_for_selector("#export-jsonl", timeout=30_000)
    with console.expect_download() as dl:
        console.click("#export-jsonl")
    lines = [json.loads(x) for x in open(dl.value.path()).read().splitlines()]
    assert dl.value.suggested_filename.endswith(".jsonl")
    assert [x["id"] for x in lines] == [f"store:{cid}"]
    assert lines[0]["messages"] == [{"role": "user", "content": question}, {"role": "assistant", "content": corrected}]
    sctx.close()


def test_two_parallel_sessions_stay_isolated(browser, server):
    (ca, a), (cb, b) = _open_chat(browser, server.url), _open_chat(browser, server.url)
    qa, qb = "I forgot my password, what now?", "Is my promo code still valid?"
    _ask(a, qa)
    _ask(b, qb)  # both in flight at once
    # the page shows its conversation reference once its first answer is complete
    ida, idb = _conversation_id(a), _conversation_id(b)
    assert ida != idb
    ta, tb = a.locator("#chat").inner_text(), b.locator("#chat").inner_text()
    assert qa in ta and qb not in ta
    assert qb in tb and qa not in tb
    # a second turn continues each page's own conversation
    _ask(a, "Thanks, and my username?")
    _wait(lambda: len([m for m in _stored(server, ida)["messages"] if m["role"] == "assistant"]) == 2, 300,
          "the second answer to be stored")
    assert _conversation_id(a) == ida
    users_a = [m["text"] for m in _stored(server, ida)["messages"] if m["role"] == "user"]
    users_b = [m["text"] for m in _stored(server, idb)["messages"] if m["role"] == "user"]
    assert users_a == [qa, "Thanks, and my username?"] and users_b == [qb]
    second = _stored(server, ida)["messages"][-1]["text"]
    _wait(lambda: second[:20] in a.locator("#chat").inner_text(), 60, "the second answer on page a")
    assert "Thanks, and my username?" not in b.locator("#chat").inner_text()
    ca.close()
    cb.close()


def test_handoff_round_trip(browser, server):
    cctx, chat = _open_chat(browser, server.url)
    chat.click("#talk-to-person")
    _wait(lambda: any("in the queue" in t for t in _bot_texts(chat)), 60, "the queued notice")
    cid = _conversation_id(chat)
    _ask(chat, "My parcel arrived damaged, please help")
    _wait(lambda: "passed to our support team" in _bot_texts(chat)[-1], 60, "the held notice")

    sctx, console = _login(browser, server.url, STAFF)
    console.get_by_role("tab", name="Handoff queue").click()
    console.click("#queue-refresh")
    cell = console.locator("#queue [role=gridcell]", has_text=cid).first
    _wait(lambda: cell.count() and cell.is_visible(), 60, "the conversation in the handoff queue")
    cell.click()
    _wait(lambda: _field(console, "handoff-conv").input_value() == cid, 30, "the picked conversation")
    _wait(lambda: "parcel arrived damaged" in console.locator("#handoff-transcript").inner_text(), 30, "transcript")
    console.click("#take")
    _wait(lambda: "You have conversation" in console.locator("#handoff-status").inner_text(), 30, "taking it")
    _field(console, "staff-reply").fill("Sorry about that! I have sent a replacement today.")
    console.click("#send-reply")
    _wait(lambda: "Reply sent" in console.locator("#handoff-status").inner_text(), 30, "sending")

    # the customer sees the staff reply in the same chat window; the bot said nothing more
    _wait(lambda: any("I have sent a replacement today" in t for t in _bot_texts(chat)), 60, "the staff reply")
    assert "Support agent" in _bot_texts(chat)[-1]
    msgs = _stored(server, cid)["messages"]
    assert [m["role"] for m in msgs] == ["user", "staff"]
    assert _stored(server, cid)["conversation"]["status"] == "human"
    console.click("#hand-back")
    _wait(lambda: "Handed back" in console.locator("#handoff-status").inner_text(), 30, "handing back")
    _wait(lambda: any("handed the conversation back" in t for t in _bot_texts(chat)), 60, "the hand-back notice")
    cctx.close()
    sctx.close()


def test_operator_pages_for_operators_only(browser, server):
    sctx, staff = _login(browser, server.url, STAFF)
    r = staff.goto(server.url + "/operator/", wait_until="load")
    assert r.status == 403 and "operators only" in staff.locator("body").inner_text()
    sctx.close()
    octx, op = _login(browser, server.url, OPERATOR, path="/operator/")
    _wait(lambda: "Logged in as review_operator (operator)" in op.locator("body").inner_text(), 60, "the header")
    op.get_by_role("tab", name="Analytics").click()
    summary = _wait(lambda: (t := op.locator("#analytics-summary").inner_text()) and "conversations" in t and t, 60,
                    "the analytics summary")
    assert "deflection" in summary and "thumbs up" in summary
    for plot in ("plot-per-day", "plot-deflection", "plot-handoff-intent", "plot-thumbs"):
        _wait(lambda p=plot: op.locator(f"#{p} canvas, #{p} svg").count() > 0, 60, f"the {plot} chart")
    assert "Top questions retrieval could not answer" in op.locator("body").inner_text()
    op.get_by_role("tab", name="Documents").click()
    assert op.locator("#reindex").is_visible()
    octx.close()


EMBED_PAGE = """<!doctype html><html><head><title>Shop</title></head><body>
<h1>Acme Shop</h1><p>Our products.</p>
<script src="{url}/widget.js" data-title="Need help?" async></script>
</body></html>"""


@pytest.fixture
def shop_site():
    """Another web site (its own origin: another port) whose page embeds the chat; yields its URL setter."""
    import http.server
    import threading

    pages: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            body = pages.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.end_headers()
            self.wfile.write(body or b"not found")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", pages
    httpd.shutdown()


def test_chat_embedded_in_another_site(browser, server, shop_site):
    """A page of another site (origin) embeds the chat with the documented script tag."""
    site, pages = shop_site
    pages["/"] = EMBED_PAGE.format(url=server.url).encode()
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(site + "/", wait_until="load")
    page.click("#chatbot-launcher")
    frame = page.frame_locator("#chatbot-frame")
    frame.locator("#message textarea").fill("How do I recover my password?")
    frame.locator("#message textarea").press("Enter")
    bot = frame.locator("#chat .message-row.bot-row, #chat [data-testid='bot']").last
    _wait(lambda: "Sources" in bot.inner_text(timeout=1000), 300, "an answer inside the embedded chat")
    assert "Recover" in bot.inner_text() or "password" in bot.inner_text().lower()
    assert page.locator("h1").inner_text() == "Acme Shop"  # the host page is untouched
    assert page.evaluate("location.origin") != server.url
    ctx.close()


def test_operator_promotes_sees_it_served_and_rolls_back(browser, server, chat_model_path):
    """Issue 14: Training tab -> promote: the verdict in sentences, "Live and served", the next reply produced by
    the adapter (the API's ``model`` field, ``adapter_version`` stored) without a restart; an adapter that changes
    nothing is refused with the reason; the audit list names the operator; rollback serves the base model again."""
    from finetune.sft import model_fingerprint
    from tests.finetune.test_adapters import _fake_adapter

    import httpx

    reg = server.data_dir / "adapters"
    sha = model_fingerprint(chat_model_path)
    tag = uuid.uuid4().hex[:6]
    good = _fake_adapter(reg, f"ui-good-{tag}", sha, 2.0, 0.30, 0.90, "2026-02-01", base=chat_model_path)
    _fake_adapter(reg, f"ui-zero-{tag}", sha, 1.0, 0.90, 1.00, "2026-02-02", base=chat_model_path, zero_b=True)
    octx, op = _login(browser, server.url, OPERATOR, path="/operator/")
    try:
        op.get_by_role("tab", name="Training").click()
        _field(op, "adapter-version").fill(f"ui-zero-{tag}")
        op.click("#promote")
        _wait(lambda: "does not change the model" in op.locator("body").inner_text(), 120, "the refusal")
        _field(op, "adapter-version").fill(f"ui-good-{tag}")
        op.click("#promote")
        result = _wait(lambda: (t := op.locator("#adapter-result").inner_text()) and "Promoted" in t and t, 120,
                       "the promotion")
        assert f"Promoted {good}" in result and "by review_operator" in result and "{" not in result
        assert "Verdict:" in result and f"Live and served: {good}" in result
        _wait(lambda: "review_operator" in op.locator("#adapter-history").inner_text(), 60, "the audit list")
        body = httpx.post(server.url + "/v1/chat/completions", timeout=300,
                          json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}).json()
        assert body["model"] == good
        models = {m["id"]: m for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]}
        assert models[good]["served"] and models[good]["live"]
        assert _stored(server, body["conversation_id"])["messages"][-1]["adapter_version"] == good
    finally:
        op.click("#rollback")
        _wait(lambda: "Rolled back" in op.locator("#adapter-result").inner_text(), 120, "the rollback")
        octx.close()
    body = httpx.post(server.url + "/v1/chat/completions", timeout=300,
                      json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}).json()
    assert body["model"] == "embedded:smollm2-135m-instruct"
