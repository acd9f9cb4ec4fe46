"""Training that trains on a handful of reviewed conversations (issue 14): no optimizer step at learning rate 0,
at least ``min_steps`` steps, every conversation trains and the evaluation runs on the fixed reference set, the split
stated, too little data refused, an adapter that changes the model. Tiny random Llama, real SmolLM2 tokenizer."""

from __future__ import annotations

import json

import pytest

from chatbot.errors import DataError, TooLittleDataError
from finetune.base_model import load_tokenizer
from finetune.data import REFERENCE_SET, load_jsonl
from finetune.sft import SFTConfig, no_zero_warmup, plan_steps, prepare_data, run_summary, train_sft
from tests.finetune.sft_helpers import tiny_llama, toy_dialogues


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, chat_model_path) -> str:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", chat_model_path)


def _lrs(scheduler_name: str, warmup: int, total: int) -> list[float]:
    import torch
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = no_zero_warmup(get_scheduler(scheduler_name, optimizer=opt, num_warmup_steps=warmup,
                                         num_training_steps=total), warmup)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_never_runs_a_step_at_learning_rate_zero():
    import torch
    from transformers import get_scheduler

    # transformers' own warm-up: the first step runs at rate 0 (the bug: a one-step run changes nothing)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    get_scheduler("cosine", optimizer=opt, num_warmup_steps=1, num_training_steps=1)
    assert opt.param_groups[0]["lr"] == 0.0
    for name in ("cosine", "linear", "constant_with_warmup"):
        lrs = _lrs(name, 3, 10)
        assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]), name
        assert min(lrs) > 0, name
    assert _lrs("cosine", 0, 1) == [1.0]


def test_plan_steps_raises_small_runs_to_min_steps_and_warms_up_only_long_ones():
    four = plan_steps(4, SFTConfig(batch_size=8, min_steps=20, warmup_ratio=0.03))
    assert four == {"steps_per_epoch": 1, "epoch_steps": 1, "steps": 20, "epochs": 20.0,
                    "raised_to_min_steps": True, "warmup_steps": 0}
    big = plan_steps(4000, SFTConfig(batch_size=8, grad_accum=2, min_steps=20, warmup_ratio=0.03))
    assert big["steps_per_epoch"] == 250 and big["steps"] == 250 and not big["raised_to_min_steps"]
    assert big["warmup_steps"] == 7
    assert plan_steps(4, SFTConfig(max_steps=3, min_steps=20))["steps"] == 3  # an explicit max_steps wins
    assert plan_steps(10, SFTConfig(batch_size=2, min_steps=20), world_size=2)["steps_per_epoch"] == 3


def test_too_little_data_is_refused_with_a_typed_error(tiny):
    tok = load_tokenizer(tiny)
    with pytest.raises(TooLittleDataError, match=r"2 dialogue\(s\), at least min_examples=3") as err:
        prepare_data(toy_dialogues(2), tok, SFTConfig(base_model=tiny))
    assert (err.value.examples, err.value.minimum) == (2, 3)
    assert isinstance(err.value, DataError)
    # four dialogues, but none fits max_length: nothing to learn from
    with pytest.raises(TooLittleDataError, match="0 of 4 training dialogue"):
        prepare_data(toy_dialogues(4), tok, SFTConfig(base_model=tiny, max_length=16, truncation="drop"))


def test_small_data_trains_on_all_and_evaluates_on_the_reference_set(tiny):
    tok = load_tokenizer(tiny)
    prepared = prepare_data(toy_dialogues(4), tok, SFTConfig(base_model=tiny, system_prompt="Be brief."))
    ref_val, ref_test = load_jsonl(REFERENCE_SET / "validation.jsonl"), load_jsonl(REFERENCE_SET / "test.jsonl")
    s = prepared.splits
    assert [d.id for d in s.train] == [f"toy-{i}" for i in range(4)]
    assert [d.id for d in s.validation] == [d.id for d in ref_val] and len(ref_val) == 27
    assert [d.id for d in s.test] == [d.id for d in ref_test] and len(ref_test) == 14
    assert s.evaluation["kind"] == "reference" and s.validation[0].messages[0] == {"role": "system",
                                                                                     "content": "Be brief."}
    assert len(prepared.validation) == 27  # every reference dialogue fits max_length 512
    # at the threshold the data is split as before
    held = prepare_data(toy_dialogues(20), tok, SFTConfig(base_model=tiny))
    assert held.splits.evaluation == {"kind": "held-out"}
    assert held.splits.manifest()["counts"] == {"train": 16, "validation": 2, "test": 2}
    with pytest.raises(DataError, match="also in the reference set"):
        prepare_data([*toy_dialogues(3), ref_val[0]], tok, SFTConfig(base_model=tiny))


