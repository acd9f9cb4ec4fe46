"""The remote engine against our own OpenAI-compatible server (as it would talk to `vllm serve`)."""

from __future__ import annotations

import asyncio

import pytest

from chatbot.engines.base import ChatMessage, GenerationParams
from chatbot.errors import InvalidInputError

pytestmark = pytest.mark.slow


def _collect(engine, messages, params):
    async def go():
        await engine.start()
        try:
            return [c async for c in engine.stream(messages, params, "r1")]
        finally:
            await engine.close()

    return asyncio.run(go())


def test_remote_engine_streams_with_usage_and_finish_reason(tf_server, chat_model_path):
    from chatbot.engines.remote import RemoteEngine

    eng = RemoteEngine(tf_server.url, "embedded:smollm2-135m-instruct", chat_model_path, max_model_len=1024)
    chunks = _collect(eng, [ChatMessage("user", "Hello")], GenerationParams(max_tokens=40))
    assert chunks[-1].finish_reason == "stop"
    text = "".join(c.text for c in chunks)
    assert text.strip() and "<|im_end|>" not in text
    assert 0 < chunks[-1].completion_tokens < 40
    assert chunks[-1].prompt_tokens > 0
    chunks = _collect(eng, [ChatMessage("user", "Count from 1 to 100.")], GenerationParams(max_tokens=3))
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 3


def test_remote_engine_maps_a_400(tf_server, chat_model_path):
    from chatbot.engines.remote import RemoteEngine

    eng = RemoteEngine(tf_server.url, "m", chat_model_path, max_model_len=1024)
    with pytest.raises(InvalidInputError, match="must not be empty"):
        _collect(eng, [ChatMessage("user", "   ")], GenerationParams(max_tokens=3))


def test_remote_url_is_validated():
    from chatbot.engines.remote import RemoteEngine

    with pytest.raises(ValueError, match="remote_url must start with http"):
        RemoteEngine("localhost:8000", "m", "tok")
