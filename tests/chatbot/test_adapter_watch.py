"""chatbot.adapter_watch: the live-adapter watcher keeps the engine on what LIVE.json names, and refuses an
adapter trained on another base model without failing a turn. (Serving end to end: test_adapter_serving.py.)"""

from __future__ import annotations

import asyncio
import json
import typing

import pytest

from chatbot.adapter_watch import LiveAdapterWatcher
from tests.finetune.sft_helpers import tiny_llama
from tests.finetune.test_adapters import _fake_adapter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, chat_model_path) -> str:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", chat_model_path)


def test_watcher_refuses_an_adapter_of_another_base(tiny, tmp_path):
    from chatbot.config import Settings
    from chatbot.engines.base import EngineInfo

    s = Settings(model=tiny, data_dir=tmp_path)
    _fake_adapter(s.resolved_adapters_dir, "x", "f" * 64, 1.0, 0.5, 1.0, "2026-01-01")
    promote_state = {"current": {"name": "x", "version": "x-v", "path": str(s.resolved_adapters_dir / "x")},
                     "history": [], "events": []}
    (s.resolved_adapters_dir / "LIVE.json").write_text(json.dumps(promote_state))

    class FakeEngine:
        model_path = tiny
        info = EngineInfo("fake", "m", 512)
        calls: typing.ClassVar[list] = []

        async def set_adapter(self, path, version):
            self.calls.append((path, version))

    eng = FakeEngine()
    watcher = LiveAdapterWatcher(s)
    assert asyncio.run(watcher.sync(eng)) is None and eng.calls == []  # a turn is never failed by it
    assert "not serving adapter 'x-20260101-abcdef12': trained on base model sha256 ffffffffffff" in watcher.last_error
