"""Engines: chat template, stop on end-of-turn, finish reasons, and UTF-8-safe streaming."""

from __future__ import annotations

import asyncio

import pytest

from chatbot.engines.base import ChatMessage, GenerationParams
from chatbot.engines.detok import REPLACEMENT, IncrementalDetokenizer
from chatbot.errors import InvalidInputError


@pytest.fixture(scope="module")
def tokenizer(chat_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_model_path)


@pytest.fixture(scope="module")
def tf_engine(chat_model_path):
    from chatbot.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(chat_model_path, max_model_len=512)
    asyncio.run(engine.start())
    return engine


def _run(engine, messages, params):
    async def go():
        return [c async for c in engine.stream(messages, params, "t")]

    return asyncio.run(go())


def test_detokenizer_never_splits_emoji_or_cjk(tokenizer):
    text = "Smile 😀 and 你好世界 🎉! Ünïcödé"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-token characters are present
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push([i]) for i in ids] + [detok.flush()]
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)
    # at least one step had to hold text back (a character spread over tokens)
    assert "" in deltas[:-1]


def test_detokenizer_drops_a_character_cut_by_length(tokenizer):
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    out = "".join(detok.push([i]) for i in ids[:-1]) + detok.flush()
    assert out == "ok " or out == "ok"
    assert REPLACEMENT not in out


def test_chat_template_is_applied_once(tokenizer):
    from chatbot.engines.base import render_chat, stop_token_ids

    ids = render_chat(tokenizer, [ChatMessage("system", "S"), ChatMessage("user", "Hi")])
    text = tokenizer.decode(ids)
    assert text.count("<|im_start|>") == 3  # system, user, and the generation prompt
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer)


@pytest.mark.slow
def test_transformers_engine_stops_on_end_of_turn(tf_engine):
    chunks = _run(tf_engine, [ChatMessage("user", "Hello")], GenerationParams(max_tokens=200))
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens < 200
    text = "".join(c.text for c in chunks)
    assert text.strip() and "<|im_end|>" not in text and "assistant\n" not in text
    assert all(c.finish_reason is None for c in chunks[:-1])


@pytest.mark.slow
def test_transformers_engine_length_cut(tf_engine):
    chunks = _run(tf_engine, [ChatMessage("user", "Count from 1 to 100, separated by commas.")],
                  GenerationParams(max_tokens=5))
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 5


@pytest.mark.slow
def test_transformers_engine_streams_emoji_without_replacement_chars(tf_engine):
    chunks = _run(tf_engine, [ChatMessage("user", "Reply with three party emoji 🎉🎉🎉 and nothing else.")],
                  GenerationParams(max_tokens=40))
    text = "".join(c.text for c in chunks)
    assert REPLACEMENT not in text
    assert any(ord(ch) > 0xFFFF for ch in text)  # an emoji came through whole


def test_prompt_that_cannot_fit_is_rejected(tf_engine):
    long = [ChatMessage("user", "word " * 600)]
    with pytest.raises(InvalidInputError, match="exceeds max_model_len 512"):
        _run(tf_engine, long, GenerationParams(max_tokens=16))
