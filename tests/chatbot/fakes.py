"""Small stand-ins for the store/handoff/console tests: a scripted engine and an in-process app.

The real engines are tested elsewhere (test_engines.py, test_api.py); these tests are about what
happens around generation (storage, redaction, handoff, login), so a deterministic engine that
streams a fixed reply word by word keeps them fast.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pathlib import Path

from chatbot.engines.base import ChatMessage, Engine, EngineInfo, GenerationParams, StreamChunk
from chatbot.router import RoutingPolicy
from finetune.heads import IntentPrediction, Slot

ROUTING_POLICY = Path(__file__).resolve().parents[2] / "data" / "routing.yaml"


class ScriptedEngine(Engine):
    """Streams ``reply`` word by word (``delay`` seconds apart); records the prompts it saw.

    ``fail_after``: raise RuntimeError after that many words (a generation failure).
    """

    def __init__(self, reply: str = "You can return it within 30 days [1].", delay: float = 0.0,
                 fail_after: int | None = None) -> None:
        self.info = EngineInfo("scripted", "scripted-model", 2048)
        self.reply = reply
        self.delay = delay
        self.fail_after = fail_after
        self.prompts: list[list[ChatMessage]] = []

    async def start(self) -> None:
        return None

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return sum(len(m.content.split()) + 4 for m in messages)

    async def stream(self, messages, params: GenerationParams, request_id: str):
        self.prompts.append(list(messages))
        words = self.reply.split(" ")
        n_prompt = self.count_prompt_tokens(messages)
        for i, w in enumerate(words[: params.max_tokens]):
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError("scripted engine failure")
            if self.delay:
                await asyncio.sleep(self.delay)
            last = i == min(len(words), params.max_tokens) - 1
            finish = ("stop" if len(words) <= params.max_tokens else "length") if last else None
            yield StreamChunk((" " if i else "") + w, finish, n_prompt, i + 1)


def make_assistant(tmp_path, engine: Engine | None = None, url: str | None = None, **settings):
    """An :class:`~chatbot.service.Assistant` on a SQLite file in ``tmp_path`` (or ``url``), no retrieval.

    ``answer_mode`` defaults to ``generate`` (these tests are about the plumbing around the engine;
    verification has its own tests, tests/chatbot/test_verified_answers.py).
    """
    from chatbot.config import Settings
    from chatbot.service import Assistant
    from chatbot.store import Store

    settings.setdefault("answer_mode", "generate")
    s = Settings(data_dir=tmp_path / "var", **settings)
    store = Store(url or s.resolved_database_url)
    return Assistant(s, engine or ScriptedEngine(), None, store)


class TableHead:
    """A stand-in intent head: a fixed prediction per message (the decision logic is what is tested)."""

    labels = sorted(RoutingPolicy.from_file(ROUTING_POLICY).intents) + ["out_of_scope"]
    oos_label = "out_of_scope"

    def __init__(self, table: dict[str, tuple[str, float]], threshold: float = 0.5):
        self.table = table
        self.threshold = threshold

    def predict(self, texts, threshold=None):
        t = self.threshold if threshold is None else threshold
        out = []
        for text in texts:
            label, conf = self.table.get(text, ("out_of_scope", 0.9))
            below = conf < t
            oos = below or label == self.oos_label
            out.append(IntentPrediction("out_of_scope" if oos else label, conf, label, oos, below))
        return out


class SlotHead:
    """A stand-in entity head: order numbers are digit runs (to test slot handling)."""

    labels = ("O", "B-order_id", "I-order_id")

    def predict(self, texts):
        import re

        return [[Slot("order_id", m.group(), m.start(), m.end(), 0.99) for m in re.finditer(r"\d{6,}", t)]
                for t in texts]
