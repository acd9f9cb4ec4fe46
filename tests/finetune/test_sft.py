"""finetune.sft and finetune.evaluate on a tiny random Llama (real SmolLM2 tokenizer): accumulation, precision,
gradient checkpointing, early stopping, resume, the adapter folder, left-padded generation and DDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from chatbot.errors import ConfigError
from finetune.base_model import load_tokenizer
from finetune.data import encode_dialogues
from chatbot.hashing import model_fingerprint
from finetune.sft import SFTConfig, build_trainer, init_adapter_config, load_model, resolve_precision, train_sft
from tests.finetune.sft_helpers import tiny_llama, toy_dialogues

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, chat_model_path) -> str:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", chat_model_path)


@pytest.fixture(scope="module")
def encoded(tiny):
    tok = load_tokenizer(tiny)
    train, _ = encode_dialogues(tok, toy_dialogues(8), 128)
    val, _ = encode_dialogues(tok, toy_dialogues(12)[8:], 128)
    return tok, train, val


def _train(tiny, encoded, tmp_path, float64: bool = False, before=None, **cfg):
    """Train from the same initial weights; return (trainer, {lora param: tensor}, logged losses).

    ``float64``: train the model in double precision (comparisons of summation orders). ``before``: called with
    the trainer before it trains (hooks, spies).
    """
    import torch
    import transformers

    tok, train, val = encoded
    base = {"base_model": tiny, "lora_dropout": 0.0, "warmup_ratio": 0.0, "logging_steps": 1, "eval_steps": 0,
            "max_grad_norm": 1e9, "eval_replies": 0}
    config = SFTConfig(**{**base, **cfg})
    transformers.set_seed(config.seed)
    model = load_model(tiny, config)
    if float64:
        model = model.to(torch.float64)
    trainer = build_trainer(model, tok, train, val, config, tmp_path / "ckpt", progress=False)
    if before:
        before(trainer)
    trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, params, losses


@pytest.mark.slow
def test_gradient_accumulation_equals_the_large_batch(tiny, encoded, tmp_path):
    import torch

    # the 8 samples have different lengths (one- and two-turn), so a per-micro-batch mean would differ.
    # In float64: micro-batches sum the same terms in another order, and float32 sums reordered differ
    # by ~1e-6 on some CPUs (issue #11), as much as a small real difference; in float64 by ~1e-15.
    _, big, big_loss = _train(tiny, encoded, tmp_path / "a", batch_size=4, grad_accum=1, max_steps=2,
                              optim="sgd", learning_rate=0.5, float64=True)
    _, acc, acc_loss = _train(tiny, encoded, tmp_path / "b", batch_size=2, grad_accum=2, max_steps=2,
                              optim="sgd", learning_rate=0.5, float64=True)
    _, one, _ = _train(tiny, encoded, tmp_path / "c", batch_size=1, grad_accum=4, max_steps=2,
                       optim="sgd", learning_rate=0.5, float64=True)
    assert all(p.dtype == torch.float64 for p in big.values())
    moved = sum(float(p.abs().sum()) for n, p in big.items() if "lora_B" in n)
    assert moved > 1e-3  # the adapter was trained
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(one[name], big[name], rtol=1e-9, atol=1e-12)
    assert big_loss == pytest.approx(acc_loss, rel=1e-4)  # the Trainer logs the loss rounded to 4 decimals


@pytest.mark.slow
def test_precision_auto_resolves_by_hardware_and_bf16_trains(tiny, encoded, tmp_path, monkeypatch):
    from finetune import sft

    monkeypatch.setattr(sft, "bf16_supported", lambda: True)
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(sft, "bf16_supported", lambda: False)
    assert resolve_precision("auto") == "fp32" and resolve_precision("fp32") == "fp32"
    with pytest.raises(ConfigError, match="precision must be auto, bf16 or fp32, got 'fp16'"):
        resolve_precision("fp16")
    monkeypatch.undo()
    t32, _, l32 = _train(tiny, encoded, tmp_path / "fp32", batch_size=4, max_steps=2, precision="fp32")
    t16, _, l16 = _train(tiny, encoded, tmp_path / "bf16", batch_size=4, max_steps=2, precision="bf16")
    assert t16.args.bf16 and not t32.args.bf16
    # the first step's loss is the forward pass before any update: bf16 autocast is close to fp32
    assert l16[0] == pytest.approx(l32[0], rel=0.01) and l16[0] != l32[0]


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_update(tiny, encoded, tmp_path):
    import torch

    t_gc, gc, _ = _train(tiny, encoded, tmp_path / "gc", batch_size=4, max_steps=2, gradient_checkpointing=True)
    _, plain, _ = _train(tiny, encoded, tmp_path / "plain", batch_size=4, max_steps=2)
    assert t_gc.model.base_model.model.is_gradient_checkpointing
    for name in plain:
        torch.testing.assert_close(gc[name], plain[name], rtol=1e-4, atol=1e-6)


def test_label_positions_are_the_positions_before_a_label():
    import torch

    from finetune.sft import label_positions

    labels = torch.tensor([[-100, -100, 5, 6, -100, -100], [-100, 7, -100, -100, -100, -100]])
    keep, shift = label_positions(labels)
    # row 0 predicts 5 at position 1 and 6 at 2; row 1 predicts 7 at 0; positions 3..5 predict nothing
    assert keep.tolist() == [0, 1, 2]
    assert shift.tolist() == [[-100, 5, 6], [7, -100, -100]]


@pytest.mark.slow
def test_label_logits_only_gives_the_same_update_with_fewer_logits(tiny, encoded, tmp_path):
    import torch

    seen: dict[bool, list[int]] = {True: [], False: []}  # positions the output layer ran at, per forward

    def run(flag: bool):
        lengths = []  # the batch's sequence length, per forward

        def before(trainer):
            trainer.model.get_base_model().lm_head.register_forward_hook(
                lambda m, i, o: seen[flag].append(o.shape[1]))
            orig = trainer.compute_loss

            def spy(model, inputs, **kw):
                lengths.append(inputs["input_ids"].shape[1])
                return orig(model, inputs, **kw)

            trainer.compute_loss = spy

        trainer, params, _ = _train(tiny, encoded, tmp_path / str(flag), float64=True, before=before,
                                    batch_size=4, max_steps=2, optim="sgd", learning_rate=0.5, eval_steps=2,
                                    label_logits_only=flag)
        # the training losses, then the validation loss of step 2 (prediction_step: return_outputs=True)
        losses = [h[k] for h in trainer.state.log_history for k in ("loss", "eval_loss") if k in h]
        assert len(losses) == 3
        return params, losses, lengths

    few, few_loss, few_lengths = run(True)
    full, full_loss, full_lengths = run(False)
    few_lengths, full_lengths = few_lengths[:2], full_lengths[:2]  # the two training steps (then evaluation)
    seen[True], seen[False] = seen[True][:2], seen[False][:2]
    # every forward of the full run computes logits at every position; the label-only run at fewer
    assert seen[False] == full_lengths and few_lengths == full_lengths
    assert len(seen[True]) == len(few_lengths) and all(k < n for k, n in zip(seen[True], few_lengths))
    assert sum(float(p.abs().sum()) for n, p in full.items() if "lora_B" in n) > 1e-3
    for name in full:
        torch.testing.assert_close(few[name], full[name], rtol=1e-9, atol=1e-12)
    assert few_loss == pytest.approx(full_loss, rel=1e-4)


def test_early_stopping_stops_when_validation_loss_stalls(tiny, encoded, tmp_path):
    # an improvement must exceed 10 nats to count, so the second evaluation already stalls
    trainer, _, _ = _train(tiny, encoded, tmp_path, batch_size=4, max_steps=20, eval_steps=1,
                           early_stopping_patience=1, early_stopping_threshold=10.0)
    assert trainer.state.global_step == 2
    assert sum("eval_loss" in h for h in trainer.state.log_history) == 2


@pytest.mark.slow
def test_train_writes_the_adapter_folder_and_resumes(tiny, tmp_path):
    out = tmp_path / "adapters" / "toy"
    cfg = {"base_model": tiny, "batch_size": 4, "eval_steps": 2, "save_steps": 2, "max_length": 128,
           "eval_replies": 3, "eval_max_new_tokens": 4, "keep_checkpoints": True, "logging_steps": 1}
    first = train_sft(toy_dialogues(30), out, SFTConfig(max_steps=2, **cfg), progress=False)
    assert first.manifest["training"]["global_step"] == 2
    res = train_sft(toy_dialogues(30), out, SFTConfig(max_steps=4, **cfg), progress=False)
    m = res.manifest
    assert m["training"]["resumed_from"].endswith("checkpoint-2") and m["training"]["global_step"] == 4
    for f in ("adapter_model.safetensors", "adapter_config.json", "adapter.json", "splits.json", "test.jsonl",
              "validation.jsonl"):
        assert (out / f).is_file(), f
    assert json.loads((out / "adapter.json").read_text())["version"] == m["version"]
    assert m["version"].startswith("toy-") and m["kind"] == "peft-lora"
    assert m["base_model"] == {"id": tiny, "path": tiny, "sha256": model_fingerprint(tiny)}
    assert m["data"]["splits"]["counts"] == {"train": 24, "validation": 3, "test": 3}
    assert m["training"]["lora_r"] == 16 and m["training"]["precision_resolved"] in ("fp32", "bf16")
    for key in ("val_loss", "perplexity", "rouge_l", "self_stop_rate"):
        assert m["metrics"][key] is not None and m["base_metrics"][key] is not None
    assert m["metrics"]["perplexity"] == pytest.approx(2.718281828 ** m["metrics"]["val_loss"], rel=1e-6)
    assert m["metrics"]["test_n"] == 3 and m["metrics"]["val_loss"] < m["base_metrics"]["val_loss"]


@pytest.mark.slow
def test_init_adapter_starts_from_its_weights_and_keeps_its_shape(tiny, tmp_path, chat_model_path):
    import torch
    from safetensors.torch import load_file

    cfg = {"base_model": tiny, "batch_size": 4, "max_length": 128, "eval_replies": 0, "eval_steps": 0}
    first = train_sft(toy_dialogues(30), tmp_path / "first", SFTConfig(max_steps=3, lora_r=4, lora_alpha=8, **cfg),
                      progress=False)
    saved = load_file(str(tmp_path / "first" / "adapter_model.safetensors"))

    # the model it builds holds the saved LoRA weights (B is not the fresh all-zero init), trainable, rank 4
    config, source = init_adapter_config(SFTConfig(init_adapter=str(tmp_path / "first"), **cfg), tiny)
    assert (config.lora_r, config.lora_alpha) == (4, 8)
    assert source["weights_sha256"] == first.manifest["weights_sha256"] and source["name"] == "first"
    model = load_model(tiny, config)
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) and all(p.requires_grad for p in loaded.values())
    for name, tensor in saved.items():
        key = next(n for n in loaded if n.replace(".default", "").endswith(name.split("base_model.model.")[-1]))
        assert torch.equal(loaded[key].detach(), tensor.to(loaded[key].dtype)), key
    assert any(float(t.abs().sum()) > 0 for n, t in saved.items() if "lora_B" in n)

    # continued training: same rank whatever lora_r says, provenance recorded, starts where the first run ended
    res = train_sft(toy_dialogues(30), tmp_path / "second",
                    SFTConfig(max_steps=2, lora_r=16, init_adapter=str(tmp_path / "first"), **cfg), progress=False)
    m = res.manifest
    assert m["training"]["lora_r"] == 4 and m["training"]["init_adapter"]["version"] == first.manifest["version"]
    assert json.loads((tmp_path / "second" / "adapter_config.json").read_text())["r"] == 4
    assert m["base_metrics"]["val_loss"] == pytest.approx(first.manifest["base_metrics"]["val_loss"], rel=1e-5)
    assert m["metrics"]["val_loss"] < first.manifest["base_metrics"]["val_loss"]

    # another base model's weights, or full fine-tuning, are refused before training
    other = tiny_llama(tmp_path / "other", chat_model_path, seed=1)
    with pytest.raises(ConfigError, match="was trained on base weights"):
        init_adapter_config(SFTConfig(init_adapter=str(tmp_path / "first"), base_model=other), other)
    with pytest.raises(ConfigError, match="not a LoRA adapter folder"):
        init_adapter_config(SFTConfig(init_adapter=str(tmp_path)), tiny)
    with pytest.raises(ConfigError, match="method must be 'lora'"):
        SFTConfig(method="full", init_adapter=str(tmp_path / "first"))


def test_left_padded_batch_gives_the_same_greedy_tokens_as_alone(tiny):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.evaluate import greedy_generate

    tok = load_tokenizer(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    short = [{"role": "user", "content": "Hi"}]
    long = [{"role": "user", "content": "I ordered a blue jacket two weeks ago and it has still not arrived, "
                                        "the tracking page says label created. What should I do?"}]
    both = greedy_generate(model, tok, [short, long], max_new_tokens=12, batch_size=2)
    alone = [greedy_generate(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in (short, long)]
    assert [g.token_ids for g in both] == [g.token_ids for g in alone]
    assert len(both[0].token_ids) > 0


def test_sft_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="grad_accum has a bad value: got 0"):
        SFTConfig(grad_accum=0)
    with pytest.raises(ConfigError, match=r"save_steps must be a multiple of eval_steps \(50\), got 30"):
        SFTConfig(save_steps=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_agree(tiny, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "tests" / "finetune" / "ddp_worker.py"), tiny,
           str(tmp_path)]
    proc = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["trainer_world_size"] == 2
    assert r0["global_step"] == r1["global_step"] == 3
    assert r0["sha256"] == r1["sha256"]  # both replicas hold identical weights after all-reduced steps
    assert r0["lora_b_abs_sum"] > 0  # and they trained
    manifest = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert manifest["training"]["world_size"] == 2
