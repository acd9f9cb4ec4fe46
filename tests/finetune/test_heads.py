"""Intent and entity heads: data readers, calibration, sub-word alignment, train/save/load, bad input.

Fast tests train a two-layer, 32-wide random-weight BERT (built from a config, with
the real MiniLM tokenizer) for a few steps; the slow ones use the shipped heads in
data/heads/.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from chatbot.errors import ConfigError, InvalidInputError, NotFoundError
from finetune.calibration import choose_threshold, decide, fit_temperature, nll, softmax
from finetune.heads import (
    EMBEDDED_BASE,
    EntityHead,
    HeadConfig,
    IntentHead,
    align_tags,
    bio_labels,
    resolve_base,
    spans_from_tags,
)
from finetune.intent_data import (
    EntitySplits,
    IntentSplits,
    Span,
    label_counts_warnings,
    load_bitext_entities,
    load_intent_splits,
    read_labelled_file,
    stratified_split,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_INTENT = ROOT / "data" / "heads" / "intent"
SHIPPED_ENTITY = ROOT / "data" / "heads" / "entity"

INTENT_ROWS = [
    ("cancel my order please", "cancel_order"),
    ("i want to cancel the order", "cancel_order"),
    ("how do I cancel purchase 123", "cancel_order"),
    ("where is my package", "track_order"),
    ("track order 98765", "track_order"),
    ("when will my order arrive", "track_order"),
    ("what is the weather tomorrow", "out_of_scope"),
    ("tell me a joke", "out_of_scope"),
    ("book a flight to rome", "out_of_scope"),
] * 4


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base(EMBEDDED_BASE))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 random BERT with the real MiniLM tokenizer files."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)  # the same random weights whatever ran before
    d = tmp_path_factory.mktemp("tiny-bert")
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(d)
    src = Path(resolve_base(EMBEDDED_BASE))
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, d / f)
    return str(d)


def _tiny_cfg(base: str, **kw) -> HeadConfig:
    return HeadConfig(base_model=base, max_steps=kw.pop("max_steps", 30), batch_size=8, learning_rate=5e-3,
                      threads=1, **kw)


@pytest.fixture(scope="session")
def tiny_intent(tiny_base, tmp_path_factory):
    splits = IntentSplits(INTENT_ROWS, INTENT_ROWS[:9], INTENT_ROWS[:9], "out_of_scope", "toy")
    out = tmp_path_factory.mktemp("heads") / "intent"
    head = IntentHead.train(splits, _tiny_cfg(tiny_base, max_steps=60), out_dir=out, progress=False)
    return head, out


ENTITY_ROWS = [
    ("cancel order 00004587345 please", [Span(13, 24, "order_id")]),
    ("track purchase 3707955617", [Span(15, 25, "order_id")]),
    ("open a gold account", [Span(7, 11, "account_type")]),
    ("where is my package", []),
] * 4


@pytest.fixture(scope="session")
def tiny_entity(tiny_base, tmp_path_factory):
    splits = EntitySplits(ENTITY_ROWS, ENTITY_ROWS[:4], ENTITY_ROWS[:4], "toy")
    out = tmp_path_factory.mktemp("heads") / "entity"
    head = EntityHead.train(splits, _tiny_cfg(tiny_base, max_length=32), out_dir=out, progress=False)
    return head, out


# ---------------------------------------------------------------- data


def test_unknown_label_is_an_error_naming_the_row(tmp_path):
    f = tmp_path / "train.csv"
    f.write_text("text,label\nhello,greet\nbye,leave\ncancel it,cancle_order\n")
    with pytest.raises(InvalidInputError, match=r"row 3: unknown label 'cancle_order'"):
        read_labelled_file(f, labels=["greet", "leave", "cancel_order"])


def test_cli_train_rejects_an_unknown_label_naming_the_row(tmp_path, capsys):
    from chatbot.cli import main

    f = tmp_path / "train.csv"
    f.write_text("text,label\ncancel it,cancel_order\nwhere is it,track_order\nrefund,refnud\n")
    rc = main(["train-intents", "--dataset", str(f), "--labels", "cancel_order,track_order,refund", "--out",
               str(tmp_path / "h")])
    assert rc == 2
    assert "row 3: unknown label 'refnud'" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_unknown_validation_label_is_an_error_naming_the_row(tiny_base, tmp_path):
    splits = IntentSplits(INTENT_ROWS, [("hi", "cancel_order"), ("yo", "greeting")], [], None, "toy")
    with pytest.raises(InvalidInputError, match=r"validation row 2: unknown label 'greeting'"):
        IntentHead.train(splits, _tiny_cfg(tiny_base, max_steps=1), progress=False)


def test_empty_label_names_row_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": ""}\n')
    with pytest.raises(InvalidInputError, match=r"row 2: empty 'label'"):
        read_labelled_file(f)


def test_label_with_one_example_is_warned(caplog):
    rows = [("a", "x"), ("b", "x"), ("c", "lonely")]
    with caplog.at_level(logging.WARNING):
        msgs = label_counts_warnings(rows)
    assert msgs == [m for m in msgs if "'lonely' has 1 training example" in m] and len(msgs) == 1
    assert "lonely" in caplog.text
    # the stratified split keeps a one-example label in training
    train, _, _ = stratified_split(rows, (0.8, 0.1, 0.1))
    assert ("c", "lonely") in train


def test_generic_csv_dataset_splits(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("msg,intent\n" + "".join(f"text {i},{'a' if i % 2 else 'b'}\n" for i in range(40)))
    s = load_intent_splits(f, text_field="msg", label_field="intent")
    assert len(s.train) + len(s.validation) + len(s.test) == 40
    assert s.labels == ["a", "b"] and len(s.validation) == 4
    with pytest.raises(NotFoundError):
        load_intent_splits(tmp_path / "missing.csv")


def test_bitext_entity_spans_match_their_values():
    s = load_bitext_entities()
    assert s.types == ["account_type", "delivery_city", "delivery_country", "invoice_id", "order_id",
                       "person_name", "refund_amount"]
    rows = s.train + s.validation + s.test
    assert len(rows) == 4514
    spans = [(t, sp) for t, sps in rows for sp in sps]
    assert len(spans) == 1686
    assert all(0 <= sp.start < sp.end <= len(t) for t, sp in spans)


# ---------------------------------------------------------------- calibration


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, size=(4000, 5))
    labels = np.array([rng.choice(5, p=p) for p in softmax(true_logits)])
    overconfident = true_logits * 3.0  # a model 3x too sharp
    t = fit_temperature(overconfident, labels)
    assert 2.6 < t < 3.4
    assert nll(overconfident, labels, t) < nll(overconfident, labels, 1.0) - 0.1


def test_threshold_keeps_target_in_scope_accuracy_and_is_the_highest():
    rng = np.random.default_rng(1)
    n, c, oos = 600, 4, 3
    labels = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), labels] += rng.uniform(0, 4, n)
    probs = softmax(logits)
    ch = choose_threshold(probs, labels, oos, 0.7)
    assert ch.met_target and ch.in_scope_accuracy >= 0.7
    ins = labels != oos
    higher = decide(probs, ch.threshold + 1e-6, oos)
    assert (higher[ins] == labels[ins]).mean() < 0.7  # any higher threshold misses the target
    assert ch.oos_recall is not None and 0.0 <= ch.oos_recall <= 1.0
    with pytest.raises(ConfigError, match="target_in_scope_accuracy"):
        choose_threshold(probs, labels, oos, 1.5)


# ---------------------------------------------------------------- alignment


def test_subword_label_alignment_hand_made(tokenizer):
    text = "Cancel order 00004587345 please"
    spans = [Span(13, 24, "order_id")]
    assert text[13:24] == "00004587345"
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    toks = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    tags = align_tags(enc["offset_mapping"], spans, enc["special_tokens_mask"])
    pairs = list(zip(toks, tags))
    # the number is split into several word pieces; all are labelled, B- on the first
    number = [(tok, tag) for tok, tag, off in zip(toks, tags, enc["offset_mapping"]) if 13 <= off[0] < 24]
    assert len(number) >= 2, pairs
    assert number[0][1] == "B-order_id" and all(tag == "I-order_id" for _, tag in number[1:])
    assert number[1][0].startswith("##")
    assert pairs[0] == ("[CLS]", None) and pairs[-1] == ("[SEP]", None)
    assert [tag for tok, tag in pairs if tok in ("cancel", "order", "please")] == ["O", "O", "O"]
    # and back to the exact character span
    assert spans_from_tags(tags, enc["offset_mapping"]) == [(13, 24, "order_id", 1.0)]


def test_alignment_of_a_span_inside_a_word(tokenizer):
    text = "open anotherstandard account"
    spans = [Span(12, 20, "account_type")]  # "standard" glued to "another"
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    tags = align_tags(enc["offset_mapping"], spans, enc["special_tokens_mask"])
    labelled = [off for off, tag in zip(enc["offset_mapping"], tags) if tag and tag != "O"]
    assert labelled and labelled[0][0] <= 12 and labelled[-1][1] >= 20
    assert tags.count("B-account_type") == 1


def test_bio_labels_are_sorted_and_paired():
    assert bio_labels(["order_id", "account_type"]) == [
        "O", "B-account_type", "I-account_type", "B-order_id", "I-order_id"]


# ---------------------------------------------------------------- tiny heads


def test_intent_label_map_round_trips(tiny_intent):
    head, out = tiny_intent
    meta = json.loads((out / "head.json").read_text())
    assert meta["labels"] == ["cancel_order", "out_of_scope", "track_order"]
    assert meta["oos_label"] == "out_of_scope" and meta["kind"] == "intent" and meta["method"] == "lora"
    training = json.loads((out / "training.json").read_text())
    assert training["data"]["hash"].startswith("sha256:") and training["config"]["max_steps"] == 60
    metrics = json.loads((out / "metrics.json").read_text())
    assert "micro avg" in metrics["validation"]["report"]
    loaded = IntentHead.load(out)
    assert loaded.labels == head.labels and loaded.label2id == {"cancel_order": 0, "out_of_scope": 1,
                                                                "track_order": 2}
    assert loaded.temperature == pytest.approx(head.temperature) and loaded.threshold == head.threshold
    texts = ["cancel my order please", "book a flight to rome"]
    np.testing.assert_allclose(loaded.probabilities(texts), head.probabilities(texts), atol=2e-3)
    # a loaded (merged) LoRA head saves its adapter again, e.g. after recalibration
    choice = loaded.calibrate(INTENT_ROWS[:9], 0.5)
    assert loaded.threshold == choice["threshold"] and loaded.meta["target_in_scope_accuracy"] == 0.5
    again = IntentHead.load(loaded.save(out.parent / "intent-recalibrated"))
    assert again.threshold == loaded.threshold and again.labels == head.labels
    np.testing.assert_allclose(again.logits(texts), loaded.logits(texts), atol=1e-5)


def test_intent_head_learns_the_toy_task(tiny_intent):
    head, _ = tiny_intent
    preds = head.predict(["cancel my order please", "where is my package"], threshold=0.0)
    assert [p.top_label for p in preds] == ["cancel_order", "track_order"]


def test_intent_bad_input_and_padding(tiny_intent):
    head, _ = tiny_intent
    long = "cancel my order " + "word " * 2_000
    assert len(long) > 10_000
    texts = ["", "😀😀🙏", long, "where is my package"]
    preds = head.predict(texts)
    assert len(preds) == 4
    assert all(0.0 <= p.confidence <= 1.0 and p.label in head.labels + [head.reject_label] for p in preds)
    # 10,000 characters are truncated to max_length tokens, and still predicted
    enc = head.tokenizer([long], truncation=True, max_length=head.max_length)
    assert len(enc["input_ids"][0]) == head.max_length
    # a batch of 2 of different lengths (padding) scores like two single messages
    pair = ["hi", "i want to cancel the order i placed yesterday evening"]
    batched = head.probabilities(pair)
    single = np.vstack([head.probabilities([t]) for t in pair])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    with pytest.raises(ConfigError, match="threshold must be in"):
        IntentHead(head.model, head.tokenizer, head.labels, threshold=1.5)


def test_entity_label_map_round_trips_and_returns_offsets(tiny_entity):
    head, out = tiny_entity
    loaded = EntityHead.load(out)
    assert loaded.labels == head.labels == bio_labels(["account_type", "order_id"])
    texts = ["cancel order 00004587345 please", "", "🙂", "x " * 5000 + "order 3707955617"]
    slots = loaded.predict(texts, threshold=0.0)
    assert len(slots) == 4
    for text, ss in zip(texts, slots):
        for s in ss:
            assert text[s.start:s.end] == s.value and s.type in loaded.types
    meta = json.loads((out / "head.json").read_text())
    assert meta["kind"] == "entity" and "threshold" in meta


def test_load_errors(tmp_path, tiny_intent):
    _, out = tiny_intent
    with pytest.raises(NotFoundError, match="head.json"):
        IntentHead.load(tmp_path)
    from chatbot.errors import ModelAssetError

    with pytest.raises(ModelAssetError, match="kind"):
        EntityHead.load(out)


def test_cli_eval_intents_writes_report_and_json(tiny_intent, tmp_path, capsys):
    from chatbot.cli import main

    _, out = tiny_intent
    data = tmp_path / "eval.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in INTENT_ROWS))
    js = tmp_path / "out.json"
    # a file dataset splits 80/10/10; evaluate its training part so every label is present
    rc = main(["eval", "intents", "--dataset", str(data), "--split", "train", "--head", str(out), "--json", str(js)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "micro avg" in text and "weighted avg" in text and "cancel_order" in text
    res = json.loads(js.read_text())
    assert res["n"] > 0 and 0.0 <= res["accuracy"] <= 1.0 and "oos_recall" in res


def test_head_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="HeadConfig.batch_size"):
        HeadConfig(batch_size=0)
    with pytest.raises(ConfigError, match="unknown HeadConfig fields"):
        HeadConfig.from_dict({"epochz": 3})


# ---------------------------------------------------------------- shipped heads


@pytest.fixture(scope="session")
def shipped_intent():
    if not (SHIPPED_INTENT / "head.json").is_file():
        pytest.fail(f"the shipped intent head is missing at {SHIPPED_INTENT}")
    return IntentHead.load(SHIPPED_INTENT)


@pytest.mark.slow
def test_shipped_threshold_turns_off_topic_into_out_of_scope(shipped_intent):
    off_topic = ["what's the weather going to be like in paris tomorrow",
                 "can you recommend a good recipe for lasagna"]
    preds = shipped_intent.predict(off_topic)
    assert all(p.out_of_scope and p.label == "out_of_scope" for p in preds), preds
    on_topic = shipped_intent.predict(["I want to cancel my order"])[0]
    assert on_topic.label == "cancel_order" and not on_topic.out_of_scope
    # the threshold alone (not only the out-of-scope class) rejects a low score
    p = shipped_intent.predict(["I want to cancel my order"], threshold=1.0)[0]
    assert p.out_of_scope and p.below_threshold
    assert 0.0 < shipped_intent.threshold < 1.0 and shipped_intent.temperature > 0


@pytest.mark.slow
def test_shipped_entity_head_finds_an_order_number_in_a_long_message():
    head = EntityHead.load(SHIPPED_ENTITY)
    text = "hello " * 1700 + "please cancel order 00004587345"
    assert len(text) > 10_000
    slots = head.predict([text, "track order 3707955617 please"])
    assert [(s.type, s.value) for s in slots[0]] == [("order_id", "00004587345")]
    s = slots[1][0]
    assert (s.type, s.value, s.start, s.end) == ("order_id", "3707955617", 12, 22)
