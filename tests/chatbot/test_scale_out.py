"""Two ``chatbot serve`` processes on one PostgreSQL database and one data folder (issue 13, item 6).

The scale-out the README promises: API replicas behind a load balancer share the store (PostgreSQL by
URL) and the data folder (index versions, adapter registry and its ``LIVE.json``, uploads) on shared
storage. Both servers here run the transformers engine with the real SmolLM2-135M over the KB slice;
both start at the same time (each sets up the index, migrates the database and creates the admin user), and
the client sends each request to one or the other, as a load balancer without session affinity would:

* a conversation's turns sent alternately to both are stored once each, in order;
* a handoff asked for on one silences the bot on the other; a staff member logged in on one takes it
  there, and the reply reaches the customer polling the other;
* an adapter promoted on one server's operator page is served by both;
* a document uploaded and re-indexed on one server's operator page is cited by both;
* a customer asking for a person, or rating a reply, on both servers at the same moment gets one handoff /
  one rating, and two staff approving one reply at once one annotation (store level, two connection pools
  standing in for the two processes; no model needed).
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from chatbot.service import HANDOFF_NOTICE
from chatbot.testing import start_server, stop_server
from tests.chatbot.pg import SKIP_REASON, postgres_server_url, temp_database

pytestmark = pytest.mark.postgres

ADMIN_PASSWORD = "scale-out-admin-pw"
SIGN_OFF = "Cheers, the Quokka crew"
GIFT_CARDS = """# Gift cards

Gift cards are sold in amounts from 10 to 500 dollars. A gift card never expires.
The balance of a gift card is shown on the Gift card balance page of your account.
A lost gift card is replaced once when you show the original receipt.
"""


@pytest.fixture(scope="module")
def pg_url():
    server = postgres_server_url()
    if server is None:
        pytest.skip(SKIP_REASON)
    with temp_database(server) as url:
        yield url


@pytest.fixture(scope="module")
def servers(tmp_path_factory, kb_dir, chat_model_path, pg_url):
    """Servers A and B on one PostgreSQL database and one data folder, started at the same time as replicas are
    (each runs ``chatbot setup`` (ingest) and migrates the database and creates the admin user on start)."""
    from concurrent.futures import ThreadPoolExecutor

    shared = tmp_path_factory.mktemp("shared") / "var"
    env = {"DATABASE_URL": pg_url, "ADMIN_PASSWORD": ADMIN_PASSWORD, "MAX_NEW_TOKENS": "24"}
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_server, tmp_path_factory.mktemp(name), kb_dir, "transformers", data_dir=shared,
                               **env) for name in ("a", "b")]
    started = [f.result() for f in futures if f.exception() is None]
    if len(started) < 2:
        for server in started:
            stop_server(server)
        raise next(f.exception() for f in futures if f.exception() is not None)
    yield tuple(started)
    for server in started:
        stop_server(server)


@pytest.fixture(scope="module")
def token(servers) -> str:
    """A console session of the operator, opened on server A (sessions live in the shared store)."""
    a, _ = servers
    r = httpx.post(a.url + "/console/api/login", json={"username": "admin", "password": ADMIN_PASSWORD}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["token"]


@pytest.fixture(scope="module")
def store(pg_url):
    """The shared store, read directly by the test."""
    from chatbot.store import Store

    s = Store(pg_url, migrate=False)
    yield s
    s.close()


def chat(server, text: str, conversation_id: str | None = None) -> dict:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=600,
                   json={"messages": [{"role": "user", "content": text}], "conversation_id": conversation_id})
    assert r.status_code == 200, f"{r.status_code} {r.text}\n{server.log()}"
    return r.json()


def staff(server, token: str, method: str, path: str, **kw) -> dict:
    r = httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=120, **kw)
    assert r.status_code == 200, f"{method} {path}: {r.status_code} {r.text}"
    return r.json()


def operator_page(server, token: str):
    """A Gradio client of the server's operator page, logged in with ``token``."""
    from gradio_client import Client

    return Client(server.url + "/operator/", headers={"Authorization": f"Bearer {token}"}, verbose=False,
                  download_files=False, analytics_enabled=False)


