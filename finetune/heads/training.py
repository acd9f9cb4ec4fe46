"""Training a head: the base encoder with a fresh classification layer, optionally LoRA-wrapped, fine-tuned
with the Hugging Face ``Trainer``, and the provenance written beside it.

Fine-tuning is either full (``method="full"``) or with LoRA adapters through ``peft`` (``method="lora"``,
Hu et al. 2021; the classifier is trained in full). :func:`start` and :func:`finish` are the steps both
heads share (load the base, train, record ``head.json`` / ``training.json`` fields, save); what each head
learns from and how it calibrates stays in :mod:`finetune.heads.intent` and :mod:`finetune.heads.entity`.

torch / transformers / peft are imported inside the functions that need them.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from chatbot.errors import ConfigError, InvalidInputError, ModelAssetError
from finetune.heads.config import HeadConfig, resolve_base
from finetune.heads.folder import FORMAT_VERSION, quiet_transformers, weights_sha256
from finetune.intent_data import data_hash


def require_rows(splits, kind: str) -> None:
    """Refuse to train a ``kind`` head without training or validation rows.

    Raises:
        InvalidInputError: an empty split (both counts named).
    """
    if not splits.train or not splits.validation:
        raise InvalidInputError(
            f"{kind} training needs train and validation rows, got {len(splits.train)} and {len(splits.validation)}"
        )


def start(config: HeadConfig, auto_cls, labels: list[str], kind: str, fast_tokenizer: bool = False):
    """Seed torch, load the base encoder with a ``len(labels)``-way classification layer and its tokenizer,
    wrap it in LoRA for ``method="lora"``.

    Args:
        config: the training configuration (base model, method, LoRA settings, seed).
        auto_cls: the transformers auto class (sequence or token classification).
        labels: class names by id.
        kind: ``"intent"`` (sequence classification) or ``"entity"`` (token classification).
        fast_tokenizer: require a fast tokenizer (character offsets).

    Returns:
        ``(base path, tokenizer, model)``.

    Raises:
        ModelAssetError: the base model cannot be loaded.
        InvalidInputError: ``fast_tokenizer`` and the base has a slow one.
        ConfigError: a LoRA target is not a module of the base.
    """
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(config.seed)
    base = resolve_base(config.base_model)
    try:
        tok = AutoTokenizer.from_pretrained(base)
        with quiet_transformers():
            model = auto_cls.from_pretrained(
                base, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={y: i for i, y in enumerate(labels)}, dtype=torch.float32,
            )
    except (OSError, ValueError) as exc:
        raise ModelAssetError(f"cannot load base model {config.base_model!r} ({base}): {exc}") from exc
    if fast_tokenizer and not getattr(tok, "is_fast", False):
        raise InvalidInputError(f"the {kind} head needs a fast tokenizer (offsets); {base} has a slow one")
    if config.method == "lora":
        model = _wrap_lora(model, config, kind)
    return base, tok, model


def finish(head, config: HeadConfig, splits, base: str, meta: dict, data: dict, train_metrics: dict, t0: float,
           out_dir: str | Path | None):
    """Record a trained head's provenance and save it when ``out_dir`` is given; returns ``head``.

    ``head.meta`` (``head.json``) gets kind, format version, base model and, for LoRA, the base weights'
    sha256, method, then ``meta``; ``head.training`` (``training.json``) gets the config, the data (split name,
    sources, hash, counts, then ``data``), the Trainer's metrics, the wall time since ``t0``, the time and the
    library versions.
    """
    head.meta = {
        "kind": head.kind,
        "format_version": FORMAT_VERSION,
        "base_model": config.base_model,
        "base_sha256": weights_sha256(base) if config.method == "lora" else None,
        "method": config.method,
        **meta,
    }
    head.training = {
        "config": asdict(config),
        "data": {
            "name": splits.name,
            "sources": splits.sources,
            "hash": data_hash(splits.train, splits.validation),
            "n_train": len(splits.train),
            "n_validation": len(splits.validation),
            **data,
        },
        "trainer": train_metrics,
        "wall_seconds": round(time.time() - t0, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
    }
    if out_dir is not None:
        head.save(out_dir)
    return head


def _versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


class _ListDataset:
    """A list of feature dicts as a map-style dataset (the Trainer accepts any)."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def train_loop(model, tokenizer, train_items: list[dict], collator, config: HeadConfig, progress: bool) -> dict:
    """Run the Hugging Face Trainer; returns its train metrics (loss, runtime, steps)."""
    import torch
    from transformers import Trainer, TrainingArguments

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    with tempfile.TemporaryDirectory(prefix="head-train-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            num_train_epochs=config.epochs,
            max_steps=config.max_steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.lr,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup,
            lr_scheduler_type="linear",
            label_smoothing_factor=config.label_smoothing,
            logging_steps=50,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=not progress,
            seed=config.seed,
            data_seed=config.seed,
            dataloader_num_workers=0,
            use_cpu=not _cuda(),
            train_sampling_strategy="group_by_length",
            optim="adamw_torch",
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_ListDataset(train_items),
            data_collator=collator,
            processing_class=tokenizer,
        )
        out = trainer.train()
    return {k: float(v) for k, v in out.metrics.items() if isinstance(v, (int, float))} | {
        "global_step": int(out.global_step)
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _wrap_lora(model, config: HeadConfig, kind: str):
    from peft import LoraConfig, TaskType, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in config.lora_targets if t not in names]
    if missing:
        raise ConfigError(f"lora_targets {missing} are not module names of {config.base_model}")
    lcfg = LoraConfig(
        task_type=TaskType.SEQ_CLS if kind == "intent" else TaskType.TOKEN_CLS,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
    )
    return get_peft_model(model, lcfg)
