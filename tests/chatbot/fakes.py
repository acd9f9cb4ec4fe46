"""Small stand-ins for the store/handoff/console tests: a scripted engine and an in-process app.

The real engines are tested elsewhere (test_engines.py, test_api.py); these tests are about what
happens around generation (storage, redaction, handoff, login), so a deterministic engine that
streams a fixed reply word by word keeps them fast.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from chatbot.engines.base import ChatMessage, Engine, EngineInfo, GenerationParams, StreamChunk


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
    """An :class:`~chatbot.service.Assistant` on a SQLite file in ``tmp_path`` (or ``url``), no retrieval."""
    from chatbot.config import Settings
    from chatbot.service import Assistant
    from chatbot.store import Store

    s = Settings(data_dir=tmp_path / "var", **settings)
    store = Store(url or s.resolved_database_url)
    return Assistant(s, engine or ScriptedEngine(), None, store)
