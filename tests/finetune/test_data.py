"""finetune.data: chat-template encoding and loss masks, importers, splits; chatbot.company markers."""

from __future__ import annotations

import itertools
import json

import pytest

from chatbot.company import PlaceholderStream, canonical_field, fill_placeholders
from chatbot.errors import DataError
from finetune.data import (
    IGNORE_INDEX,
    DataCollator,
    Dialogue,
    encode_dialogue,
    encode_dialogues,
    import_bitext,
    import_twitter,
    load_dialogues,
    load_jsonl,
    normalize_bitext_reply,
    split_dialogues,
    write_jsonl,
)

TWO_TURNS = Dialogue("two-turns", [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
])


@pytest.fixture(scope="module")
def tokenizer(chat_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_model_path)


def _labelled(ex) -> list[int]:
    return [i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX]


def test_two_turn_label_mask_exact_positions(tokenizer):
    ex = encode_dialogue(tokenizer, TWO_TURNS)
    # SmolLM2's template: default system prompt (21 tokens incl. "\n"), then
    # <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n = positions 21..30,
    # "Hello!" + <|im_end|> = 31..33, "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n" = 34..45,
    # "See you." + <|im_end|> = 46..49; nothing after the last end-of-turn token.
    assert _labelled(ex) == [31, 32, 33, 46, 47, 48, 49]
    assert len(ex["input_ids"]) == 50
    labels = ex["labels"]
    assert tokenizer.decode([labels[i] for i in (31, 32, 33)]) == "Hello!<|im_end|>"
    assert tokenizer.decode([labels[i] for i in (46, 47, 48, 49)]) == "See you.<|im_end|>"
    # the role header before each reply is masked ("assistant\n" is the prompt, not the reply)
    assert tokenizer.decode(ex["input_ids"][27:31]) == "<|im_start|>assistant\n"
    # the same tokens the serving engine renders (apply_chat_template), minus the final newline
    served = tokenizer.apply_chat_template(TWO_TURNS.messages, tokenize=True)
    served = served if isinstance(served, list) else served["input_ids"]
    assert ex["input_ids"] == served[:-1]
    # the reply tokens equal what the model generates after the first turn's prompt
    prompt = tokenizer.apply_chat_template(TWO_TURNS.messages[:1], tokenize=True, add_generation_prompt=True)
    prompt = prompt if isinstance(prompt, list) else prompt["input_ids"]
    assert ex["input_ids"][: len(prompt)] == prompt and len(prompt) == 31


def test_end_of_turn_is_labelled_when_pad_equals_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    short = encode_dialogue(tokenizer, Dialogue("s", [{"role": "user", "content": "Hi"},
                                                      {"role": "assistant", "content": "Yes."}]))
    long = encode_dialogue(tokenizer, TWO_TURNS)
    batch = DataCollator(tokenizer.pad_token_id)([short, long])
    n = len(short["input_ids"])
    eos = tokenizer.eos_token_id
    assert batch["input_ids"][0, n - 1].item() == eos and batch["labels"][0, n - 1].item() == eos
    # right padding uses the same id (eos) but carries no label and no attention
    assert batch["input_ids"][0, n:].eq(eos).all() and batch["labels"][0, n:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][0, n:].eq(0).all() and batch["attention_mask"][0, :n].eq(1).all()
    assert batch["labels"][1, -1].item() == eos  # the long sample's last token: its final <|im_end|>


