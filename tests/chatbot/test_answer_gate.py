"""The promotion gate on answers (issue 15): a candidate that answers worse on a small fixed question set is
refused with the side-by-side table, a better one passes, and the engine is left on the reference."""

from __future__ import annotations

import asyncio
import json

import pytest

from chatbot.answer_eval import AnswerCase
from chatbot.answer_gate import AnswerGateOptions, answer_gate, judge
from chatbot.service import Assistant
from tests.chatbot.fakes import ScriptedEngine
from tests.chatbot.test_verified_answers import index_dir  # noqa: F401  (fixture: four small policy documents)

GOOD = "Standard shipping costs $8.00 per order [1]."
INVENTED = "Standard shipping costs 4% of the total price [1]."
UNSURE = "I am not sure, would you like to talk to a person?"
CASES = [AnswerCase("ship", "How much does standard shipping cost?", ["shipping.md"], [["$8.00", "8 dollars"]], True),
         AnswerCase("express", "What does standard shipping cost per order?", ["shipping.md"], [["$8.00"]], True)]


class AdapterEngine(ScriptedEngine):
    """Says what its current adapter would say (None: the base model); records every switch."""

    def __init__(self, replies: dict):
        super().__init__(replies[None])
        self.replies, self.switches = replies, []

    async def set_adapter(self, path, version):
        self.switches.append(version)
        self.info.adapter_version = version
        self.reply = self.replies[version]


def assistant(tmp_path, index_dir, embedder, engine) -> Assistant:  # noqa: F811
    from chatbot.config import Settings
    from chatbot.options import search_options
    from chatbot.store import Store
    from retrieval.retriever import Retriever

    s = Settings(data_dir=tmp_path / "var", routing=False, answer_mode="generate")
    return Assistant(s, engine, Retriever(index_dir, embedder, search_options(s)), Store(s.resolved_database_url))


def test_judge_names_each_measure_worse_than_its_tolerance():
    ref = {"correct": 0.50, "k_precision": 0.80, "unsupported_rate": 0.10}
    opts = AnswerGateOptions(max_correct_drop=0.05, max_k_precision_drop=0.05, max_unsupported_increase=0.05)
    assert judge({"correct": 0.46, "k_precision": 0.90, "unsupported_rate": 0.15}, ref, opts) == []
    reasons = judge({"correct": 0.40, "k_precision": 0.70, "unsupported_rate": 0.20}, ref, opts, "the base model")
    assert [r.split(":")[0] for r in reasons] == ["Correct", "K-Precision", "Unsupported-claim rate"]
    assert reasons[0] == ("Correct: 0.400 against 0.500 for the base model (higher is better; tolerance 0.05): "
                          "worse by 0.100.")


def test_a_better_candidate_passes_beside_the_base_model(tmp_path, index_dir, embedder):  # noqa: F811
    engine = AdapterEngine({None: UNSURE, "good-1": GOOD})
    a = assistant(tmp_path, index_dir, embedder, engine)
    d = asyncio.run(answer_gate(a, CASES, ("/adapters/good", "good-1"), None))
    assert d.ok and d.reasons == [] and d.reference[0] == "base"
    assert (d.candidate[1]["correct"], d.reference[1]["correct"]) == (1.0, 0.0)
    assert d.table().splitlines()[2].startswith("| base | 2 |") and d.table().splitlines()[3].startswith("| good-1 | 2 |")
    assert engine.switches == ["good-1", None] and engine.info.adapter_version is None


