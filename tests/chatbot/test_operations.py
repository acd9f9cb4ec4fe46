"""Operator actions behind the console: background jobs with progress, re-indexing uploads, training data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatbot import operations as ops
from chatbot.errors import InvalidInputError
from chatbot.store import Message, Store


def test_jobs_report_progress_and_failures():
    jobs = ops.Jobs()

    def work(report):
        report(0.5, "half way")
        return {"summary": "all done", "n": 3}

    j = jobs.wait(jobs.start("demo", work, "olga").id, 30)
    assert (j.status, j.progress, j.message, j.result["n"], j.user) == ("done", 1.0, "all done", 3, "olga")

    def broken(report):
        raise ValueError("bad input file x.md")

    j = jobs.wait(jobs.start("demo", broken).id, 30)
    assert j.status == "failed" and j.message == "ValueError: bad input file x.md"
    assert [x.status for x in jobs.list("demo")] == ["failed", "done"]


def test_one_job_of_a_kind_at_a_time():
    import threading

    jobs = ops.Jobs()
    gate = threading.Event()
    j = jobs.start("reindex", lambda report: gate.wait(30) and {})
    with pytest.raises(InvalidInputError, match=f"a reindex job \\({j.id}\\) is still running"):
        jobs.start("reindex", lambda report: {})
    gate.set()
    jobs.wait(j.id, 30)
    jobs.wait(jobs.start("reindex", lambda report: {}).id, 30)


@pytest.mark.slow
def test_reindex_uploads_publishes_a_new_version_with_progress(tmp_path, kb_dir, embedder):
    from chatbot.config import Settings
    from retrieval.retriever import Retriever

    s = Settings(data_dir=tmp_path / "var", kb_dir=kb_dir)
    seen: list[tuple[float, str]] = []
    first = ops.reindex(s, embedder, [kb_dir], lambda p, m: seen.append((p, m)))
    assert first["published"] and len(first["added"]) == 8
    upload = tmp_path / "gift_cards.md"
    upload.write_text("# Gift cards\n\nGift cards never expire and can be used for any purchase in the store.\n")
    saved = ops.save_uploads([upload], s.data_dir / "uploads")
    assert saved[0].read_text() == upload.read_text()
    second = ops.reindex(s, embedder, [s.data_dir / "uploads"], lambda p, m: seen.append((p, m)))
    assert second["published"] and second["version"] != first["version"]
    assert any(d.endswith("gift_cards.md") for d in second["added"])
    assert seen[-1][0] == 1.0 and "index" in seen[-1][1]
    hits = Retriever(s.index_dir, embedder).search("Do gift cards expire?", 1)
    assert hits[0].doc_id.endswith("gift_cards.md")
    with pytest.raises(InvalidInputError, match="upload at least one document"):
        ops.save_uploads([], s.data_dir / "uploads")


def test_training_needs_approved_transcripts_and_exports_them(tmp_path):
    from chatbot.config import Settings

    s = Settings(data_dir=tmp_path / "var")
    store = Store(s.resolved_database_url)
    with pytest.raises(InvalidInputError, match="no approved transcripts"):
        ops.export_approved(store, s)
    c = store.create_conversation().id
    store.add_message(Message(conversation_id=c, role="user", text="How long is shipping?"))
    r = store.add_message(Message(conversation_id=c, role="assistant", text="3 days"))
    user = store.add_user("sam", "x" * 20)
    store.annotate(r.id, user.id, "Shipping takes 3 to 5 working days.", approved=True)
    path, n = ops.export_approved(store, s)
    import json

    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert n == 1 and rows[0]["messages"][0]["role"] == "system"
    assert rows[0]["messages"][1:] == [{"role": "user", "content": "How long is shipping?"},
                                       {"role": "assistant", "content": "Shipping takes 3 to 5 working days."}]
    from finetune.data import load_jsonl  # the fine-tuning module reads the export as it is

    assert load_jsonl(path)[0].messages == rows[0]["messages"]
    store.close()


def test_conversation_log_is_exported_as_the_chat_jsonl_finetuning_reads(tmp_path):
    """`chatbot train --data store` / `store:approved`: the service exports the configured store's conversation
    log as chat JSONL; the fine-tuning module reads that file as it is (it never opens the database)."""
    from chatbot.config import Settings
    from finetune.data import load_dialogues, load_jsonl

    s = Settings(data_dir=tmp_path / "var")
    store = Store(s.resolved_database_url)
    store.record_turn("c1", "Where is my order?", Message(conversation_id="", role="assistant", text="On its way."),
                      new=True)
    store.record_turn("c1", "Thanks", Message(conversation_id="", role="assistant", text="You're welcome."))
    store.close()
    paths = ops.export_conversation_log(["store", "store:approved", "bitext_customer_support"], s)
    assert paths[2] == "bitext_customer_support"  # other specs pass through
    ds = load_jsonl(paths[0])
    assert [m["role"] for m in ds[0].messages] == ["user", "assistant", "user", "assistant"]
    assert ds[0].id == "store:c1"
    from_spec, sources = load_dialogues(paths[:1])
    assert [d.messages for d in from_spec] == [ds[0].messages] and sources[0]["spec"] == paths[0]
    assert load_dialogues(paths[1:2])[0] == []  # nothing reviewed yet


def _approve(store: Store, n: int) -> list[str]:
    """``n`` conversations, each with one corrected and approved reply; returns their ids."""
    user = store.get_user("olga") or store.add_user("olga", "x" * 20)
    ids = []
    for i in range(n):
        c = store.create_conversation().id
        store.add_message(Message(conversation_id=c, role="user", text=f"Can I return item {i} after a month?"))
        r = store.add_message(Message(conversation_id=c, role="assistant", text="maybe"))
        store.annotate(r.id, user.id, f"Yes: item {i} can be returned within 90 days for a full refund.", True)
        ids.append(c)
    return ids


def test_training_refuses_too_few_approved_conversations_before_it_starts(tmp_path):
    from chatbot.config import Settings
    from chatbot.errors import TooLittleDataError

    s = Settings(data_dir=tmp_path / "var")
    store = Store(s.resolved_database_url)
    _approve(store, 2)
    with pytest.raises(TooLittleDataError, match=r"2 approved conversation\(s\), at least train_min_examples=3"):
        ops.train_from_approved(store, s, lambda *_: None)
    assert not (s.data_dir / "training").exists()  # nothing exported, nothing trained
    _approve(store, 1)
    assert ops.check_trainable(store, s) == 3
    store.close()


@pytest.mark.slow
def test_training_from_four_approved_conversations_states_the_run(tmp_path, chat_model_path):
    from chatbot.config import Settings
    from tests.finetune.sft_helpers import tiny_llama

    tiny = tiny_llama(tmp_path / "tiny", chat_model_path)
    s = Settings(data_dir=tmp_path / "var", model=tiny, train_eval_samples=5, train_eval_replies=2,
                 train_eval_max_new_tokens=8)
    store = Store(s.resolved_database_url)
    _approve(store, 4)
    steps: list[str] = []
    out = ops.train_from_approved(store, s, lambda p, msg: steps.append(msg))
    store.close()
    run = out["run"]
    assert out["examples"] == 4 and run["examples"] == {"train": 4, "validation": 27, "test": 14}
    assert run["steps"] == s.train_min_steps == 20 and run["step_learning_rate_min"] > 0
    assert run["changes_model"] is True
    assert "all 4 conversation(s) used for training" in out["summary"]
    assert "20 optimizer step(s) (raised to min_steps 20)" in out["summary"]
    assert "The adapter changes the model" in out["summary"]
    # the evaluation is sized by the train_eval_* settings
    ev = json.loads((Path(out["folder"]) / "adapter.json").read_text())["eval_config"]
    assert (ev["val_samples"], ev["replies"], ev["max_new_tokens"]) == (5, 2, 8)
    assert out["metrics"]["test_n"] == 2