@pytest.mark.slow
def test_both_started_at_once_share_one_index_and_one_admin(servers, store):
    from chatbot.store import User
    from retrieval.index import current_version_name

    a, _ = servers
    versions = {httpx.get(s.url + "/healthz", timeout=30).json()["index_version"] for s in servers}
    assert versions == {current_version_name(a.data_dir / "index")}
    assert len(list((a.data_dir / "index" / "versions").iterdir())) == 1  # the second setup found nothing new
    assert [u.username for u in store.list_users()] == ["admin"] and store.count(User) == 1


@pytest.mark.slow
def test_turns_sent_alternately_to_both_are_stored_once_each_in_order(servers, store):
    a, b = servers
    texts = ["How do I return an item in the wrong size?", "And if the color is wrong?",
             "How long does the refund take?", "Thanks, and how do I check my refund status?"]
    replies = []
    cid = None
    for i, text in enumerate(texts):
        out = chat(a if i % 2 == 0 else b, text, cid)
        cid = cid or out["conversation_id"]
        assert out["conversation_id"] == cid
        replies.append(out)
    rows = store.messages(cid)
    assert [r.role for r in rows] == ["user", "assistant"] * 4
    assert [r.text for r in rows[0::2]] == texts
    # each turn's two rows carry the request id of the response that served it, in the order sent
    request_ids = [out["id"].removeprefix("chatcmpl-") for out in replies]
    assert [r.request_id for r in rows[0::2]] == request_ids
    assert [r.request_id for r in rows[1::2]] == request_ids
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert [r.engine for r in rows[1::2]] == ["transformers"] * 4
    # the customer polling either server sees the same transcript
    seen = [httpx.get(s.url + f"/v1/conversations/{cid}/messages", timeout=30).json()["messages"] for s in (a, b)]
    assert seen[0] == seen[1] and [m["id"] for m in seen[0]] == [r.id for r in rows]