@pytest.mark.slow
def test_four_conversations_train_an_adapter_that_changes_the_model(tiny, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "approved"
    cfg = SFTConfig(base_model=tiny, eval_replies=2, eval_max_new_tokens=4, warmup_ratio=0.1, logging_steps=1)
    res = train_sft(toy_dialogues(4), out, cfg, progress=False)
    m = res.manifest
    run = m["run"]
    assert run["examples"] == {"train": 4, "validation": 27, "test": 14}
    assert run["evaluation"]["kind"] == "reference" and run["raised_to_min_steps"]
    assert run["steps"] == m["training"]["global_step"] == 20 and run["epochs"] == pytest.approx(20.0)
    lrs = m["training"]["step_learning_rates"]
    assert len(lrs) == 20 and min(lrs) > 0  # no step at learning rate 0, warm-up included
    assert run["warmup_steps"] == 2 and lrs[:3] == pytest.approx([2e-4 / 3, 4e-4 / 3, 2e-4])
    weights = load_file(str(out / "adapter_model.safetensors"))
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and all(float(v.abs().max()) > 0 for v in b)
    assert m["training"]["weight_change"]["lora_B_nonzero"] == len(b) and run["changes_model"] is True
    assert m["metrics"]["test_n"] == 2 and m["base_metrics"]["val_loss"] is not None
    assert (out / "validation.jsonl").read_text().count("\n") == 27  # promotion and eval use the same set
    assert json.loads((out / "splits.json").read_text())["evaluation"]["kind"] == "reference"
    assert m["summary"] == run_summary(m)
    assert "all 4 conversation(s) used for training" in m["summary"]
    assert "27 validation, 14 test dialogues" in m["summary"] and "20 optimizer step(s)" in m["summary"]
    assert "The adapter changes the model" in m["summary"]


def test_summary_says_an_unchanged_adapter_cannot_be_promoted():
    m = {"run": {"examples": {"train": 8, "validation": 1, "test": 1}, "evaluation": {"kind": "held-out"},
                 "steps": 1, "epochs": 1.0, "learning_rate": 2e-4, "warmup_steps": 0, "step_learning_rate_min": 0.0,
                 "step_learning_rate_max": 0.0, "train_seconds": 1.0, "total_seconds": 2.0, "changes_model": False},
         "training": {"weight_change": {"lora_B_nonzero": 0, "lora_B_total": 14}}}
    text = run_summary(m)
    assert text.startswith("split 8 train / 1 validation / 1 test conversation(s); 1 optimizer step(s)")
    assert text.endswith("leaves the model unchanged (every lora_B matrix is zero): it cannot be promoted.")



@pytest.mark.slow
def test_cli_train_prints_the_run_and_refuses_too_little_data(tiny, tmp_path, capsys):
    from chatbot.cli import main
    from finetune.data import write_jsonl

    data = write_jsonl(toy_dialogues(4), tmp_path / "approved.jsonl")
    rc = main(["train", "--data", str(data), "--out", str(tmp_path / "a"), "--base-model", tiny, "--eval-replies",
               "2", "--eval-max-new-tokens", "4", "--min-steps", "6"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "all 4 conversation(s) used for training" in out and "27 validation, 14 test dialogues" in out
    assert "6 optimizer step(s) (raised to min_steps 6), 6.0 epoch(s), learning rate 0.0002" in out
    assert "The adapter changes the model" in out
    few = write_jsonl(toy_dialogues(2), tmp_path / "few.jsonl")
    rc = main(["train", "--data", str(few), "--out", str(tmp_path / "b"), "--base-model", tiny])
    err = capsys.readouterr().err
    assert rc == 2 and "error: too little data to learn from: 2 dialogue(s), at least min_examples=3" in err

    # --init-adapter continues adapter "a" (a folder here; a registered name or version works the same way)
    rc = main(["train", "--data", str(data), "--out", str(tmp_path / "c"), "--base-model", tiny, "--eval-replies",
               "0", "--max-steps", "2", "--init-adapter", str(tmp_path / "a")])
    capsys.readouterr()
    first = json.loads((tmp_path / "a" / "adapter.json").read_text())
    cont = json.loads((tmp_path / "c" / "adapter.json").read_text())
    assert rc == 0 and cont["training"]["init_adapter"]["version"] == first["version"]
    assert cont["training"]["global_step"] == 2 and cont["weights_sha256"] != first["weights_sha256"]
    rc = main(["train", "--data", str(data), "--out", str(tmp_path / "d"), "--base-model", tiny,
               "--init-adapter", "no-such-adapter"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: adapter 'no-such-adapter' is neither a folder" in err and not (tmp_path / "d").exists()