def test_a_worse_candidate_is_refused_with_the_table_and_the_engine_stays_on_the_live_adapter(
        tmp_path, index_dir, embedder):  # noqa: F811
    engine = AdapterEngine({None: UNSURE, "live-1": GOOD, "bad-2": INVENTED})
    a = assistant(tmp_path, index_dir, embedder, engine)
    d = asyncio.run(answer_gate(a, CASES, ("/adapters/bad", "bad-2"), ("/adapters/live", "live-1")))
    assert not d.ok
    assert [r.split(":")[0] for r in d.reasons] == ["Correct", "K-Precision", "Unsupported-claim rate"]
    assert d.candidate[1]["unsupported_rate"] == 1.0 and d.reference[1]["unsupported_rate"] == 0.0
    assert "for the live adapter live-1" in d.reasons[0]
    assert engine.info.adapter_version == "live-1"
    saved = json.loads(d.save(tmp_path).read_text())
    assert saved["ok"] is False and saved["reference"]["name"] == "live-1" and "| live-1 (live) | 2 |" in saved["table"]


def test_options_are_validated():
    from chatbot.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="max_correct_drop must be in"):
        AnswerGateOptions(max_correct_drop=1.5)
    with pytest.raises(InvalidInputError, match="mode must be"):
        AnswerGateOptions(mode="fast")


class VersionEngine(AdapterEngine):
    """Answers by the kind of adapter it serves: a ``good*`` one is right, a ``bad*`` one invents an amount."""

    def __init__(self):
        super().__init__({None: UNSURE})

    async def set_adapter(self, path, version):
        self.switches.append(version)
        self.info.adapter_version = version
        self.reply = UNSURE if version is None else (GOOD if version.startswith("good") else INVENTED)


@pytest.mark.slow
def test_a_refused_promotion_leaves_the_live_adapter_and_force_is_kept(tmp_path, index_dir, embedder,  # noqa: F811
                                                                       chat_model_path):
    """Promotion with the answer gate (CLI and console: chatbot.operations.promote_adapter): real peft adapters on a
    tiny model; the gate's answers come from an engine that says what each adapter would say."""
    from chatbot.config import Settings
    from chatbot.errors import AdapterError
    from chatbot.hashing import model_fingerprint
    from chatbot.operations import promote_adapter
    from chatbot.options import adapter_options
    from chatbot.options import search_options
    from chatbot.store import Store
    from finetune.adapters.registry import read_audit
    from retrieval.retriever import Retriever
    from tests.finetune.test_adapters import _fake_adapter
    from tests.finetune.sft_helpers import tiny_llama

    gate_set = tmp_path / "gate.jsonl"
    gate_set.write_text("".join(json.dumps({"id": c.id, "query": c.query, "gold": c.gold, "facts": c.facts,
                                            "answerable": True}) + "\n" for c in CASES))
    model = tiny_llama(tmp_path / "tiny", chat_model_path)
    s = Settings(model=model, data_dir=tmp_path / "var", engine="transformers", routing=False,
                 adapter_gate_answers=True, adapter_gate_answers_dataset=gate_set)
    reg = s.resolved_adapters_dir
    sha = model_fingerprint(model)
    good = _fake_adapter(reg, "good", sha, 2.0, 0.30, 0.90, "2026-01-01", base=model)
    bad = _fake_adapter(reg, "bad", sha, 1.5, 0.40, 0.95, "2026-01-02", base=model)  # better loss, worse answers
    engine = VersionEngine()
    a = Assistant(s.model_copy(update={"answer_mode": "generate"}), engine,
                  Retriever(index_dir, embedder, search_options(s)), Store(f"sqlite:///{tmp_path / 'gate.db'}"))

    out = promote_adapter(s, "good", user="ops", assistant=a)
    assert out["live"] == good and out["answer_gate"]["ok"] and out["answer_gate"]["reference"]["name"] == "base"
    live_bytes = (reg / "LIVE.json").read_bytes()
    with pytest.raises(AdapterError) as err:
        promote_adapter(s, "bad", user="ops", assistant=a)
    assert f"{bad} refused beside {good}" in str(err.value) and f"| {good} (live) | 2 |" in str(err.value)
    assert (reg / "LIVE.json").read_bytes() == live_bytes and [e["to"] for e in read_audit(adapter_options(s))] == [good]
    assert engine.info.adapter_version == good  # the gate left the engine on the live adapter
    assert json.loads((reg / "bad" / "answer_gate.json").read_text())["ok"] is False

    out = promote_adapter(s, "bad", user="ops", force=True, assistant=a)
    assert out["live"] == bad and out["answer_gate"]["forced"] is True
    assert json.loads((reg / "bad" / "answer_gate.json").read_text())["forced"] is True



