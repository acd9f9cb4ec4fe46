"""Serving behaviour of the HTTP API: metrics, client disconnect, 429 beyond the queue,
an over-long prompt, and the official ``openai`` client."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from chatbot.testing import start_server, stop_server

pytestmark = pytest.mark.slow


def metric(server, name: str, labels: str = "") -> float:
    """Value of one sample in /metrics (0 when absent)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def _last_message(server) -> tuple[str, str]:
    """(role, text) of the newest stored message."""
    from sqlmodel import select

    from chatbot.store import Message, Store

    store = Store(server.database_url)
    try:
        with store.session() as s:
            m = s.exec(select(Message).order_by(Message.id.desc()).limit(1)).one()
        return m.role, m.text
    finally:
        store.close()


def _messages(server) -> int:
    from chatbot.store import Message, Store

    store = Store(server.database_url)
    try:
        return store.count(Message)
    finally:
        store.close()


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory, kb_dir, chat_model_path):
    """One reply at a time, no queue, long messages allowed: to provoke 429 and the context limit."""
    server = start_server(tmp_path_factory.mktemp("busy"), kb_dir, "transformers",
                          MAX_CONCURRENT="1", MAX_QUEUED="0", MAX_MESSAGE_CHARS="50000", RETRY_AFTER_S="3")
    yield server
    stop_server(server)


def test_metrics_count_a_request(tf_server):
    label = '{endpoint="/v1/chat/completions",status="200"}'
    before = metric(tf_server, "chatbot_requests_total", label)
    tokens_before = metric(tf_server, "chatbot_generated_tokens_total")
    r = httpx.post(tf_server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}, timeout=120)
    assert r.status_code == 200
    assert metric(tf_server, "chatbot_requests_total", label) == before + 1
    assert metric(tf_server, "chatbot_generated_tokens_total") == tokens_before + r.json()["usage"]["completion_tokens"]
    assert metric(tf_server, "chatbot_ttft_seconds_count") >= 1
    assert metric(tf_server, "chatbot_requests_running") == 0


def test_client_disconnect_aborts_and_stores_no_reply(tf_server):
    """The customer's message is kept (stored when the turn was accepted); no reply, not even part of one."""
    aborted = metric(tf_server, "chatbot_requests_aborted_total")
    stored = _messages(tf_server)
    with httpx.stream("POST", tf_server.url + "/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "Tell me everything about refunds."}],
                            "stream": True, "max_tokens": 200}, timeout=120) as r:
        n = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                n += 1
            if n >= 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.time() + 30
    while time.time() < deadline and metric(tf_server, "chatbot_requests_aborted_total") < aborted + 1:
        time.sleep(0.2)
    assert metric(tf_server, "chatbot_requests_aborted_total") == aborted + 1
    assert metric(tf_server, "chatbot_requests_running") == 0
    assert _messages(tf_server) == stored + 1
    assert _last_message(tf_server) == ("user", "Tell me everything about refunds.")
    # the next request works
    r = httpx.post(tf_server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}, timeout=120)
    assert r.status_code == 200


def test_429_beyond_the_queue_with_retry_after(busy_server):
    results: dict = {}

    def long_request():
        results["long"] = httpx.post(
            busy_server.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Count from 1 to 200."}], "max_tokens": 120},
            timeout=300,
        )

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline and metric(busy_server, "chatbot_requests_running") < 1:
        time.sleep(0.1)
    r = httpx.post(busy_server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}, timeout=60)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3"
    assert r.json()["error"]["type"] == "rate_limit_error"
    t.join()
    assert results["long"].status_code == 200
    assert metric(busy_server, "chatbot_requests_rejected_total", '{reason="queue_full"}') == 1
    r = httpx.post(busy_server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}, timeout=60)
    assert r.status_code == 200


def test_message_longer_than_the_context_is_400_and_next_works(busy_server):
    # max_model_len is 1024 tokens in these servers: ~1.5x that in words
    r = httpx.post(busy_server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "refund " * 1536}], "max_tokens": 16}, timeout=60)
    assert r.status_code == 400
    assert "too long" in r.json()["error"]["message"]
    r = httpx.post(busy_server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}, timeout=60)
    assert r.status_code == 200


def test_openai_client_round_trip(tf_server):
    import openai

    client = openai.OpenAI(base_url=tf_server.url + "/v1", api_key="unused", max_retries=0)
    models = client.models.list()
    assert models.data[0].id == "embedded:smollm2-135m-instruct"
    resp = client.chat.completions.create(
        model=models.data[0].id, messages=[{"role": "user", "content": "I forgot my password"}], max_tokens=8
    )
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 8
    extra = resp.model_extra
    assert extra["citations"][0]["doc_id"] == "account_access__recover_password.md"
    stream = client.chat.completions.create(
        model=models.data[0].id, messages=[{"role": "user", "content": "And my username?"}], max_tokens=8,
        stream=True, extra_body={"conversation_id": extra["conversation_id"]},
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()
    assert chunks[0].model_extra["conversation_id"] == extra["conversation_id"]
    with pytest.raises(openai.BadRequestError, match="must not be empty"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": " "}])
