"""Live handoff: the conversation moves to the queue, staff take it and reply, the customer sees the
reply, the bot stays silent until staff hand it back or close it. Through the service and through
the HTTP API (customer endpoints and the console API), with the feedback endpoint."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from chatbot.service import HANDOFF_NOTICE
from chatbot.store import Feedback
from tests.chatbot.fakes import ScriptedEngine, make_assistant


def test_the_bot_is_silent_while_a_person_has_the_conversation(tmp_path):
    engine = ScriptedEngine()
    a = make_assistant(tmp_path, engine)
    sam = a.store.add_user("sam", "x" * 20, "staff")

    async def run():
        t1 = await a.respond(None, "My parcel never arrived")
        cid = t1.conversation_id
        h = await a.request_handoff(cid, "customer_request")
        assert h.conversation_id == cid and a.store.get_conversation(cid).status == "handoff"
        calls = len(engine.prompts)
        t2 = await a.respond(cid, "Hello? Anyone there?")
        assert (t2.held, t2.status, t2.text, t2.message_id) == (True, "handoff", HANDOFF_NOTICE, None)
        assert len(engine.prompts) == calls  # no generation
        a.store.take_handoff(cid, sam.id)
        a.log.staff_reply(cid, sam.id, "Hi, I'm Sam from support. Your email is bob@example.com?")
        t3 = await a.respond(cid, "yes that's me")
        assert (t3.held, t3.status) == (True, "human")
        assert len(engine.prompts) == calls
        a.store.release_handoff(cid)
        t4 = await a.respond(cid, "one more question about returns")
        assert not t4.held and t4.message_id is not None
        assert len(engine.prompts) == calls + 1
        return cid

    cid = asyncio.run(run())
    msgs = a.store.messages(cid)
    assert [(m.role, m.action) for m in msgs] == [
        ("user", None), ("assistant", None), ("user", "held"), ("staff", None), ("user", "held"), ("user", None),
        ("assistant", None)]
    assert msgs[3].text == "Hi, I'm [NAME] from support. Your email is [EMAIL]?"  # staff text is redacted too
    body, _ = a.metrics.render()
    assert b'chatbot_handoffs_total{reason="customer_request"} 1.0' in body


def test_a_person_can_be_asked_for_before_the_first_message(tmp_path):
    a = make_assistant(tmp_path)
    h = asyncio.run(a.request_handoff(None, "customer_request"))
    t = asyncio.run(a.respond(h.conversation_id, "I need a human"))
    assert t.held and [m.role for m in a.store.messages(h.conversation_id)] == ["user"]
    assert a.store.handoff_queue()[0]["preview"] == "I need a human"


@pytest.fixture
def client(tmp_path):
    from chatbot.api import create_app
    from chatbot.auth import Auth

    a = make_assistant(tmp_path, admin_password="operator-password")
    Auth(a.store).add_user("sam", "staff-password", "staff")
    app = create_app(a.settings, assistant=a, mount_ui=False)
    with TestClient(app) as c:
        c.assistant = a
        yield c


def _chat(client, text, conversation_id=None):
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 20}
    if conversation_id:
        body["conversation_id"] = conversation_id
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _login(client, user, password):
    r = client.post("/console/api/login", json={"username": user, "password": password})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def test_handoff_round_trip_over_http(client):
    first = _chat(client, "My order is wrong")
    cid = first["conversation_id"]
    r = client.post("/v1/handoff", json={"conversation_id": cid})
    assert r.json()["status"] == "handoff"
    held = _chat(client, "Please, a person", cid)
    assert held["choices"][0]["message"]["content"] == HANDOFF_NOTICE
    assert client.get(f"/v1/conversations/{cid}").json()["status"] == "handoff"

    client.cookies.clear()
    staff = _login(client, "sam", "staff-password")
    client.cookies.clear()  # the bearer header only
    queue = client.get("/console/api/handoffs", headers=staff).json()["handoffs"]
    assert [(q["conversation_id"], q["reason"], q["preview"]) for q in queue] == [
        (cid, "customer_request", "Please, a person")]
    assert client.post(f"/console/api/conversations/{cid}/take", headers=staff).json()["assigned_to"] == "sam"
    sent = client.post(f"/console/api/conversations/{cid}/reply", headers=staff,
                       json={"text": "Hi, Sam here. I'll fix the order."}).json()

    # the customer (no login) polls for new messages
    new = client.get(f"/v1/conversations/{cid}/messages", params={"after": sent["id"] - 1}).json()
    assert new["status"] == "human"
    assert [(m["role"], m["text"]) for m in new["messages"]] == [("staff", "Hi, Sam here. I'll fix the order.")]
    assert _chat(client, "thanks!", cid)["choices"][0]["message"]["content"] == HANDOFF_NOTICE

    assert client.post(f"/console/api/conversations/{cid}/close", headers=staff).json()["status"] == "closed"
    assert client.get("/console/api/handoffs", headers=staff).json()["handoffs"] == []
    # writing again reopens it with the bot
    again = _chat(client, "one more thing", cid)
    assert again["choices"][0]["message"]["content"] != HANDOFF_NOTICE
    assert client.get(f"/v1/conversations/{cid}").json()["status"] == "bot"


def test_feedback_endpoint(client):
    out = _chat(client, "How do refunds work?")
    cid = out["conversation_id"]
    msgs = client.get(f"/v1/conversations/{cid}/messages").json()["messages"]
    reply = next(m for m in msgs if m["role"] == "assistant")
    r = client.post("/v1/feedback", json={"conversation_id": cid, "message_id": reply["id"], "rating": "down",
                                          "comment": "not what I asked"})
    assert r.json() == {"message_id": reply["id"], "rating": -1}
    assert client.assistant.store.count(Feedback) == 1
    # someone without the conversation id cannot rate it
    r = client.post("/v1/feedback", json={"conversation_id": "other", "message_id": reply["id"], "rating": "up"})
    assert r.status_code == 404 and "does not exist in conversation 'other'" in r.json()["error"]["message"]
    r = client.post("/v1/feedback", json={"conversation_id": cid, "message_id": reply["id"], "rating": "meh"})
    assert r.status_code == 422
    assert client.assistant.store.transcript(cid)["messages"][1]["feedback"] == {"rating": -1,
                                                                                 "comment": "not what I asked"}


def test_console_api_review_and_export(client):
    cid = _chat(client, "Can I change my address?")["conversation_id"]
    other = _chat(client, "Unrelated question")["conversation_id"]
    staff = _login(client, "sam", "staff-password")
    found = client.get("/console/api/conversations", params={"q": "ADDRESS"}, headers=staff).json()["conversations"]
    assert [c["id"] for c in found] == [cid]
    r = client.get("/console/api/conversations?q=%00", headers=staff)  # a NUL: no message holds one
    assert r.status_code == 200 and r.json()["conversations"] == []
    t = client.get(f"/console/api/conversations/{cid}", headers=staff).json()
    reply_id = t["messages"][1]["id"]
    r = client.put(f"/console/api/messages/{reply_id}/annotation", headers=staff,
                   json={"corrected_text": "Yes: Account > Addresses. Questions? mail help@shop.example",
                         "approved": True})
    assert r.json()["approved"] is True
    assert r.json()["corrected_text"] == "Yes: Account > Addresses. Questions? mail [EMAIL]"
    r = client.get("/console/api/export", params={"ids": f"{cid},{other}", "format": "jsonl"}, headers=staff)
    assert r.status_code == 200 and r.headers["content-disposition"].startswith("attachment;")
    lines = [__import__("json").loads(x) for x in r.text.splitlines()]
    assert [x["id"] for x in lines] == [f"store:{cid}", f"store:{other}"]
    assert lines[0]["messages"][1]["content"] == "Yes: Account > Addresses. Questions? mail [EMAIL]"
    r = client.get("/console/api/export", params={"approved_only": "true"}, headers=staff)
    assert [__import__("json").loads(x)["id"] for x in r.text.splitlines()] == [f"store:{cid}"]
    r = client.get("/console/api/export", params={"ids": cid, "format": "csv"}, headers=staff)
    assert r.text.splitlines()[0].startswith("conversation_id,message_id,created_at,role,text")
    assert len(r.text.strip().splitlines()) == 3
    r = client.get("/console/api/export", params={"ids": ""}, headers=staff)
    assert r.status_code == 400 and "ids must name at least one conversation" in r.json()["error"]["message"]
    r = client.get("/console/api/conversations", params={"since": "yesterday"}, headers=staff)
    assert r.status_code == 400 and "since must be a date YYYY-MM-DD, got 'yesterday'" in r.json()["error"]["message"]


def test_admin_is_bootstrapped_from_the_setting_and_can_add_staff(client):
    op = _login(client, "admin", "operator-password")
    assert client.get("/console/api/me", headers=op).json() == {"username": "admin", "role": "operator"}
    r = client.post("/console/api/operator/users", headers=op,
                    json={"username": "newbie", "password": "newbie-password", "role": "staff"})
    assert r.json() == {"username": "newbie", "role": "staff"}
    assert client.get("/console/api/operator/analytics", headers=op).status_code == 200
    r = client.post("/console/api/login", json={"username": "admin", "password": "wrong-password"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "wrong user name or password"
