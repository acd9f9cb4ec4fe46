"""Review at the speed of real work (issue 14): the "approved" filter and column of the transcript search, and the
export of every approved conversation (JSONL and CSV) in one API call. Store on SQLite and PostgreSQL; the console
API through the real app."""

from __future__ import annotations

import csv
import io
import json

from chatbot.review import CSV_FIELDS, export_csv
from chatbot.store import Message, Store
from tests.chatbot.pg import db_url, store  # noqa: F401  (fixtures)
from tests.chatbot.test_handoff import _chat, _login, client  # noqa: F401  (fixtures and helpers)


def _reviewed(store: Store) -> dict[str, list[str]]:
    """Five conversations: two with an approved reply (one of them with two), one corrected but not approved,
    two never reviewed; returns ``{"approved": [...], "other": [...]}`` (ids, oldest first)."""
    staff = store.add_user("sam", "x" * 20, "staff")
    out: dict[str, list[str]] = {"approved": [], "other": []}
    for i, review in enumerate(["approve-two", "none", "approve", "correct-only", "none"]):
        cid = store.create_conversation(channel="web").id
        store.add_message(Message(conversation_id=cid, role="user", text=f"question {i}"))
        r1 = store.add_message(Message(conversation_id=cid, role="assistant", text=f"answer {i}"))
        store.add_message(Message(conversation_id=cid, role="user", text=f"follow-up {i}"))
        r2 = store.add_message(Message(conversation_id=cid, role="assistant", text=f"second answer {i}"))
        if review == "approve-two":
            store.annotate(r1.id, staff.id, None, approved=True)
            store.annotate(r2.id, staff.id, "A better second answer.", approved=True)
        elif review == "approve":
            store.annotate(r1.id, staff.id, "A better answer.", approved=True)
        elif review == "correct-only":
            store.annotate(r2.id, staff.id, "Corrected, not yet approved.", approved=False)
        out["approved" if review.startswith("approve") else "other"].append(cid)
    return out


def test_search_approved_filter_returns_exactly_the_approved_conversations(store):
    ids = _reviewed(store)
    found = store.search_conversations(approved=True)
    assert sorted(r["id"] for r in found) == sorted(ids["approved"])
    assert {r["id"]: r["approved"] for r in found} == {ids["approved"][0]: 2, ids["approved"][1]: 1}
    rest = store.search_conversations(approved=False)
    assert sorted(r["id"] for r in rest) == sorted(ids["other"]) and all(r["approved"] == 0 for r in rest)
    assert len(store.search_conversations()) == 5
    assert [r["id"] for r in store.search_conversations(text="question 2", approved=True)] == [ids["approved"][1]]
    assert store.search_conversations(text="question 1", approved=True) == []
    assert store.approved_conversation_ids() == ids["approved"]


def test_export_of_every_approved_conversation_as_csv_rows(store):
    ids = _reviewed(store)
    rows = list(csv.DictReader(io.StringIO(export_csv(store, store.approved_conversation_ids()))))
    assert tuple(rows[0]) == CSV_FIELDS
    assert len(rows) == 8 and {r["conversation_id"] for r in rows} == set(ids["approved"])  # 2 x 4 messages
    assert sum(r["approved"] == "True" for r in rows) == 3


def test_console_api_filters_and_exports_all_approved_in_one_call(client):  # noqa: F811
    staff = _login(client, "sam", "staff-password")
    cids = [_chat(client, q)["conversation_id"] for q in ("Can I change my address?", "Where is my parcel?",
                                                        "How do refunds work?")]
    for cid in cids[:2]:
        reply = client.get(f"/console/api/conversations/{cid}", headers=staff).json()["messages"][1]["id"]
        r = client.put(f"/console/api/messages/{reply}/annotation", headers=staff,
                       json={"corrected_text": f"Reviewed reply for {cid}.", "approved": True})
        assert r.status_code == 200
    found = client.get("/console/api/conversations", params={"approved": "true"}, headers=staff).json()
    assert sorted(c["id"] for c in found["conversations"]) == sorted(cids[:2])
    assert all(c["approved"] == 1 for c in found["conversations"])
    rest = client.get("/console/api/conversations", params={"approved": "false"}, headers=staff).json()
    assert [c["id"] for c in rest["conversations"]] == [cids[2]]

    r = client.get("/console/api/export", params={"approved_only": "true", "format": "jsonl"}, headers=staff)
    assert r.status_code == 200 and 'filename="approved-' in r.headers["content-disposition"]
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert sorted(x["id"] for x in lines) == sorted(f"store:{c}" for c in cids[:2])
    r = client.get("/console/api/export", params={"approved_only": "true", "format": "csv"}, headers=staff)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert {row["conversation_id"] for row in rows} == set(cids[:2])
    assert len(rows) == sum(len(client.get(f"/console/api/conversations/{c}", headers=staff).json()["messages"])
                            for c in cids[:2])
    # ids and approved_only together: the approved ones among the ids
    r = client.get("/console/api/export", params={"approved_only": "true", "format": "csv",
                                                  "ids": f"{cids[0]},{cids[2]}"}, headers=staff)
    assert {row["conversation_id"] for row in csv.DictReader(io.StringIO(r.text))} == {cids[0]}
    r = client.get("/console/api/export", params={"format": "csv"}, headers=staff)
    assert r.status_code == 400 and "approved_only=true" in r.json()["error"]["message"]
