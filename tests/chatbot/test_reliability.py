"""Reliability of the conversation log and the console: concurrent SQLite writers, concurrent customers
through the HTTP API, a server killed with SIGKILL mid-conversation, and refused console access."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from chatbot.store import Conversation, Message, Store
from tests.chatbot.fakes import make_assistant

ROOT = Path(__file__).resolve().parents[2]


def test_two_writers_and_a_reader_on_one_sqlite_file(tmp_path):
    """2 writer threads x 50 rows plus a reader, each with its own connection pool: 100 rows, no lock errors."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    Store(url).create_conversation("c")
    errors: list[BaseException] = []
    reads: list[int] = []
    done = threading.Event()

    def writer(w: int) -> None:
        s = Store(url)
        try:
            for i in range(50):
                s.add_message(Message(conversation_id="c", role="user", text=f"w{w}-{i}", request_id=f"w{w}-{i}"))
        except BaseException as exc:  # noqa: BLE001  (collected and asserted below)
            errors.append(exc)
        finally:
            s.close()

    def reader() -> None:
        s = Store(url)
        try:
            while not done.is_set():
                reads.append(len(s.messages("c")))
                s.search_conversations(text="w1")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            s.close()

    threads = [threading.Thread(target=writer, args=(w,)) for w in (0, 1)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    r.join(60)
    assert errors == [], [str(e) for e in errors]
    s = Store(url)
    texts = [m.text for m in s.messages("c")]
    assert len(texts) == 100 and len(set(texts)) == 100
    for w in (0, 1):  # each writer's rows in its order
        mine = [t for t in texts if t.startswith(f"w{w}-")]
        assert mine == [f"w{w}-{i}" for i in range(50)]
    assert reads and reads == sorted(reads)  # the reader only ever saw committed, growing states
    assert s.integrity_check() == "ok"
    s.close()


@pytest.fixture(scope="module")
def console_app(tmp_path_factory):
    """The full app in-process (Gradio chat, console and operator pages mounted) with a staff user."""
    from chatbot.api import create_app
    from chatbot.auth import Auth

    tmp = tmp_path_factory.mktemp("console")
    a = make_assistant(tmp)
    Auth(a.store).add_user("sam", "staff-password", "staff")
    Auth(a.store).add_user("olga", "operator-password", "operator")
    app = create_app(a.settings, assistant=a, mount_ui=True)
    with TestClient(app) as c:
        yield c


CONSOLE_PATHS = ["/console/", "/console/config", "/console/gradio_api/info", "/operator/", "/operator/config",
                 "/console/api/conversations", "/console/api/export?ids=abc&format=jsonl",
                 "/console/api/export?ids=abc&format=csv", "/console/api/handoffs",
                 "/console/api/operator/analytics", "/console/api/operator/jobs"]


@pytest.mark.slow
def test_console_refuses_anonymous_requests_and_staff_on_operator_actions(console_app):
    c = console_app
    c.cookies.clear()
    for path in CONSOLE_PATHS:
        r = c.get(path, follow_redirects=False)
        assert r.status_code == 401, (path, r.status_code)
    for path in ["/console/gradio_api/queue/join", "/operator/gradio_api/queue/join",
                 "/console/api/conversations/x/reply", "/console/api/operator/users"]:
        r = c.post(path, json={}, follow_redirects=False)
        assert r.status_code == 401, (path, r.status_code)
    # a browser is sent to the login form, and comes back after logging in
    r = c.get("/console/", headers={"accept": "text/html"}, follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/console/login?next=/console/")
    r = c.post("/console/login", data={"username": "sam", "password": "nope", "next": "/console/"})
    assert r.status_code == 401 and "wrong user name or password" in r.text
    assert "chatbot_console" not in c.cookies
    r = c.post("/console/login", data={"username": "sam", "password": "staff-password", "next": "https://evil.example/"},
               follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/console/")  # no open redirect
    assert "httponly" in r.headers["set-cookie"].lower() and "samesite=lax" in r.headers["set-cookie"].lower()

    # staff: the staff console works, operator pages and actions do not
    assert c.get("/console/", headers={"accept": "text/html"}).status_code == 200
    assert c.get("/console/api/conversations").status_code == 200
    assert c.get("/console/api/export", params={"ids": "abc"}).status_code == 200
    for path in ["/operator/", "/operator/config", "/console/api/operator/analytics", "/console/api/operator/jobs"]:
        r = c.get(path, follow_redirects=False)
        assert r.status_code == 403, (path, r.status_code)
        assert "operators only" in r.text
    for path in ["/operator/gradio_api/queue/join", "/console/api/operator/users"]:
        assert c.post(path, json={}).status_code == 403
    r = c.get("/operator/", headers={"accept": "text/html"})
    assert r.status_code == 403 and "may not open /operator/" in r.text

    # logging out ends the session
    c.get("/console/logout")
    assert c.get("/console/api/conversations").status_code == 401

    # an operator reaches both
    c.post("/console/login", data={"username": "olga", "password": "operator-password", "next": "/operator/"})
    assert c.get("/operator/", headers={"accept": "text/html"}).status_code == 200
    assert c.get("/console/api/operator/analytics").status_code == 200
    assert c.get("/console/", headers={"accept": "text/html"}).status_code == 200
    c.get("/console/logout")
    # the customer side needs no login
    assert c.get("/widget.js").status_code == 200
    assert c.get("/", headers={"accept": "text/html"}).status_code == 200


@pytest.mark.slow
def test_concurrent_customers_every_message_stored_once(tf_server, tmp_path):
    """bench/load.py, small: 8 customers x 3 turns at once against the real server."""
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--url", tf_server.url, "--database-url",
         tf_server.database_url, "--customers", "8", "--turns", "3", "--max-tokens", "4", "--baseline-turns", "0",
         "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["loaded"]["requests"] == 24 and res["errors"] == []
    st = res["storage"]
    assert (st["expected_messages"], st["stored_user"], st["stored_replies"]) == (48, 24, 24)
    assert (st["missing"], st["duplicated"], st["conversations_out_of_order"]) == (0, 0, 0)
    assert "missing 0, duplicated 0" in proc.stdout


@pytest.mark.slow
def test_kill_9_mid_conversation_keeps_what_was_committed(tmp_path, kb_dir, chat_model_path):
    from chatbot.testing import start_server, stop_server

    server = start_server(tmp_path, kb_dir, "transformers")
    try:
        def chat(text, cid=None, max_tokens=8):
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
            if cid:
                body["conversation_id"] = cid
            r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)
            assert r.status_code == 200, r.text
            return r.json()

        cid = chat("How do I return an item?")["conversation_id"]
        chat("And how long does the refund take?", cid)
        # a third turn is streaming when the server is killed
        seen = threading.Event()

        def stream():
            try:
                with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=300, json={
                        "messages": [{"role": "user", "content": "Tell me everything about store credit."}],
                        "conversation_id": cid, "stream": True, "max_tokens": 200}) as r:
                    for line in r.iter_lines():
                        if '"content"' in line and '"content": ""' not in line:
                            seen.set()
            except httpx.HTTPError:
                pass

        t = threading.Thread(target=stream)
        t.start()
        assert seen.wait(240), "the reply never started streaming"
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(30)
        t.join(60)
        assert server.proc.returncode == -signal.SIGKILL
    finally:
        if server.proc.poll() is None:
            stop_server(server)

    store = Store(server.database_url)
    assert store.integrity_check() == "ok"
    msgs = store.messages(cid)
    # both finished turns, and the customer's third message; no half-written reply
    assert [m.role for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[4].text == "Tell me everything about store credit."
    assert all(m.text for m in msgs[:4])
    store.close()

    server2 = start_server(tmp_path, kb_dir, "transformers")
    try:
        r = httpx.post(server2.url + "/v1/chat/completions", timeout=300, json={
            "messages": [{"role": "user", "content": "Are you still there?"}], "conversation_id": cid,
            "max_tokens": 8})
        assert r.status_code == 200, r.text
        assert r.json()["conversation_id"] == cid
    finally:
        stop_server(server2)
    store = Store(server.database_url)
    assert [m.role for m in store.messages(cid)] == ["user", "assistant", "user", "assistant", "user", "user",
                                                     "assistant"]
    assert store.count(Conversation) == 1
    assert store.integrity_check() == "ok"
    store.close()
