"""chatbot.answer_eval: exact scores on a hand-made three-row set, the dataset loader's errors, the CLI table."""

from __future__ import annotations

import json

import pytest

from chatbot.answer_eval import (
    AnswerCase,
    format_summary,
    is_abstention,
    k_precision,
    load_answer_set,
    score_row,
    summarize,
)
from chatbot.errors import DataError
from tests.chatbot.test_verified_answers import index_dir  # noqa: F401  (fixture: four small policy documents)

ABSTAIN = "I'm sorry, I can't answer that from our help documents. Would you like me to connect you with a person?"


def three_rows():
    shipping = AnswerCase("a", "How much is shipping?", ["ship.md"], [["$8.00", "8 dollars"], ["per order"]], True)
    returns = AnswerCase("b", "How long can I return?", ["ret.md"], [["30 days"]], True)
    hours = AnswerCase("c", "When do you open?", [], [], False)
    return [
        # one fact of two, every content token in the passage, cited gold document
        score_row(shipping, "Standard shipping costs $8.00 [1].", ["Standard shipping costs $8.00 per order."],
                  ["ship.md"], action="answer", latency_ms=100, completion_tokens=10),
        # an invented duration: the fact is missing and "45 days" is an unsupported claim; K-Precision 2/3
        # (content tokens return, 45, day; "you can ... it within" are stop words)
        score_row(returns, "You can return it within 45 days.", ["Returns are accepted within 30 days."],
                  ["other.md"], action="answer", latency_ms=300, completion_tokens=20),
        # unanswerable: the abstention is correct
        score_row(hours, ABSTAIN, [], [], action="answer", kind="abstained", latency_ms=200),
    ]


def test_row_scores():
    a, b, c = three_rows()
    assert (a.facts_found, a.facts_total, a.k_precision, a.unsupported, a.gold_cited, a.correct) == \
        (1, 2, 1.0, [], True, False)
    assert (b.facts_found, b.k_precision, b.unsupported, b.gold_cited, b.correct) == (0, 2 / 3, ["45 days"], False, False)
    assert (c.abstained, c.correct, c.k_precision) == (True, True, None)


