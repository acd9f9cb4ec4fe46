"""Evaluation: metric values by hand, dataset loaders, an end-to-end run and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatbot.options import search_options
from retrieval.evaluate import (
    EvalQuery,
    format_table,
    hit_at_k,
    load_dstc11_track5,
    load_jsonl,
    recall_at_k,
    reciprocal_rank,
    run_eval,
    score_rankings,
)


def test_metrics_by_hand():
    ranked = ["a", "b", "c", "d"]
    gold = frozenset({"b", "d", "z"})
    assert recall_at_k(ranked, gold, 1) == 0.0
    assert recall_at_k(ranked, gold, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, gold, 10) == pytest.approx(2 / 3)
    assert hit_at_k(ranked, gold, 1) == 0.0 and hit_at_k(ranked, gold, 2) == 1.0
    assert reciprocal_rank(ranked, gold) == 0.5
    assert reciprocal_rank(ranked, frozenset({"d"}), k=3) == 0.0  # beyond the cut-off
    assert reciprocal_rank([], gold) == 0.0
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        recall_at_k(ranked, gold, 0)


def test_score_rankings_averages_over_queries():
    rankings = [["a", "b"], ["x", "y", "z"]]
    golds = [frozenset({"a"}), frozenset({"z", "q"})]
    s = score_rankings(rankings, golds, ks=(1, 3))
    assert s["recall@1"] == pytest.approx((1 + 0) / 2)
    assert s["recall@3"] == pytest.approx((1 + 0.5) / 2)
    assert s["hit@3"] == 1.0 and s["hit@1"] == 0.5
    assert s["mrr"] == pytest.approx((1 + 1 / 3) / 2) and s["queries"] == 2
    assert score_rankings([], [], ks=(1,))["recall@1"] == 0.0
    with pytest.raises(ValueError, match="differ in length: 1 vs 2"):
        score_rankings([["a"]], golds)


def test_load_jsonl_and_its_errors(tmp_path):
    p = tmp_path / "set.jsonl"
    p.write_text('{"query": "refund time?", "gold": ["refunds.md"]}\n\n{"id": "q7", "query": "ship", "gold": "s.md"}\n')
    es = load_jsonl(p)
    assert es.name == "set" and es.documents is None
    assert es.queries == [EvalQuery("1", "refund time?", frozenset({"refunds.md"})),
                          EvalQuery("q7", "ship", frozenset({"s.md"}))]
    p.write_text('{"query": "ok", "gold": ["a"]}\n{"query": "", "gold": ["a"]}\n')
    with pytest.raises(ValueError, match=r"set.jsonl:2: 'query' must be a non-empty string, got ''"):
        load_jsonl(p)
    p.write_text('{"query": "q", "gold": []}\n')
    with pytest.raises(ValueError, match=r":1: 'gold' must be a non-empty list of doc ids, got \[\]"):
        load_jsonl(p)
    p.write_text("not json\n")
    with pytest.raises(ValueError, match=r":1: not JSON"):
        load_jsonl(p)


def _tiny_dstc(root: Path) -> Path:
    """A two-hotel, one-restaurant DSTC11-format folder with three instances (two knowledge-seeking)."""
    knowledge = {
        "hotel": {
            "1": {"name": "Acorn Guest House",
                  "faqs": {"0": {"question": "Is parking free?", "answer": "Yes, parking is free on site."}},
                  "reviews": {"0": {"sentences": {"0": "The bathroom was spotless.",
                                                  "1": "Breakfast was cold."}}}},
            "2": {"name": "Bridge Hotel",
                  "faqs": {"0": {"question": "Do you allow pets?", "answer": "No pets are allowed."}},
                  "reviews": {}},
        },
        "restaurant": {
            "9": {"name": "Curry Garden", "faqs": {"0": {"question": "Is there vegan food?",
                                                         "answer": "Several vegan curries are on the menu."}},
                  "reviews": {"3": {"sentences": {"0": "The naan was fantastic."}}}},
        },
    }
    logs = [
        [{"speaker": "U", "text": "I need a hotel."}, {"speaker": "S", "text": "Acorn Guest House is nice."},
         {"speaker": "U", "text": "Can I bring my dog to the Bridge Hotel?"}],
        [{"speaker": "U", "text": "Book Acorn Guest House."}, {"speaker": "S", "text": "Done."},
         {"speaker": "U", "text": "Were the bathrooms clean?"}],
        [{"speaker": "U", "text": "Thanks, bye."}],
    ]
    labels = [
        {"target": True, "knowledge": [{"domain": "hotel", "entity_id": 2, "doc_type": "faq", "doc_id": 0}]},
        {"target": True, "knowledge": [{"domain": "hotel", "entity_id": 1, "doc_type": "review", "doc_id": 0,
                                        "sent_id": 0}]},
        {"target": False},
    ]
    (root / "val").mkdir(parents=True)
    (root / "knowledge.json").write_text(json.dumps(knowledge))
    (root / "val" / "logs.json").write_text(json.dumps(logs))
    (root / "val" / "labels.json").write_text(json.dumps(labels))
    return root


def test_load_dstc11_track5_format(tmp_path):
    root = _tiny_dstc(tmp_path / "dstc11_track5")
    es = load_dstc11_track5(root)
    ids = sorted(d.doc_id for d in es.documents)
    assert ids == ["hotel/1/faq/0", "hotel/1/review/0/0", "hotel/1/review/0/1", "hotel/2/faq/0",
                   "restaurant/9/faq/0", "restaurant/9/review/3/0"]
    faq = next(d for d in es.documents if d.doc_id == "hotel/2/faq/0")
    assert faq.title == "Bridge Hotel" and faq.text == "Do you allow pets?\nNo pets are allowed."
    assert [(q.qid, q.text, sorted(q.gold)) for q in es.queries] == [
        ("0", "Can I bring my dog to the Bridge Hotel?", ["hotel/2/faq/0"]),
        ("1", "Were the bathrooms clean?", ["hotel/1/review/0/0"]),
    ]
    ctx = load_dstc11_track5(root, with_context=True, context_turns=2)
    assert ctx.queries[1].text == "Were the bathrooms clean? Done. Book Acorn Guest House."
    assert ctx.info["with_context"] is True and ctx.info["documents"] == 6
    with pytest.raises(ValueError, match="context_turns must be >= 1, got 0"):
        load_dstc11_track5(root, context_turns=0)


def test_run_eval_end_to_end(tmp_path, embedder, settings_base):
    root = _tiny_dstc(tmp_path / "dstc11_track5")
    es = load_dstc11_track5(root, with_context=True)
    out = run_eval(es, embedder, tmp_path / "index", search_options(settings_base), ks=(1, 5))
    assert out["queries"] == 2 and out["chunks"] == 6 and set(out["results"]) == {"dense", "bm25", "hybrid"}
    dense = out["results"]["dense"]
    assert dense["recall@5"] == 1.0 and dense["hit@5"] == 1.0 and 0.5 <= dense["mrr"] <= 1.0
    for r in out["results"].values():
        assert 0.0 <= r["recall@1"] <= r["recall@5"] <= 1.0 and r["queries"] == 2
    table = format_table(out["results"], ks=(1, 5))
    assert table.splitlines()[0].split() == ["mode", "recall@1", "recall@5", "hit@1", "hit@5", "mrr", "ms/query"]
    assert len(table.splitlines()) == 5
    again = run_eval(es, embedder, tmp_path / "index", search_options(settings_base), ks=(1, 5))
    assert again["ingest"]["embedded"] == 0 and again["index_version"] == out["index_version"]  # idempotent


@pytest.mark.slow
def test_cli_eval_retrieval_generic_jsonl(tmp_path, monkeypatch, capsys):
    from chatbot.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "refunds.md").write_text("# Refunds\n\nRefunds reach your card within five business days.\n")
    (docs / "shipping.md").write_text("# Shipping\n\nParcels arrive in three to five days.\n")
    (docs / "bad.pdf").write_bytes(b"%PDF-1.4 broken")
    qs = tmp_path / "qs.jsonl"
    qs.write_text('{"query": "when do I get my money back", "gold": ["refunds.md"]}\n'
                  '{"query": "delivery time for parcels", "gold": ["shipping.md"]}\n')
    monkeypatch.setenv("CHATBOT_DATA_DIR", str(tmp_path / "var"))
    out_json = tmp_path / "out.json"
    assert main(["eval", "retrieval", "--dataset", str(qs), "--docs", str(docs), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "bad.pdf" in printed
    assert "qs: 2 queries over 2 chunks" in printed
    res = json.loads(out_json.read_text())
    assert res["index_dir"] == str(tmp_path / "var" / "eval" / "qs")
    assert res["results"]["dense"]["recall@1"] == 1.0 and res["results"]["hybrid"]["hit@5"] == 1.0
    assert main(["eval", "retrieval", "--dataset", str(tmp_path / "missing.jsonl")]) == 2
    assert "must be dstc11_track5 or a JSONL file" in capsys.readouterr().err