def test_eval_answers_compares_adapters_in_one_table(tmp_path, index_dir, embedder, monkeypatch, capsys):  # noqa: F811
    """``chatbot eval answers --adapters base good``: one engine, pinned to each adapter in turn, one row per adapter
    and mode, the base model first; an unknown adapter is a clear error (exit 2) before any model is loaded."""
    from chatbot import operations
    from chatbot.cli import main

    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"id": c.id, "query": c.query, "gold": c.gold, "facts": c.facts,
                                        "answerable": True}) + "\n" for c in CASES))
    monkeypatch.setenv("CHATBOT_DATA_DIR", str(tmp_path / "var"))
    assert main(["eval", "answers", "--dataset", str(data), "--adapters", "base", "missing"]) == 2
    assert "error: --adapters:" in capsys.readouterr().err

    engine = AdapterEngine({None: UNSURE, "good-1": GOOD})
    built = []

    def from_settings(settings, index=None, database_url=None):
        built.append(settings.enable_lora)
        return assistant(tmp_path, index_dir, embedder, engine)

    monkeypatch.setattr(operations, "adapter_target", lambda s, ref: None if ref == "base" else ("/a/good", "good-1"))
    monkeypatch.setattr(Assistant, "from_settings", staticmethod(from_settings))
    out = tmp_path / "report.json"
    assert main(["eval", "answers", "--dataset", str(data), "--adapters", "base", "good", "--mode", "generate",
                 "verified", "--quiet", "--json", str(out)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0] for line in table] == ["| base generate", "| base verified", "| good generate",
                                                         "| good verified"]
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["runs"]] == ["base generate", "base verified", "good generate", "good verified"]
    assert (report["runs"][0]["summary"]["correct"], report["runs"][2]["summary"]["correct"]) == (0.0, 1.0)
    assert report["adapter"] == ["base", "good"] and built == [None]  # merged serving (default): no LoRA support
    assert engine.switches == ["good-1"]  # the engine started on the base model, switched once


def test_pinned_adapter_loads_the_merged_checkpoint_as_served_and_returns_to_the_base_weights():
    """An evaluation pins vLLM to what the servers load: the merged checkpoint (waiting until it is served), the
    base weights for the base model, and the base weights under a LoRA adapter."""
    from chatbot.answer_gate import PinnedAdapter
    from chatbot.engines.base import EngineInfo

    class CheckpointEngine:
        model_path = "/base"

        def __init__(self):
            self.checkpoint, self.info, self.calls = "/base", EngineInfo("fake", "m", 512), []

        async def set_checkpoint(self, path, version, wait=False):
            self.calls.append(("checkpoint", path, version, wait))
            self.checkpoint, self.info.adapter_version = path or "/base", version

        async def set_adapter(self, path, version):
            self.calls.append(("lora", path, version))
            self.info.adapter_version = version

    e = CheckpointEngine()
    asyncio.run(PinnedAdapter("/reg/a", "a-1", "/reg/a/merged").sync(e))
    asyncio.run(PinnedAdapter("/reg/a", "a-1", "/reg/a/merged").sync(e))  # already served: nothing to do
    asyncio.run(PinnedAdapter(None, None).sync(e))
    asyncio.run(PinnedAdapter("/reg/a", "a-1", "/reg/a/merged").sync(e))
    asyncio.run(PinnedAdapter("/reg/b", "b-1").sync(e))  # LoRA: on the base weights
    assert e.calls == [("checkpoint", "/reg/a/merged", "a-1", True), ("checkpoint", None, None, True),
                       ("checkpoint", "/reg/a/merged", "a-1", True), ("checkpoint", None, None, True),
                       ("lora", "/reg/b", "b-1")]
