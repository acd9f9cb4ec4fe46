"""End to end through the HTTP API on the transformers engine, plus every bad input of issue 2."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.slow

QUESTION = "How do I return an item I bought?"
RETURN_DOCS = {
    "product_defect__return_size.md",
    "product_defect__return_color.md",
    "product_defect__refund_initiate.md",
    "product_defect__refund_status.md",
}


def _post(server, body, stream=False, timeout=300):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=timeout)


def _counts(server):
    from chatbot.store import Conversation, Message, Store

    store = Store(server.database_url)
    try:
        return store.count(Conversation), store.count(Message)
    finally:
        store.close()


def read_sse(response) -> list[dict]:
    """Parse an SSE body into its JSON events; asserts it ends with [DONE]."""
    events, done = [], False
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            done = True
            continue
        events.append(json.loads(data))
    assert done, "stream did not end with data: [DONE]"
    return events


def stream_chat(server, content: str = QUESTION, max_tokens: int = 24) -> tuple[int, httpx.Headers, list[dict]]:
    """POST a streamed chat completion of one customer message: (status, headers, SSE events; [] unless 200).
    The transformers and vLLM API tests both stream through here."""
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": content}], "stream": True, "max_tokens": max_tokens},
        timeout=300,
    ) as r:
        return r.status_code, r.headers, read_sse(r) if r.status_code == 200 else []


def test_healthz_reports_model_engine_and_index(tf_server):
    r = httpx.get(tf_server.url + "/healthz", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["engine"] == "transformers"
    assert body["model"] == "embedded:smollm2-135m-instruct"
    assert body["index_version"].startswith("v")


def test_streamed_answer_cites_return_policies_and_is_stored(tf_server):
    before = _counts(tf_server)
    status, headers, events = stream_chat(tf_server)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    first, last = events[0], events[-1]
    assert first["choices"][0]["delta"]["role"] == "assistant"
    cited = {c["doc_id"] for c in first["citations"]}
    assert cited & RETURN_DOCS, cited
    assert first["citations"][0]["doc_id"] in RETURN_DOCS
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events[1:-1]]
    assert len([p for p in pieces if p]) >= 2, "answer was not streamed in pieces"
    text = "".join(pieces)
    assert text.strip()
    assert "<|im_end|>" not in text and "<|im_start|>" not in text
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert last["usage"]["completion_tokens"] <= 24
    assert last["usage"]["prompt_tokens"] > 50
    conv_id = last["conversation_id"]

    # the turn is in the database: one new conversation, two new messages
    after = _counts(tf_server)
    assert after == (before[0] + 1, before[1] + 2)
    from chatbot.store import Store

    store = Store(tf_server.database_url)
    msgs = store.messages(conv_id)
    store.close()
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[0].text == QUESTION
    assert msgs[1].text == text
    assert msgs[1].chunk_ids and all(isinstance(i, str) for i in msgs[1].chunk_ids)
    assert msgs[1].latency_ms > 0
    assert msgs[1].completion_tokens == last["usage"]["completion_tokens"]
    assert msgs[1].index_version.startswith("v")


def test_non_streaming_and_conversation_continues(tf_server):
    r = _post(tf_server, {"messages": [{"role": "user", "content": "I forgot my password"}], "max_tokens": 16})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert body["citations"][0]["doc_id"] == "account_access__recover_password.md"
    conv = body["conversation_id"]
    r2 = _post(
        tf_server,
        {"messages": [{"role": "user", "content": "And my username?"}], "max_tokens": 8, "conversation_id": conv},
    )
    assert r2.status_code == 200, r2.text
    assert r2.json()["conversation_id"] == conv
    from chatbot.store import Store

    store = Store(tf_server.database_url)
    assert [m.role for m in store.messages(conv)] == ["user", "assistant", "user", "assistant"]
    store.close()


def test_hello_stops_by_itself(tf_server):
    r = _post(tf_server, {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 200})
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 200
    assert "<|im_end|>" not in body["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "body,status,needle",
    [
        ({"messages": [{"role": "user", "content": ""}]}, 400, "must not be empty"),
        ({"messages": [{"role": "user", "content": "   \n\t  "}]}, 400, "must not be empty"),
        ({"messages": [{"role": "user", "content": "\x00\x07\x1b"}]}, 400, "must not be empty"),
        ({"messages": [{"role": "user", "content": "x" * 100_000}]}, 400, "at most 4000 characters"),
        ({"messages": [{"role": "user", "content": "hi"}], "conversation_id": "nope"}, 404, "does not exist"),
        ({"messages": []}, 422, "messages"),
        ({"messages": [{"role": "user"}]}, 422, "content"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "role 'user'"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 422, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400, "max_tokens"),
    ],
    ids=["empty", "whitespace", "control-only", "100k-chars", "unknown-conversation", "no-messages",
         "no-content", "last-not-user", "max-tokens-0", "max-tokens-too-big"],
)
def test_bad_input_gets_clear_error_and_stores_nothing(tf_server, body, status, needle):
    before = _counts(tf_server)
    r = _post(tf_server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"]
    assert err["type"]
    assert _counts(tf_server) == before


def test_malformed_json_is_422(tf_server):
    before = _counts(tf_server)
    r = httpx.post(
        tf_server.url + "/v1/chat/completions",
        content=b'{"messages": [{"role": "user", "content": "hi"',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 422
    assert "invalid request body" in r.json()["error"]["message"]
    assert _counts(tf_server) == before


def test_emoji_only_and_control_chars_get_an_answer(tf_server):
    r = _post(tf_server, {"messages": [{"role": "user", "content": "😀😀😀"}], "max_tokens": 12})
    assert r.status_code == 200
    assert "\ufffd" not in r.json()["choices"][0]["message"]["content"]
    r = _post(tf_server, {"messages": [{"role": "user", "content": "where is\x07 my\x1b order?"}], "max_tokens": 8})
    assert r.status_code == 200
    from chatbot.store import Store

    store = Store(tf_server.database_url)
    stored = store.messages(r.json()["conversation_id"])[0].text
    store.close()
    assert stored == "where is my order?"
    # the server is still up after all of the above
    assert httpx.get(tf_server.url + "/healthz", timeout=10).status_code == 200
