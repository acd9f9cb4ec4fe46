"""Issues 13/14: a promoted adapter is served on the next reply without a restart and the service says so
(``/v1/models`` served, the reply's ``model``, ``adapter_version`` stored, ``/healthz`` and ``/metrics``); a rollback
serves the previous version on the next reply; a switch the engine cannot make is "live, not yet served" with the
reason, a metric and a log error. Tiny random-weight Llama on the transformers engine, in-process app."""

from __future__ import annotations

import asyncio
import logging

import pytest
from fastapi.testclient import TestClient

from chatbot.adapter_watch import LiveAdapterWatcher
from chatbot.engines.base import EngineInfo
from chatbot.errors import EngineError
from chatbot.operations import adapter_options
from finetune.adapters.gate import promote
from finetune.adapters.registry import read_audit, rollback
from chatbot.hashing import model_fingerprint
from tests.finetune.sft_helpers import tiny_llama
from tests.finetune.test_adapters import _fake_adapter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, chat_model_path) -> str:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", chat_model_path)


def _ask(client, text="Where is my order?") -> dict:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}],
                                                  "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def _served(client) -> dict:
    return {m["id"]: m["served"] for m in client.get("/v1/models").json()["data"]}


def test_promotion_and_rollback_are_served_on_the_next_reply_without_restart(tiny, tmp_path):
    from chatbot.api import create_app
    from chatbot.config import Settings
    from chatbot.engines.transformers_engine import TransformersEngine
    from chatbot.operations import promote_adapter, rollback_adapter
    from chatbot.service import Assistant
    from chatbot.store import Message, Store

    s = Settings(model=tiny, data_dir=tmp_path, engine="transformers", answer_mode="generate", max_new_tokens=8)
    sha = model_fingerprint(tiny)
    v1 = _fake_adapter(s.resolved_adapters_dir, "one", sha, 2.0, 0.30, 0.90, "2026-01-01", base=tiny)
    v2 = _fake_adapter(s.resolved_adapters_dir, "two", sha, 1.9, 0.31, 0.95, "2026-01-02", base=tiny)
    engine = TransformersEngine(tiny, max_model_len=512, model_name="tiny-base")
    a = Assistant(s, engine, None, Store(s.resolved_database_url))
    with TestClient(create_app(s, assistant=a, mount_ui=False)) as client:
        base = _ask(client)
        assert base["model"] == "tiny-base"
        assert _served(client) == {"tiny-base": True, v1: False, v2: False}

        promote_adapter(s, "one", user="olga")  # the console's path: the API process follows LIVE.json
        # /v1/models tells the truth before any reply
        assert _served(client) == {"tiny-base": False, v1: True, v2: False}
        health = client.get("/healthz").json()["adapter"]
        assert health == {"live": v1, "served": v1, "in_sync": True, "pending": None, "reason": None, "error": None}
        one = _ask(client)
        assert one["model"] == v1
        assert one["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]

        promote("two", adapter_options(s), user="piet")
        two = _ask(client)
        assert two["model"] == v2
        metrics = client.get("/metrics").text
        assert f'chatbot_adapter_served{{version="{v2}"}} 1.0' in metrics
        assert "chatbot_adapter_live_mismatch 0.0" in metrics

        rollback_adapter(s, user="olga")  # back to one, on the next reply
        back = _ask(client)
        assert back["model"] == v1 and back["choices"][0]["message"]["content"] == \
            one["choices"][0]["message"]["content"]
        rollback(adapter_options(s), user="piet")  # back to the base model
        again = _ask(client)
        assert again["model"] == "tiny-base"
        assert again["choices"][0]["message"]["content"] == base["choices"][0]["message"]["content"]

    stored = [a.store.messages(r["conversation_id"])[-1].adapter_version for r in (base, one, two, back, again)]
    assert stored == [None, v1, v2, v1, None]
    assert a.store.count(Message) == 10
    assert [(e["action"], e["user"], e["via"], e["from"], e["to"]) for e in read_audit(adapter_options(s))] == [
        ("promote", "olga", "console", None, v1), ("promote", "piet", "cli", v1, v2),
        ("rollback", "olga", "console", v2, v1), ("rollback", "piet", "cli", v1, None)]


class _Engine:
    """An engine that cannot switch: ``mode`` "fail" raises, "pending" keeps preparing (vLLM rebuild)."""

    model_path = None

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.info = EngineInfo("fake", "m", 512)
        self.pending_adapter = self.pending_reason = None

    async def set_adapter(self, path, version):
        if self.mode == "fail":
            raise EngineError(f"vLLM cannot load adapter {path!r}: rank too high")
        self.pending_adapter = version
        self.pending_reason = f"adapter {version!r} is live, not yet served: building an engine with LoRA support"


@pytest.mark.parametrize("mode", ["fail", "pending"])
def test_a_switch_the_engine_cannot_make_is_reported_not_silent(tiny, tmp_path, mode, caplog):
    from chatbot.config import Settings
    from chatbot.metrics import Metrics

    s = Settings(model=tiny, data_dir=tmp_path, engine="transformers")
    v = _fake_adapter(s.resolved_adapters_dir, "one", model_fingerprint(tiny), 2.0, 0.3, 0.9, "2026-01-01", base=tiny)
    promote("one", adapter_options(s))
    m = Metrics()
    w = LiveAdapterWatcher(s, m)
    eng = _Engine(mode)
    with caplog.at_level(logging.WARNING, logger="finetune.adapters"):
        assert asyncio.run(w.sync(eng)) is None  # the turn goes on, on the base model
    st = w.status(eng)
    assert st["live"] == v and st["served"] is None and not st["in_sync"]
    body = m.render()[0].decode()
    assert "chatbot_adapter_live_mismatch 1.0" in body
    if mode == "fail":
        assert st["error"] == st["reason"] == f"vLLM cannot load adapter {str(s.resolved_adapters_dir / 'one')!r}: " \
                                               "rank too high"
        assert "chatbot_adapter_sync_errors_total 1.0" in body
        assert any(r.levelno == logging.ERROR and "rank too high" in r.getMessage() for r in caplog.records)
    else:
        assert st["pending"] == v and st["error"] is None and "live, not yet served" in st["reason"]
        assert "chatbot_adapter_sync_errors_total 0.0" in body
        eng.info.adapter_version, eng.pending_adapter = v, None  # the rebuild finished and switched
        assert w.status(eng)["in_sync"] and "chatbot_adapter_live_mismatch 0.0" in m.render()[0].decode()


def test_transformers_engine_refuses_an_adapter_whose_tensors_match_nothing(tiny, tmp_path):
    """Behind the gate (LIVE.json written by hand): peft only warns "Found missing adapter keys" and would serve
    the base model under the adapter's name; the engine refuses and keeps what it served."""
    from chatbot.engines.transformers_engine import TransformersEngine
    from tests.finetune.test_adapters import _lora_weights, _rename_keys

    good, renamed = tmp_path / "good", tmp_path / "renamed"
    _lora_weights(good, tiny)
    _lora_weights(renamed, tiny)
    _rename_keys(renamed, ".layers.", ".blocks.")
    engine = TransformersEngine(tiny, max_model_len=256)
    asyncio.run(engine.start())
    with pytest.raises(EngineError, match="missing adapter keys"):
        asyncio.run(engine.set_adapter(str(renamed), "renamed-v"))
    assert engine.info.adapter_version is None
    asyncio.run(engine.set_adapter(str(good), "good-v"))
    with pytest.raises(EngineError, match="8 adapter tensors are missing from the checkpoint"):
        asyncio.run(engine.set_adapter(str(renamed), "renamed-v"))
    assert engine.info.adapter_version == "good-v" and list(engine._model.peft_config) == ["good-v"]


class _CheckpointEngine:
    """Records how the watcher switches it (an engine with ``set_checkpoint``, as vLLM has)."""

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path
        self.info = EngineInfo("fake", "m", 512)
        self.pending_adapter = self.pending_reason = None
        self.calls: list[tuple] = []

    async def set_checkpoint(self, path, version):
        self.calls.append(("checkpoint", path, version))
        self.info.adapter_version = version

    async def set_adapter(self, path, version):
        self.calls.append(("lora", path, version))
        self.info.adapter_version = version


def test_merged_serving_switches_checkpoints_and_refuses_an_adapter_without_one(tiny, tmp_path):
    """adapter_serving=merged (the default): promotion through the service writes <adapter>/merged and the watcher
    puts the engine on it; an adapter made live without one (the registry's own promote) is refused with the reason
    and the engine keeps what it served; rollback to the base model goes back to the base checkpoint; with
    adapter_serving=lora the same engine gets LoRA."""
    from chatbot.config import Settings
    from chatbot.operations import promote_adapter

    s = Settings(model=tiny, data_dir=tmp_path, engine="transformers")
    reg, sha = s.resolved_adapters_dir, model_fingerprint(tiny)
    v1 = _fake_adapter(reg, "one", sha, 2.0, 0.30, 0.90, "2026-01-01", base=tiny)
    v2 = _fake_adapter(reg, "two", sha, 1.9, 0.31, 0.95, "2026-01-02", base=tiny)
    eng, w = _CheckpointEngine(tiny), LiveAdapterWatcher(s)
    promote_adapter(s, "one", user="olga")
    assert asyncio.run(w.sync(eng)) == v1 and eng.calls == [("checkpoint", str(reg / "one" / "merged"), v1)]
    promote("two", adapter_options(s))  # LIVE.json names it, but nothing wrote its merged checkpoint
    assert asyncio.run(w.sync(eng)) == v1 and len(eng.calls) == 1
    assert w.last_error.startswith(f"not serving adapter {v2!r}: it has no merged checkpoint")
    rollback(adapter_options(s))  # back to one: what the engine serves already
    assert asyncio.run(w.sync(eng)) == v1 and len(eng.calls) == 1 and w.last_error is None
    rollback(adapter_options(s))  # the base model
    assert asyncio.run(w.sync(eng)) is None and eng.calls[-1] == ("checkpoint", None, None)

    lora = LiveAdapterWatcher(s.model_copy(update={"adapter_serving": "lora"}))
    promote_adapter(s.model_copy(update={"adapter_serving": "lora"}), "two", user="olga")
    assert asyncio.run(lora.sync(eng)) == v2 and eng.calls[-1] == ("lora", str(reg / "two"), v2)
    assert not (reg / "two" / "merged").exists()
