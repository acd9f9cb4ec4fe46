"""Evaluating an adapter (and its base model) on held-out dialogues: the numbers the gate compares.

An adapter folder keeps the validation and test dialogues it was trained beside (``validation.jsonl``,
``test.jsonl``), so every later evaluation uses the same conversations: validation loss and perplexity
(:func:`finetune.evaluate.validation_loss`), test ROUGE-L and self-stop rate of greedy replies
(:func:`finetune.evaluate.reply_quality`). Results are cached in the adapter's ``adapter.json`` under
``evals``, keyed by the dialogues and the evaluation settings (:func:`eval_key`).

torch / transformers / peft are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from chatbot.errors import AdapterError
from finetune.adapters.registry import AdapterOptions, AdapterRecord, now, resolve_adapter
from finetune.base_model import load_causal_lm, load_tokenizer, resolve_base_model
from finetune.data import Dialogue, dialogues_sha256, load_dialogues, load_jsonl
from finetune.evaluate import reply_quality, validation_loss

#: Metrics the gate compares: name -> (higher is better, :class:`AdapterOptions` field with the tolerance,
#: the service setting of that tolerance, named in refusals).
GATE_METRICS = {
    "val_loss": (False, "max_val_loss_increase", "adapter_gate_max_val_loss_increase"),
    "rouge_l": (True, "max_rouge_l_drop", "adapter_gate_max_rouge_l_drop"),
    "self_stop_rate": (True, "max_self_stop_drop", "adapter_gate_max_self_stop_drop"),
}


def load_split(rec: AdapterRecord, split: str) -> list[Dialogue]:
    """The adapter's saved ``validation`` or ``test`` dialogues ([] when the folder has none)."""
    path = rec.path / f"{split}.jsonl"
    return load_jsonl(path) if path.is_file() else []


def load_with_adapter(rec: AdapterRecord, options: AdapterOptions):
    """(PeftModel on the adapter's base model in float32, eval mode, tokenizer) for an adapter.

    Raises:
        AdapterError: peft cannot load the adapter on its base.
        ModelAssetError: the base model cannot be loaded.
    """
    from peft import PeftModel

    base = resolve_base_model(rec.base_id, options.cache_dir)
    tok = load_tokenizer(base)
    model = load_causal_lm(base)
    model.config.use_cache = True
    try:
        model = PeftModel.from_pretrained(model, str(rec.path))
    except Exception as exc:
        raise AdapterError(f"cannot load adapter {str(rec.path)!r}: {exc}") from exc
    model.eval()
    return model, tok


def metrics_on(model, tok, validation, test, eval_config: dict, max_samples: int | None = None) -> dict:
    """``{"val_loss", "perplexity", "rouge_l", "self_stop_rate", "test_n", "mean_new_tokens", "new_tokens_per_s"}``
    of ``model`` with the adapter's evaluation settings (``eval_config`` of its ``adapter.json``)."""
    val = validation_loss(model, tok, validation, eval_config.get("max_length"), eval_config.get("truncation", "turns"),
                          batch_size=8, max_samples=eval_config.get("val_samples"))
    n = max_samples if max_samples is not None else eval_config.get("replies", 100)
    test_m = reply_quality(model, tok, test, eval_config.get("max_new_tokens", 256), 8, n or None,
                           eval_config.get("repetition_penalty", 1.0)) if test and n else {}
    return {"val_loss": val["loss"], "perplexity": val["perplexity"], "rouge_l": test_m.get("rouge_l"),
            "self_stop_rate": test_m.get("self_stop_rate"), "test_n": test_m.get("n"),
            "mean_new_tokens": test_m.get("mean_new_tokens"), "new_tokens_per_s": test_m.get("new_tokens_per_s")}


def eval_key(validation, test, eval_config: dict, max_samples) -> str:
    """The cache key of an evaluation: the dialogues' hashes and the settings that change the numbers."""
    h = hashlib.sha256()
    h.update(dialogues_sha256(validation).encode())
    h.update(dialogues_sha256(test).encode())
    cfg = {k: eval_config.get(k) for k in ("max_new_tokens", "replies", "repetition_penalty", "max_length",
                                           "truncation", "val_samples")}
    h.update(json.dumps([cfg, max_samples], sort_keys=True).encode())
    return h.hexdigest()[:16]


def evaluate_adapter(ref: str | Path, options: AdapterOptions, data: list[str] | None = None,
                     max_samples: int | None = None, with_base: bool = True, write: bool = True) -> dict:
    """Validation loss, perplexity, test ROUGE-L and self-stop rate of an adapter (and of its base model).

    Args:
        ref: adapter name, folder or version.
        options: the registry (and the cache folder of the embedded base model).
        data: evaluate on these dialogues (specs as in :func:`finetune.data.load_dialogues`; all of them
            serve as both validation and test) instead of the adapter's saved splits.
        max_samples: replies to generate (default: as many as at training time).
        with_base: also evaluate the base model (adapter disabled) on the same dialogues.
        write: cache the result in the adapter's ``adapter.json`` under ``evals``.

    Returns:
        ``{"version", "key", "adapter": metrics, "base": metrics | None, "data": description}``.
    """
    rec = resolve_adapter(ref, options)
    if data:
        dialogues, sources = load_dialogues(data)
        validation = test = dialogues
        desc = {"sources": sources}
    else:
        validation, test = load_split(rec, "validation"), load_split(rec, "test")
        desc = {"splits": "the adapter's own validation and test splits"}
    model, tok = load_with_adapter(rec, options)
    res = {"version": rec.version, "key": eval_key(validation, test, rec.eval_config, max_samples), "data": desc}
    res["adapter"] = metrics_on(model, tok, validation, test, rec.eval_config, max_samples)
    res["base"] = None
    if with_base:
        with model.disable_adapter():
            res["base"] = metrics_on(model, tok, validation, test, rec.eval_config, max_samples)
    if write:
        rec.manifest.setdefault("evals", {})[res["key"]] = {**res, "at": now()}
        if not data and not any(rec.metrics.get(k) is not None for k in GATE_METRICS):
            # trained without metrics (e.g. no test split at the time): these become its gate metrics
            rec.manifest["metrics"] = res["adapter"]
            if res["base"]:
                rec.manifest["base_metrics"] = res["base"]
        rec.save_manifest()
    return res