def test_summary_of_three_rows_gives_the_exact_numbers():
    s = summarize(three_rows())
    assert (s["rows"], s["answerable"], s["unanswerable"]) == (3, 2, 1)
    assert s["correct"] == 0.0
    assert s["fact_recall"] == pytest.approx((1 / 2 + 0) / 2)
    assert s["k_precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert s["unsupported_rate"] == pytest.approx(1 / 3)
    assert s["gold_cited"] == 0.5 and s["clarify_rate"] == 0.0 and s["abstention"] == 1.0
    assert s["latency_p50_ms"] == 200 and s["tokens_per_answer"] == 10
    table = format_summary([("generate", s)])
    assert s["false_abstention"] == 0.0
    assert s["reach"] == 1.0  # both answerable rows' passages hold their facts, though neither reply does
    assert table.splitlines()[2] == ("| generate | 3 | 0.00 | 1.00 | 0.25 | 0.83 | 0.33 | 1.00 | 0.00 | 0.00 | 0.50 | 10 | 200 | 290 |")


def test_an_abstention_on_an_answerable_row_is_a_false_abstention():
    """The abstention column only sees unanswerable rows; declining a question the documents answer shows here."""
    shipping = AnswerCase("a", "How much is shipping?", ["ship.md"], [["$8.00"]], True)
    hours = AnswerCase("c", "When do you open?", [], [], False)
    rows = [score_row(shipping, ABSTAIN, ["Standard shipping costs $8.00 per order."], ["ship.md"]),
            score_row(shipping, "Shipping costs $8.00 [1].", ["Standard shipping costs $8.00 per order."], ["ship.md"]),
            score_row(hours, ABSTAIN, [], [])]
    s = summarize(rows)
    assert (s["false_abstention"], s["abstention"], s["correct"]) == (0.5, 1.0, 0.5)


def test_reach_is_every_fact_in_the_retrieved_passages_whatever_the_reply():
    """The ceiling of a verified answer: the retrieved passages (not only the cited ones) hold every fact."""
    shipping = AnswerCase("a", "How much is shipping?", ["ship.md"], [["$8.00"], ["per order"]], True)
    hours = AnswerCase("c", "When do you open?", [], [], False)
    passage = "Standard shipping costs $8.00 per order."
    # the abstention cited nothing, but the retrieved passage held both facts
    declined = score_row(shipping, ABSTAIN, [], [], retrieved=[passage])
    # one fact in one passage, the other in another: still reachable
    split = score_row(shipping, "x", [], [], retrieved=["Shipping costs $8.00.", "Billed per order."])
    # one fact missing from every passage
    short = score_row(shipping, "x", [passage.replace(" per order", "")], [])
    unanswerable = score_row(hours, ABSTAIN, [passage], [])
    assert [r.reach for r in (declined, split, short, unanswerable)] == [True, True, False, False]
    assert summarize([declined, split, short, unanswerable])["reach"] == pytest.approx(2 / 3)


def test_abstention_needs_both_the_refusal_and_the_offer_of_a_person():
    assert is_abstention(ABSTAIN)
    assert not is_abstention("I can't answer that.")
    assert not is_abstention("Our support team is great.")
    assert is_abstention("", held=True)
    # an abstention that invents a number is not one
    case = AnswerCase("u", "q", [], [], False)
    assert not score_row(case, "I can't answer that, but call 555-0100 to reach a person.", [], []).abstained


def test_k_precision_ignores_citation_markers_and_needs_passages():
    assert k_precision("Gold members get unlimited returns [2].", ["Gold members get unlimited returns"]) == 1.0
    assert k_precision("Gold members get unlimited returns.", []) == 0.0
    assert k_precision("[1]", ["x"]) is None


def test_load_answer_set_reads_rows_and_names_the_bad_field(tmp_path):
    good = {"id": "q1", "query": "How much?", "history": ["hi"], "gold": ["a.md"], "facts": [["$8"]],
            "answerable": True}
    p = tmp_path / "set.jsonl"
    p.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "id": "q2", "history": []}) + "\n")
    rows = load_answer_set(p)
    assert [(r.id, r.history) for r in rows] == [("q1", ["hi"]), ("q2", [])]
    for bad, msg in [
        ({**good, "facts": []}, "an answerable row needs at least one fact"),
        ({**good, "answerable": False}, "an unanswerable row has no facts"),
        ({**good, "facts": [[""]]}, "field 'facts' must be"),
        ({**good, "answerable": "yes"}, "field 'answerable' must be bool"),
        ({**good, "history": "hi"}, "field 'history' must be a list"),
    ]:
        p.write_text(json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=msg):
            load_answer_set(p)
    p.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError, match=r"set.jsonl:2: duplicate id 'q1'"):
        load_answer_set(p)
    p.write_text("{not json\n")
    with pytest.raises(DataError, match=r"set.jsonl:1: not JSON"):
        load_answer_set(p)


def test_the_shipped_dev_sets_load_and_their_facts_occur_in_their_gold_documents():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "data" / "eval"
    for name, docs in (("kb", root.parent / "kb"), ("dstc11_faq", root / "dstc11_faq" / "docs")):
        rows = load_answer_set(root / name / "questions.jsonl")
        assert len(rows) >= 40 and sum(not r.answerable for r in rows) >= 10
        for r in rows:
            texts = [(docs / g).read_text().lower() for g in r.gold]
            for fact in r.facts:
                assert any(fact[0].lower() in t for t in texts), (r.id, fact[0])


def test_run_case_reaches_through_every_retrieved_passage_even_when_the_reply_cites_none(
        tmp_path, index_dir, embedder):  # noqa: F811
    """A turn whose extractive answer found no sentence close enough abstains and cites nothing; its retrieved
    passages still decide reach."""
    import asyncio

    from chatbot.answer_eval import run_case
    from tests.chatbot.test_verified_answers import make

    a = make(tmp_path, index_dir, embedder, "unused", answer_mode="extractive", extractive_min_score=0.99)
    held = AnswerCase("s", "How much does standard shipping cost?", ["shipping.md"], [["$8.00"]], True)
    missing = AnswerCase("m", "How much does standard shipping cost?", ["shipping.md"], [["$5.00"]], True)
    r = asyncio.run(run_case(a, held))
    assert (r.kind, r.cited, r.correct, r.reach) == ("abstained", [], False, True)
    assert asyncio.run(run_case(a, missing)).reach is False