@pytest.mark.slow
def test_handoff_on_one_silences_the_bot_on_the_other_and_staff_replies_cross(servers, token, store):
    a, b = servers
    first = chat(a, "How do I reset my password?")
    cid = first["conversation_id"]
    r = httpx.post(a.url + "/v1/handoff", json={"conversation_id": cid}, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "handoff"

    held = chat(b, "Is anyone there?", cid)
    assert held["status"] == "handoff"
    assert held["choices"][0]["message"]["content"] == HANDOFF_NOTICE
    queue = staff(b, token, "GET", "/console/api/handoffs")["handoffs"]  # the session opened on A works on B
    assert [h["conversation_id"] for h in queue].count(cid) == 1

    # staff take it on A and reply there; the customer polls B
    assert staff(a, token, "POST", f"/console/api/conversations/{cid}/take")["status"] == "human"
    last_id = max(m.id for m in store.messages(cid))
    held = chat(b, "Hello? I still cannot log in.", cid)
    assert held["status"] == "human" and held["choices"][0]["message"]["content"] == HANDOFF_NOTICE
    sent = staff(a, token, "POST", f"/console/api/conversations/{cid}/reply",
                 json={"text": "Hi, this is Sam from support: I have sent you a reset link."})
    polled = httpx.get(b.url + f"/v1/conversations/{cid}/messages", params={"after": last_id}, timeout=30).json()
    assert polled["status"] == "human"
    assert [(m["role"], m["text"]) for m in polled["messages"]] == [
        ("user", "Hello? I still cannot log in."),
        ("staff", "Hi, this is Sam from support: I have sent you a reset link.")]
    assert polled["messages"][-1]["id"] == sent["id"]

    rows = store.messages(cid)
    # the bot answered only the first message: nothing generated while people had the conversation
    assert [r.role for r in rows] == ["user", "assistant", "user", "user", "staff"]
    assert [r.action for r in rows if r.role == "user"][1:] == ["held", "held"]

    # handed back on B, the bot answers again on A
    assert staff(b, token, "POST", f"/console/api/conversations/{cid}/release")["status"] == "bot"
    again = chat(a, "Thanks. How do I reset my password again?", cid)
    assert again["status"] == "bot" and again["choices"][0]["message"]["content"] != HANDOFF_NOTICE
    assert [r.role for r in store.messages(cid)][-2:] == ["user", "assistant"]
    assert cid not in [h["conversation_id"] for h in store.handoff_queue()]


@pytest.fixture(scope="module")
def signoff_adapter(servers, chat_model_path):
    """A LoRA adapter of the served SmolLM2, overfit in 12 steps to end with the sign-off, trained into the
    shared registry with a validation split (so the promotion gate has a loss to compare with the base's)."""
    from finetune.data import Dialogue
    from finetune.sft import SFTConfig, train_sft
    from tests.finetune.sft_helpers import QUESTIONS

    a, _ = servers
    ds = [Dialogue(f"q{i}", [{"role": "user", "content": q},
                             {"role": "assistant", "content": f"Happy to help! {SIGN_OFF}"}])
          for i, q in enumerate(QUESTIONS)]
    cfg = SFTConfig(base_model=chat_model_path, max_steps=12, batch_size=4, learning_rate=3e-3, lora_r=8,
                    lora_alpha=16, lora_dropout=0.0, warmup_ratio=0.0, eval_steps=0, eval_replies=0,
                    validation=0.25, test=0.0, max_length=96, logging_steps=4, early_stopping_patience=0,
                    small_data_threshold=0)
    res = train_sft(ds, a.data_dir / "adapters" / "signoff", cfg, progress=False)
    return res.manifest["version"]


@pytest.mark.slow
def test_adapter_promoted_on_one_goes_live_on_both(servers, token, store, signoff_adapter):
    a, b = servers
    question = "My order never arrived, can you check?"
    before = [chat(s, question) for s in (a, b)]
    assert all(SIGN_OFF not in out["choices"][0]["message"]["content"] for out in before)

    result = operator_page(a, token).predict("signoff", api_name="/promote")
    assert signoff_adapter in result

    after = [chat(s, question) for s in (b, a)]
    for out, s in zip(after, (b, a)):
        assert SIGN_OFF in out["choices"][0]["message"]["content"], s.log()
        reply = store.messages(out["conversation_id"])[-1]
        assert (reply.role, reply.adapter_version) == ("assistant", signoff_adapter)
    assert [store.messages(out["conversation_id"])[-1].adapter_version for out in before] == [None, None]
    for s in (a, b):
        served = [m["id"] for m in httpx.get(s.url + "/v1/models", timeout=30).json()["data"] if m.get("served")]
        assert served == [signoff_adapter]


@pytest.mark.slow
def test_index_published_by_one_is_served_by_both(servers, token, tmp_path):
    a, b = servers
    question = "Does a gift card expire?"

    def cited(s) -> list[str]:
        return [c["title"] for c in chat(s, question)["citations"]]

    old = {httpx.get(s.url + "/healthz", timeout=30).json()["index_version"] for s in (a, b)}
    assert len(old) == 1 and None not in old
    assert all("Gift cards" not in cited(s) for s in (a, b))

    doc = tmp_path / "gift_cards.md"
    doc.write_text(GIFT_CARDS)
    from gradio_client import handle_file

    operator_page(a, token).predict([handle_file(str(doc))], False, api_name="/start_reindex")
    job = None
    for _ in range(600):
        jobs = staff(a, token, "GET", "/console/api/operator/jobs")["jobs"]
        job = next(j for j in jobs if j["kind"] == "reindex")
        if job["status"] != "running":
            break
        time.sleep(0.5)
    assert job["status"] == "done", job
    assert job["result"]["published"] and len(job["result"]["added"]) == 1
    version = job["result"]["version"]
    assert version not in old

    for s in (b, a):
        titles = cited(s)
        assert titles and titles[0] == "Gift cards", (titles, s.log())
        assert httpx.get(s.url + "/healthz", timeout=30).json()["index_version"] == version


@pytest.fixture
def two_stores():
    """Two stores on one fresh database (two connection pools: the two server processes) and a conversation with
    a customer message and a reply."""
    from chatbot.store import Message, Store

    server = postgres_server_url()
    if server is None:
        pytest.skip(SKIP_REASON)
    with temp_database(server) as url:
        a, b = Store(url), Store(url, migrate=False)
        cid = a.create_conversation(channel="web").id
        a.add_message(Message(conversation_id=cid, role="user", text="I want to talk to a person"))
        reply = a.add_message(Message(conversation_id=cid, role="assistant", text="Let me find someone for you."))
        yield a, b, cid, reply.id
        a.close()
        b.close()


def at_once(a, b, table: str, call) -> list:
    """Run ``call(store)`` for both stores in two threads while the test holds a lock on ``table`` that stops
    inserts there but no reads, until both wait for a lock: so both read before either writes, whatever the
    timing. Returns what the calls returned (exceptions included)."""
    from sqlalchemy import text

    out: list = []

    def run(store):
        try:
            out.append(call(store))
        except Exception as exc:  # noqa: BLE001 (the caller asserts on it)
            out.append(exc)

    with a.engine.connect() as blocker:
        blocker.execute(text(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"))
        threads = [threading.Thread(target=run, args=(s,)) for s in (a, b)]
        for t in threads:
            t.start()
        waiting = 0
        for _ in range(600):
            blocker.execute(text("SELECT pg_stat_clear_snapshot()"))  # else the view stays as first read
            waiting = blocker.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                           "AND wait_event_type = 'Lock'")).scalar_one()
            if waiting == 2:
                break
            time.sleep(0.1)
        blocker.commit()
    for t in threads:
        t.join()
    assert waiting == 2
    return out


def test_handoffs_asked_on_both_servers_at_once_open_one(two_stores):
    """A customer's "talk to a person", sent twice and balanced to both servers: one handoff in the staff queue."""
    from chatbot.store import Handoff

    a, b, cid, _ = two_stores
    results = at_once(a, b, "handoff", lambda store: store.request_handoff(cid, "customer_request"))
    assert [type(r).__name__ for r in results] == ["Handoff", "Handoff"]
    assert len({h.id for h in results}) == 1
    pending = [h for h in a.transcript(cid)["handoffs"] if h["status"] in ("open", "assigned")]
    assert len(pending) == 1 and a.count(Handoff) == 1
    assert [h["conversation_id"] for h in b.handoff_queue()] == [cid]


def test_feedback_sent_to_both_servers_at_once_is_one_rating(two_stores):
    """A double-clicked thumbs-up balanced to both servers: both succeed, one feedback row (no error 500)."""
    from chatbot.store import Feedback

    a, b, cid, reply_id = two_stores
    results = at_once(a, b, "feedback", lambda store: store.add_feedback(cid, reply_id, 1))
    assert [type(r).__name__ for r in results] == ["Feedback", "Feedback"], results
    assert a.count(Feedback) == 1


def test_annotations_saved_on_both_servers_at_once_are_one_row(two_stores):
    """Two staff members approving one reply at the same moment on the two servers: one annotation row."""
    from chatbot.store import Annotation

    a, b, _, reply_id = two_stores
    results = at_once(a, b, "annotation", lambda store: store.annotate(reply_id, None, approved=True))
    assert [type(r).__name__ for r in results] == ["Annotation", "Annotation"], results
    assert a.count(Annotation) == 1