def test_exactly_one_bos(chat_model_path, tokenizer):
    from transformers import AutoTokenizer

    ex = encode_dialogue(tokenizer, TWO_TURNS)
    assert ex["input_ids"][0] == tokenizer.bos_token_id and ex["input_ids"][1] != tokenizer.bos_token_id

    # a tokenizer that adds a BOS itself, with a distinct BOS token
    adds = AutoTokenizer.from_pretrained(chat_model_path, add_bos_token=True, bos_token="<|endoftext|>")
    bos = adds.bos_token_id
    assert adds("a")["input_ids"][0] == bos
    ids = encode_dialogue(adds, TWO_TURNS)["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1
    # ... and a template that writes the BOS too: still exactly one
    adds.chat_template = "{{ bos_token }}" + adds.chat_template
    ids = encode_dialogue(adds, TWO_TURNS)["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1


def test_fully_masked_sample_raises_naming_it(tokenizer):
    d = Dialogue("no-reply-7", [{"role": "user", "content": "Hi"}])
    with pytest.raises(DataError, match="no-reply-7"):
        encode_dialogue(tokenizer, d)
    with pytest.raises(DataError, match="no-reply-7"):
        encode_dialogues(tokenizer, [TWO_TURNS, d])


def test_overlong_rule_keeps_complete_turns_or_drops_with_count(tokenizer):
    # 40 tokens keep the first turn (ends at 34) but not the second (ends at 50)
    ex = encode_dialogue(tokenizer, TWO_TURNS, max_length=40)
    assert ex["truncated"] and len(ex["input_ids"]) == 34 and _labelled(ex) == [31, 32, 33]
    assert ex["input_ids"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert encode_dialogue(tokenizer, TWO_TURNS, max_length=40, truncation="drop") is None
    assert encode_dialogue(tokenizer, TWO_TURNS, max_length=30) is None  # first reply does not fit
    out, stats = encode_dialogues(tokenizer, [TWO_TURNS, Dialogue("x", TWO_TURNS.messages[:2])], max_length=40)
    assert (stats.kept, stats.truncated, stats.dropped) == (1, 1, 0) and len(out) == 2
    out, stats = encode_dialogues(tokenizer, [TWO_TURNS, Dialogue("x", TWO_TURNS.messages[:2])], max_length=30)
    assert (stats.kept, stats.dropped, stats.dropped_ids) == (0, 2, ["two-turns", "x"]) and out == []


def test_jsonl_round_trip_and_errors_name_line_and_field(tmp_path):
    p = write_jsonl([TWO_TURNS], tmp_path / "d.jsonl")
    assert load_jsonl(p)[0].messages == TWO_TURNS.messages
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 1: messages\[1\].role .* got 'bot'"):
        load_jsonl(bad)
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hello"}]}) + "\n")
    with pytest.raises(DataError, match=r"line 1: messages\[0\].role must be 'user'"):
        load_jsonl(bad)
    bad.write_text('{"messages": [}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: not JSON"):  # the one JSONL reader, chatbot.jsonl
        load_jsonl(bad)


def test_bitext_placeholders_become_company_field_markers():
    reply = ("Log in to {{Website Name}} and open {{Order History}}; call {{Customer Support Phone Number}} "
             "({{Customer Support Hours}}) about order {{Order Number Anonymized}}.")
    out = normalize_bitext_reply(reply, "order_id", "3707955617")
    assert out == ("Log in to [[website_name]] and open Order History; call [[phone]] "
                   "([[support_hours]]) about order 3707955617.")
    assert fill_placeholders(out, {"website_name": "shop.example", "phone": "+1 555 0100",
                                   "support_hours": "9-5"}) == (
        "Log in to shop.example and open Order History; call +1 555 0100 (9-5) about order 3707955617.")
    rows = import_bitext()
    assert len(rows) == 4514
    replies = [d.messages[-1]["content"] for d in rows]
    assert not any("{{" in r or "}}" in r for r in replies)
    assert sum("[[phone]]" in r for r in replies) > 2000  # 2,484 raw {{Customer Support Phone Number}}
    assert canonical_field("customer  support PHONE number") == "phone" and canonical_field("Edit") is None


def test_placeholder_stream_fills_markers_cut_across_deltas():
    s = PlaceholderStream({"phone": "555-0100"})
    parts = [s.push(d) for d in ["Call [", "[ph", "one]", "] now {{Web", "site Name}}."]] + [s.flush()]
    assert "".join(parts) == "Call 555-0100 now our website."
    assert parts[0] == "Call " and "[" not in "".join(parts)


def test_twitter_multi_turn_dialogues():
    rows = import_twitter()
    assert len(rows) > 1000
    multi = [d for d in rows if len(d.messages) >= 4]
    assert len(multi) > 30
    for d in rows:
        roles = [m["role"] for m in d.messages]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in itertools.pairwise(roles))  # alternating after merging
        assert not d.messages[0]["content"].startswith("@")


def test_split_is_by_conversation_fixed_seed_and_saved(tmp_path):
    ds = [Dialogue(f"d{i}", TWO_TURNS.messages) for i in range(50)]
    a = split_dialogues(ds, 0.1, 0.2, seed=3)
    b = split_dialogues(list(reversed(ds)), 0.1, 0.2, seed=3)
    ids = lambda s: [[d.id for d in part] for part in (s.train, s.validation, s.test)]
    assert ids(a) == ids(b)
    assert (len(a.train), len(a.validation), len(a.test)) == (35, 5, 10)
    assert not set(ids(a)[0]) & set(ids(a)[2]) and not set(ids(a)[1]) & set(ids(a)[2])
    assert ids(split_dialogues(ds, 0.1, 0.2, seed=4)) != ids(a)
    a.save(tmp_path)
    saved = json.loads((tmp_path / "splits.json").read_text())
    assert saved["ids"]["test"] == ids(a)[2] and saved["seed"] == 3
    assert [d.id for d in load_jsonl(tmp_path / "test.jsonl")] == ids(a)[2]


def test_load_dialogues_records_hashes_and_rejects_duplicate_ids(tmp_path):
    p = write_jsonl([TWO_TURNS], tmp_path / "a.jsonl")
    ds, sources = load_dialogues([p])
    assert len(ds) == 1 and len(sources[0]["sha256"]) == 64 and sources[0]["dialogues"] == 1
    with pytest.raises(DataError, match="two-turns"):
        load_dialogues([p, p])
