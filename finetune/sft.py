"""LoRA supervised fine-tuning of the chat model on support dialogues (Hugging Face ``Trainer`` + peft).

``train_sft(["bitext_customer_support"], "adapters/bitext", SFTConfig(...))`` loads the
dialogues (:mod:`finetune.data`), splits them by conversation with a fixed seed,
encodes them with the base model's chat template (loss on assistant tokens only),
wraps the base model in a peft LoRA adapter and trains it with the Trainer:

* progress bar and logged loss; validation loss every ``eval_steps`` steps; early
  stopping on it (``early_stopping_patience`` evaluations without improvement; the
  best checkpoint is restored at the end);
* checkpoints every ``save_steps`` in ``<out>/checkpoints``; a run started again
  with the same ``out`` resumes from the last one (``resume=True``);
* gradient accumulation (``grad_accum``; the loss is normalised by the number of
  labelled tokens across the accumulated micro-batches, so it equals the large
  batch's loss), mixed precision (``precision="auto"``: bf16 where the hardware has
  it, fp32 otherwise), gradient checkpointing, and data-parallel training when
  started by ``torchrun``/``accelerate launch`` (gloo on CPU, NCCL on GPUs).

At the end the adapter folder holds the PEFT weights (``adapter_model.safetensors``,
``adapter_config.json``), ``adapter.json`` (version, base model id and SHA-256,
training config, data sources with hashes, split counts, metrics of the adapter
and of the base model on the same splits), ``splits.json`` and the validation and
test dialogues (``validation.jsonl``, ``test.jsonl``), so any later evaluation
uses the same held-out conversations.

Multi-GPU and FSDP: see ``docs/finetuning.md``. In short, the same command under
``torchrun --nproc_per_node N -m chatbot.cli train ...`` (or ``accelerate launch``)
runs DDP; FSDP is a Trainer setting (``fsdp="full_shard auto_wrap"``) passed
through ``SFTConfig.fsdp``.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from chatbot.errors import ConfigError, TooLittleDataError
from finetune.adapters.registry import ADAPTER_FORMAT, MANIFEST, adapter_version
from finetune.base_model import EMBEDDED_CHAT_MODEL, load_causal_lm, load_tokenizer, resolve_base_model
from finetune.data import (
    IGNORE_INDEX,
    DataCollator,
    Dialogue,
    EncodeStats,
    Splits,
    encode_dialogues,
    load_dialogues,
    reference_splits,
    split_dialogues,
)
from chatbot.hashing import files_sha256, model_fingerprint

log = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    """Settings of one fine-tuning run (saved in the adapter's ``adapter.json``).

    Attributes:
        base_model: ``embedded:smollm2-135m-instruct`` (default), a local folder or HF id.
        method: ``lora`` (peft adapter) or ``full`` (all weights; for comparison benchmarks).
        lora_r, lora_alpha, lora_dropout: LoRA rank, scale numerator (scale = alpha / r), dropout.
        target_modules: modules that get LoRA (``"all-linear"``: every linear layer but the output head).
        max_length: most tokens per sample; longer ones follow ``truncation``.
        truncation: ``turns`` (keep the complete turns that fit) or ``drop`` (see finetune.data).
        epochs: passes over the training split (ignored when ``max_steps`` > 0).
        max_steps: optimizer steps to run (-1: use ``epochs``, raised to ``min_steps``).
        min_steps: least optimizer steps when ``max_steps`` is -1: when ``epochs`` passes over a small training
            split would give fewer, the run takes ``min_steps`` steps (more passes) instead, so a handful of
            conversations is learned from rather than touched once.
        min_examples: fewer training dialogues than this (after encoding) is refused with
            :class:`~chatbot.errors.TooLittleDataError`.
        small_data_threshold: with fewer dialogues than this, none is held out: all train, and the validation and
            test scores are taken on the fixed reference set ``reference_data`` (0: always split).
        reference_data: folder with ``validation.jsonl`` and ``test.jsonl`` (None: ``data/eval/sft_reference``).
        batch_size: samples per device per micro-batch.
        grad_accum: micro-batches per optimizer step (effective batch = batch_size * grad_accum * processes).
        learning_rate, weight_decay, warmup_ratio, lr_scheduler, optim, max_grad_norm: optimiser settings.
            The warm-up takes ``floor(warmup_ratio * steps)`` steps (none in short runs) and its first step
            already has a non-zero rate (see :func:`no_zero_warmup`).
        eval_steps: evaluate the validation loss every N optimizer steps (0: only at the end).
        save_steps: checkpoint every N steps (default: ``eval_steps``; must be a multiple of it).
        logging_steps: log the training loss every N steps.
        early_stopping_patience: stop after N evaluations without improvement (0: never).
        early_stopping_threshold: an improvement smaller than this does not count.
        precision: ``auto`` (bf16 where supported, fp32 otherwise), ``bf16`` or ``fp32``.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        seed: seed of the split, the data order and the LoRA initialisation.
        validation, test: split fractions (by conversation).
        max_eval_samples: validation samples scored (during training and at the end; None: all).
        eval_replies: test dialogues whose replies are generated and scored at the end (0: none).
        eval_max_new_tokens: generation budget of those replies.
        eval_batch_size: batch of the reply generation (left padding) and of the final loss.
        eval_repetition_penalty: 1.0 = plain greedy.
        system_prompt: system message for dialogues that have none (None: the template's default).
        threads: torch CPU threads (None: torch's default).
        keep_checkpoints: keep ``<out>/checkpoints`` after a finished run.
        fsdp: Trainer FSDP option string (multi-GPU only), e.g. ``"full_shard auto_wrap"``.
        label_logits_only: compute the output layer only at the positions whose next token is a label
            (:func:`label_positions`); the loss is the same, the logits shrink from every token of the batch to
            its reply tokens (1,024-token grounded prompts, batch 4, CPU: peak memory 8.5 -> 7.3 GiB,
            ``bench/finetune.py``). Off under ``nn.DataParallel`` (several GPUs without a launcher) and with a
            label smoother or custom loss, which read the logits against the full labels.
        init_adapter: a LoRA adapter folder (``adapter.json`` + peft files) whose weights the run starts from
            instead of a fresh LoRA initialisation: continued training of an adapter on new data (an operator's
            reviewed transcripts on top of the shipped grounded adapter). Its LoRA rank, alpha, dropout and target
            modules replace ``lora_*`` / ``target_modules`` (see :func:`init_adapter_config`); it must have been
            trained on the same base model weights (fingerprint check, when its ``adapter.json`` names them; a
            plain peft folder is not checked). LoRA only.
    """

    base_model: str = EMBEDDED_CHAT_MODEL
    method: Literal["lora", "full"] = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    max_length: int = 512
    truncation: Literal["turns", "drop"] = "turns"
    epochs: float = 1.0
    max_steps: int = -1
    min_steps: int = 20
    min_examples: int = 3
    small_data_threshold: int = 20
    reference_data: str | None = None
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    optim: str = "adamw_torch"
    max_grad_norm: float = 1.0
    eval_steps: int = 50
    save_steps: int | None = None
    logging_steps: int = 10
    early_stopping_patience: int = 3
    early_stopping_threshold: float = 0.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    validation: float = 0.1
    test: float = 0.1
    max_eval_samples: int | None = 200
    eval_replies: int = 100
    eval_max_new_tokens: int = 256
    eval_batch_size: int = 8
    eval_repetition_penalty: float = 1.0
    system_prompt: str | None = None
    threads: int | None = None
    keep_checkpoints: bool = False
    fsdp: str = ""
    label_logits_only: bool = True
    init_adapter: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            ("method", self.method in ("lora", "full")),
            ("lora_r", self.lora_r >= 1),
            ("lora_alpha", self.lora_alpha >= 1),
            ("lora_dropout", 0.0 <= self.lora_dropout < 1.0),
            ("max_length", self.max_length >= 16),
            ("truncation", self.truncation in ("turns", "drop")),
            ("epochs", self.epochs > 0),
            ("min_steps", self.min_steps >= 1),
            ("min_examples", self.min_examples >= 1),
            ("small_data_threshold", self.small_data_threshold >= 0),
            ("batch_size", self.batch_size >= 1),
            ("grad_accum", self.grad_accum >= 1),
            ("learning_rate", self.learning_rate > 0),
            ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0),
            ("eval_steps", self.eval_steps >= 0),
            ("logging_steps", self.logging_steps >= 1),
            ("early_stopping_patience", self.early_stopping_patience >= 0),
            ("precision", self.precision in ("auto", "bf16", "fp32")),
            ("eval_replies", self.eval_replies >= 0),
            ("eval_max_new_tokens", self.eval_max_new_tokens >= 1),
            ("eval_batch_size", self.eval_batch_size >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"{name} has a bad value: got {getattr(self, name)!r}")
        if self.save_steps is not None and self.eval_steps and self.save_steps % self.eval_steps:
            raise ConfigError(f"save_steps must be a multiple of eval_steps ({self.eval_steps}), got {self.save_steps}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.init_adapter is not None and self.method != "lora":
            raise ConfigError("init_adapter continues a LoRA adapter: method must be 'lora'")

    def as_dict(self) -> dict:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)


@dataclass
class TrainResult:
    """What :func:`train_sft` produced (on every process; only rank 0 writes files and metrics)."""

    out_dir: Path
    manifest: dict | None
    trainer: object
    model: object
    tokenizer: object
    splits: Splits
    is_main_process: bool


# --------------------------------------------------------------------------- precision and devices


def bf16_supported() -> bool:
    """True when this machine runs bf16 natively: a CUDA GPU with bf16, or a CPU with AMX-BF16 / AVX512-BF16."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` where :func:`bf16_supported`, else ``fp32``; ``bf16`` / ``fp32`` unchanged.

    Forcing ``bf16`` on hardware without it works (autocast emulates it) but is slow; a warning says so.

    Raises:
        ConfigError: not one of ``auto``, ``bf16``, ``fp32``.
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    if precision == "bf16" and not bf16_supported():
        log.warning("precision bf16 requested but this hardware has no native bf16: it will be emulated (slow)")
    return precision


def world_info() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (``torchrun`` / ``accelerate launch``); (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# --------------------------------------------------------------------------- model and data


def load_model(path: str, config: SFTConfig):
    """The base model (fp32 weights; mixed precision is autocast) wrapped for ``config.method``.

    With ``config.init_adapter`` the LoRA weights are that adapter's, trainable (call :func:`init_adapter_config`
    first: it checks the base weights and sets the matching ``lora_*`` fields).

    Returns:
        A ``PeftModel`` (LoRA: only the adapter trains) or the plain model (full fine-tuning).

    Raises:
        ModelAssetError: the checkpoint cannot be loaded. ConfigError: ``init_adapter`` does not load on it.
    """
    model = load_causal_lm(path)
    if config.method == "full":
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if config.init_adapter is not None:  # its shape; the base-weights check is init_adapter_config's
        try:
            return PeftModel.from_pretrained(model, config.init_adapter, is_trainable=True)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ConfigError(f"init_adapter {config.init_adapter} does not load on {path}: {exc}") from exc

    lora = LoraConfig(
        task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.target_modules, bias="none",
    )
    return get_peft_model(model, lora)


def init_adapter_config(config: SFTConfig, base_path: str) -> tuple[SFTConfig, dict | None]:
    """``config`` with the LoRA settings of ``config.init_adapter`` (rank, alpha, dropout, target modules: the
    weights only fit that shape), and the provenance of the starting adapter (``{"path", "name", "version",
    "weights_sha256", "base_model_sha256"}``; ``None`` without ``init_adapter``).

    Raises:
        ConfigError: the folder is not a LoRA adapter (no ``adapter_config.json``), or it was trained on other
            base model weights than ``base_path`` (:func:`chatbot.hashing.model_fingerprint` differs from its
            ``adapter.json`` ``base_model.sha256``).
    """
    if config.init_adapter is None:
        return config, None
    folder = Path(config.init_adapter)
    try:
        peft_cfg = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"init_adapter {folder}: not a LoRA adapter folder ({exc})") from exc
    try:
        manifest = json.loads((folder / "adapter.json").read_text())
    except (OSError, ValueError):
        manifest = {}
    want = (manifest.get("base_model") or {}).get("sha256")
    have = model_fingerprint(base_path)
    if want and want != have:
        raise ConfigError(f"init_adapter {folder} was trained on base weights {want[:12]}..., not on {base_path} "
                          f"({have[:12]}...)")
    targets = peft_cfg.get("target_modules") or config.target_modules
    if isinstance(targets, (list, tuple, set)):
        targets = sorted(targets)
    updated = replace(config, lora_r=int(peft_cfg.get("r", config.lora_r)),
                      lora_alpha=int(peft_cfg.get("lora_alpha", config.lora_alpha)),
                      lora_dropout=float(peft_cfg.get("lora_dropout", config.lora_dropout)),
                      target_modules=targets)
    source = {"path": str(folder), "name": manifest.get("name"), "version": manifest.get("version"),
              "weights_sha256": manifest.get("weights_sha256") or _weights_sha256(folder),
              "base_model_sha256": want}
    return updated, source


@dataclass
class PreparedData:
    """Dialogues, their split and the encoded train / validation samples."""

    dialogues: list[Dialogue]
    sources: list[dict]
    splits: Splits
    train: list[dict]
    validation: list[dict]
    stats: dict[str, EncodeStats]


def prepare_data(data: list[str | Path] | list[Dialogue], tokenizer, config: SFTConfig) -> PreparedData:
    """Load (from specs) or take dialogues, split them by conversation and encode train and validation.

    With fewer dialogues than ``config.small_data_threshold`` none is held out: all train, and validation and
    test come from the fixed reference set (:func:`finetune.data.reference_splits`).

    Raises:
        TooLittleDataError: fewer than ``config.min_examples`` dialogues (before or after encoding), or no
            assistant token to learn from.
        DataError: bad data.
    """
    if data and isinstance(data[0], Dialogue):
        dialogues, sources = list(data), [{"spec": "in-memory", "dialogues": len(data)}]  # type: ignore[arg-type]
        if config.system_prompt:
            for d in dialogues:
                if d.messages[0]["role"] != "system":
                    d.messages.insert(0, {"role": "system", "content": config.system_prompt})
    else:
        dialogues, sources = load_dialogues([str(s) for s in data], config.system_prompt)
    n = len(dialogues)
    if n < config.min_examples:
        raise TooLittleDataError(f"too little data to learn from: {n} dialogue(s), at least min_examples="
                                 f"{config.min_examples} are needed", n, config.min_examples)
    if n < config.small_data_threshold:
        splits = reference_splits(dialogues, config.reference_data, config.system_prompt, config.seed,
                                  f"{n} dialogues < small_data_threshold {config.small_data_threshold}: all train")
    else:
        splits = split_dialogues(dialogues, config.validation, config.test, config.seed)
    train, st_train = encode_dialogues(tokenizer, splits.train, config.max_length, config.truncation)
    val, st_val = encode_dialogues(tokenizer, splits.validation, config.max_length, config.truncation)
    if len(train) < config.min_examples or not st_train.label_tokens:
        raise TooLittleDataError(
            f"too little data to learn from: {len(train)} of {st_train.dialogues} training dialogue(s) fit "
            f"max_length {config.max_length} with {st_train.label_tokens} assistant token(s); at least "
            f"min_examples={config.min_examples} dialogues with assistant tokens are needed", len(train),
            config.min_examples)
    return PreparedData(dialogues, sources, splits, train, val, {"train": st_train, "validation": st_val})


def plan_steps(n_train: int, config: SFTConfig, world_size: int = 1) -> dict:
    """How many optimizer steps a run of ``n_train`` training samples takes, and its warm-up.

    ``steps_per_epoch = ceil(ceil(ceil(n_train / world_size) / batch_size) / grad_accum)`` (the Trainer's
    count); with ``max_steps`` -1 the run takes ``ceil(epochs * steps_per_epoch)`` steps, raised to
    ``min_steps``; warm-up is ``floor(warmup_ratio * steps)`` steps (none when that is 0).

    Returns:
        ``{"steps_per_epoch", "epoch_steps", "steps", "epochs", "raised_to_min_steps", "warmup_steps"}``;
        ``epochs`` is the number of passes over the training split the steps make.
    """
    per_process = math.ceil(n_train / max(1, world_size))
    spe = max(1, math.ceil(math.ceil(per_process / config.batch_size) / config.grad_accum))
    epoch_steps = max(1, math.ceil(config.epochs * spe))
    if config.max_steps > 0:
        steps, raised = config.max_steps, False
    else:
        steps, raised = max(epoch_steps, config.min_steps), epoch_steps < config.min_steps
    return {"steps_per_epoch": spe, "epoch_steps": epoch_steps, "steps": steps, "epochs": steps / spe,
            "raised_to_min_steps": raised, "warmup_steps": int(config.warmup_ratio * steps)}


def no_zero_warmup(scheduler, warmup_steps: int):
    """Shift a linear warm-up so its first step is not at learning rate 0.

    Transformers' schedules (``get_scheduler``: linear, cosine, ...) warm up with factor
    ``step / warmup_steps``, so optimizer step 0 runs at learning rate 0: a one-step run changes nothing and
    a LoRA adapter's B matrices stay exactly zero. Here the warm-up factor is ``(step + 1) / (warmup_steps + 1)``
    (the last warm-up step reaches ``warmup_steps / (warmup_steps + 1)``, the step after it 1.0); after the
    warm-up the schedule is unchanged (its decay ends above 0 on the last step).

    Args:
        scheduler: a ``torch.optim.lr_scheduler.LambdaLR`` from ``transformers.get_scheduler`` (other kinds are
            returned as they are).
        warmup_steps: the warm-up it was built with.

    Returns:
        A new ``LambdaLR`` on the same optimizer (or ``scheduler`` when there is no warm-up).
    """
    from torch.optim.lr_scheduler import LambdaLR

    if warmup_steps <= 0 or not isinstance(scheduler, LambdaLR):
        return scheduler

    def wrap(f):
        return lambda step: (step + 1) / (warmup_steps + 1) if step < warmup_steps else f(step)

    return LambdaLR(scheduler.optimizer, [wrap(f) for f in scheduler.lr_lambdas])


def label_positions(labels):
    """Positions whose logits a causal-LM loss reads: where the next token of some row is a label.

    Args:
        labels: ``(batch, length)`` token ids, ``IGNORE_INDEX`` where no loss is taken.

    Returns:
        ``(keep, shift_labels)``: ``keep`` the sorted positions (1-D long tensor, ``(k,)``), ``shift_labels`` the
        next-token targets at them (``(batch, k)``, ``IGNORE_INDEX`` where that row has none). With
        ``logits_to_keep=keep`` and ``shift_labels`` the model's loss equals the loss over all positions, since
        every other position's target is ``IGNORE_INDEX``.
    """
    import torch.nn.functional as F

    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    keep = (shifted != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    return keep, shifted[:, keep].contiguous()


def label_position_inputs(inputs: dict) -> dict:
    """``inputs`` (a collated batch with ``labels``) plus ``logits_to_keep`` and ``shift_labels`` from
    :func:`label_positions`, so the model runs its output layer only there; unchanged when no label is set."""
    keep, shift_labels = label_positions(inputs["labels"])
    return {**inputs, "logits_to_keep": keep, "shift_labels": shift_labels} if keep.numel() else inputs


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def _takes_logits_to_keep(model) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_takes_logits_to_keep(type(inner))


def _sft_trainer_class():
    """``transformers.Trainer`` with :func:`no_zero_warmup`, warm-up steps from :func:`plan_steps` and, with
    ``label_logits_only``, the output layer run only at :func:`label_positions`."""
    from transformers import Trainer, get_scheduler

    class SFTTrainer(Trainer):
        warmup_ratio: float = 0.0
        warmup_steps: int = 0
        label_logits_only: bool = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            labels = inputs.get("labels")
            # DataParallel would split the position list across replicas; a label smoother or a custom loss
            # scores the returned logits against the full labels
            plain = not isinstance(model, torch.nn.DataParallel) and self.label_smoother is None \
                and self.compute_loss_func is None
            if self.label_logits_only and plain and labels is not None and _takes_logits_to_keep(
                    self.accelerator.unwrap_model(model)):
                inputs = label_position_inputs(inputs)
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                self.warmup_steps = int(self.warmup_ratio * num_training_steps)
                sched = get_scheduler(self.args.lr_scheduler_type, optimizer=optimizer or self.optimizer,
                                      num_warmup_steps=self.warmup_steps, num_training_steps=num_training_steps,
                                      scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
                self.lr_scheduler = no_zero_warmup(sched, self.warmup_steps)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return SFTTrainer


def _step_lr_callback():
    """A callback that records the learning rate each optimizer step ran with (``.lrs``)."""
    from transformers import TrainerCallback

    class StepLearningRates(TrainerCallback):
        def __init__(self) -> None:
            self.lrs: list[float] = []

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:
                self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    return StepLearningRates()


def step_learning_rates(trainer) -> list[float]:
    """The learning rate of every optimizer step ``trainer`` ran (built by :func:`build_trainer`)."""
    for cb in trainer.callback_handler.callbacks:
        if hasattr(cb, "lrs"):
            return list(cb.lrs)
    return []


class _ListDataset:
    """A list of samples as a map-style dataset."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = self.rows[i]
        return {"input_ids": r["input_ids"], "labels": r["labels"]}


def build_trainer(model, tokenizer, train: list[dict], validation: list[dict], config: SFTConfig,
                  output_dir: str | Path, progress: bool = True, callbacks: list | None = None):
    """A Hugging Face ``Trainer`` for causal-LM SFT with this config.

    Validation loss every ``eval_steps`` with early stopping and best-checkpoint
    restore (when there is a validation set and ``eval_steps`` > 0), checkpoints
    every ``save_steps``, the step count of :func:`plan_steps` (``min_steps``), a warm-up
    without a step at learning rate 0 (:func:`no_zero_warmup`; the rate of every step is
    recorded, :func:`step_learning_rates`), gradient accumulation, bf16 autocast per
    :func:`resolve_precision`, gradient checkpointing (non-reentrant), gloo as the
    process-group backend on CPU (NCCL on GPUs), FSDP when ``config.fsdp`` is set.

    Returns:
        ``transformers.Trainer`` (not started).
    """
    import torch
    from transformers import EarlyStoppingCallback, TrainingArguments

    precision = resolve_precision(config.precision)
    cuda = torch.cuda.is_available()
    has_val = bool(validation) and config.eval_steps > 0
    val_rows = validation[: config.max_eval_samples] if config.max_eval_samples else validation
    save_steps = config.save_steps or (config.eval_steps if config.eval_steps else 500)
    plan = plan_steps(len(train), config, world_info()[1])
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=plan["steps"] if plan["raised_to_min_steps"] else config.max_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=0,  # the warm-up is SFTTrainer's (no step at rate 0), from config.warmup_ratio
        lr_scheduler_type=config.lr_scheduler,
        optim=config.optim,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if has_val else "no",
        eval_steps=config.eval_steps if has_val else None,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss" if has_val else None,
        greater_is_better=False if has_val else None,
        bf16=precision == "bf16",
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and world_info()[1] > 1 else None,
        ddp_find_unused_parameters=False,
        fsdp=config.fsdp or None,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        label_names=["labels"],
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cbs = [*(callbacks or []), _step_lr_callback()]
    if has_val and config.early_stopping_patience > 0:
        cbs.append(EarlyStoppingCallback(config.early_stopping_patience, config.early_stopping_threshold))
    trainer = _sft_trainer_class()(
        model=model,
        args=args,
        data_collator=DataCollator(pad),
        train_dataset=_ListDataset(train),
        eval_dataset=_ListDataset(val_rows) if has_val else None,
        processing_class=tokenizer,
        callbacks=cbs,
    )
    trainer.warmup_ratio = config.warmup_ratio
    trainer.label_logits_only = config.label_logits_only
    return trainer


# --------------------------------------------------------------------------- the run


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _weights_sha256(folder: Path) -> str:
    return files_sha256(sorted(folder.glob("*.safetensors")))


def train_sft(data: list[str | Path] | list[Dialogue], out_dir: str | Path, config: SFTConfig | None = None,
              resume: bool = True, progress: bool = True, cache_dir: Path | None = None,
              name: str | None = None) -> TrainResult:
    """Fine-tune the base model on dialogues; write the adapter folder (rank 0).

    Args:
        data: shared-set names / JSONL paths (see :func:`finetune.data.load_dialogues`) or dialogues.
        out_dir: the adapter folder (created; checkpoints in ``out_dir/checkpoints``).
        config: run settings (default :class:`SFTConfig`).
        resume: continue from the last checkpoint in ``out_dir/checkpoints`` when there is one.
        progress: tqdm progress bars.
        cache_dir: where the embedded base model is converted (needed when ``base_model`` is the embedded one).
        name: adapter name (default: the folder name).

    Returns:
        :class:`TrainResult`; ``manifest`` is the written ``adapter.json`` (None on other ranks).

    Raises:
        DataError: bad data. ConfigError: bad config. ModelAssetError: the base model cannot be loaded.
    """
    import torch
    import transformers

    config = config or SFTConfig()
    out = Path(out_dir)
    rank, world = world_info()
    if config.threads:
        torch.set_num_threads(config.threads)
    transformers.set_seed(config.seed)
    base_path = resolve_base_model(config.base_model, cache_dir)
    config, init_source = init_adapter_config(config, base_path)
    tok = load_tokenizer(base_path)
    prepared = prepare_data(data, tok, config)
    model = load_model(base_path, config)
    if config.method == "lora" and rank == 0:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log.info("LoRA r=%d: %d trainable of %d parameters (%.2f%%)%s", config.lora_r, trainable, total,
                 100 * trainable / total, f", starting from {config.init_adapter}" if init_source else "")
    ckpt_dir = out / "checkpoints"
    small = prepared.splits.evaluation.get("kind") == "reference"
    # Few dialogues: the validation set is the general reference set, so no early stopping on it (it would stop
    # the run for drifting from general replies while it learns the reviewed ones); it is scored at the end.
    run_config = replace(config, eval_steps=0) if small else config
    plan = plan_steps(len(prepared.train), run_config, world)
    log.info("training on %d dialogue(s), evaluating on %d + %d (%s): %d optimizer step(s), %.1f epoch(s)%s",
             len(prepared.train), len(prepared.splits.validation), len(prepared.splits.test),
             prepared.splits.evaluation.get("kind"), plan["steps"], plan["epochs"],
             f" (raised to min_steps {config.min_steps})" if plan["raised_to_min_steps"] else "")
    trainer = build_trainer(model, tok, prepared.train, prepared.validation, run_config, ckpt_dir, progress)
    last = _last_checkpoint(ckpt_dir) if resume else None
    if last:
        log.info("resuming from %s", last)
    t0 = time.perf_counter()
    train_out = trainer.train(resume_from_checkpoint=last)
    train_secs = time.perf_counter() - t0
    model = trainer.model
    if hasattr(model, "module"):  # DDP wrapper
        model = model.module
    step_lrs = step_learning_rates(trainer)
    change = weight_change(model) if config.method == "lora" else None
    is_main = trainer.is_world_process_zero()
    if not is_main:
        return TrainResult(out, None, trainer, model, tok, prepared.splits, False)

    # --- evaluation of the result and of the base model on the same splits (rank 0)
    from finetune.evaluate import reply_quality, validation_loss

    def _scores() -> dict:
        val = validation_loss(model, tok, prepared.validation, batch_size=config.eval_batch_size,
                              max_samples=config.max_eval_samples)
        test = reply_quality(model, tok, prepared.splits.test, config.eval_max_new_tokens, config.eval_batch_size,
                             config.eval_replies, config.eval_repetition_penalty, progress) \
            if config.eval_replies else None
        return {"validation": val, "test": test}

    log.info("evaluating the fine-tuned model")
    metrics = _scores()
    base_metrics = None
    if config.method == "lora":
        log.info("evaluating the base model on the same splits")
        with model.disable_adapter():
            base_metrics = _scores()

    # --- write the folder
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    if config.method == "full":
        tok.save_pretrained(str(out))
    prepared.splits.save(out)
    created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    weights = _weights_sha256(out)
    adapter_name = name or out.name
    state = trainer.state
    train_tokens = sum(len(r["input_ids"]) for r in prepared.train)
    counts = prepared.splits.manifest()["counts"]
    run = {
        "examples": counts,
        "evaluation": prepared.splits.evaluation,
        "steps": state.global_step,
        "planned_steps": plan["steps"],
        "raised_to_min_steps": plan["raised_to_min_steps"],
        "min_steps": config.min_steps,
        "epochs": state.epoch,
        "learning_rate": config.learning_rate,
        "warmup_steps": getattr(trainer, "warmup_steps", 0),
        "step_learning_rate_min": min(step_lrs) if step_lrs else None,
        "step_learning_rate_max": max(step_lrs) if step_lrs else None,
        "train_seconds": round(train_secs, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "changes_model": None if change is None else change["changes_model"],
    }
    manifest = {
        "format": ADAPTER_FORMAT,
        "kind": "peft-lora" if config.method == "lora" else "full",
        "name": adapter_name,
        "version": adapter_version(adapter_name, created, weights),
        "created_at": created + "Z",
        "weights_sha256": weights,
        "base_model": {"id": config.base_model, "path": base_path, "sha256": model_fingerprint(base_path)},
        "training": {
            **config.as_dict(),
            "precision_resolved": resolve_precision(config.precision),
            "world_size": world,
            "global_step": state.global_step,
            "epochs_done": state.epoch,
            "best_checkpoint": state.best_model_checkpoint,
            "best_eval_loss": state.best_metric,
            "stopped_early": bool(state.max_steps and state.global_step < state.max_steps),
            "train_loss": train_out.training_loss,
            "train_seconds": train_secs,
            "resumed_from": last,
            "init_adapter": init_source,
            "plan": plan,
            "step_learning_rates": step_lrs[:1000],
            "weight_change": change,
            "log_history": state.log_history[-50:],
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": _version("peft")},
        },
        "data": {
            "sources": prepared.sources,
            "splits": {k: v for k, v in prepared.splits.manifest().items() if k != "ids"},
            "encoding": {k: v.as_dict() for k, v in prepared.stats.items()},
            "train_tokens": train_tokens,
        },
        "eval_config": {"max_new_tokens": config.eval_max_new_tokens, "replies": config.eval_replies,
                        "repetition_penalty": config.eval_repetition_penalty, "max_length": config.max_length,
                        "truncation": config.truncation, "val_samples": config.max_eval_samples,
                        "split_sha256": prepared.splits.manifest()["sha256"]},
        "run": run,
        "summary": "",
        "metrics": _flat_metrics(metrics),
        "base_metrics": _flat_metrics(base_metrics) if base_metrics else None,
        "details": {"adapter": metrics, "base": base_metrics},
    }
    manifest["summary"] = run_summary(manifest)
    if change is not None and not change["changes_model"]:
        log.warning("adapter %s leaves the model unchanged (every lora_B matrix is zero); it cannot be promoted",
                    manifest["version"])
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    if not config.keep_checkpoints and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    log.info("wrote %s (version %s): validation loss %.4f", out, manifest["version"],
             manifest["metrics"]["val_loss"] or math.nan)
    return TrainResult(out, manifest, trainer, model, tok, prepared.splits, True)


def weight_change(model) -> dict:
    """Whether a LoRA model's adapter changes its outputs: some ``lora_B`` matrix is non-zero.

    A LoRA update is ``B @ A`` with B initialised to zero, so an adapter whose B matrices are all zero (no
    optimizer step with a learning rate above 0) is the base model.

    Returns:
        ``{"lora_B_nonzero", "lora_B_total", "lora_B_max_abs", "changes_model"}``.
    """
    nonzero, total, peak = 0, 0, 0.0
    for name, p in model.named_parameters():
        if "lora_B" in name:
            total += 1
            m = float(p.detach().abs().max()) if p.numel() else 0.0
            nonzero += int(m > 0)
            peak = max(peak, m)
    return {"lora_B_nonzero": nonzero, "lora_B_total": total, "lora_B_max_abs": peak, "changes_model": nonzero > 0}


def run_summary(manifest: dict) -> str:
    """One plain paragraph of what a run did, from its ``adapter.json``: examples per split and where the
    evaluation came from, optimizer steps, epochs, learning rate and warm-up, time, and whether the adapter
    changes the model. Shown by ``chatbot train`` and the operator console."""
    run = manifest.get("run") or {}
    c = run.get("examples") or {}
    ev = run.get("evaluation") or {}
    if ev.get("kind") == "reference":
        where = (f"all {c.get('train')} conversation(s) used for training (fewer than small_data_threshold "
                 f"{manifest.get('training', {}).get('small_data_threshold')}); evaluated on the fixed reference set "
                 f"({c.get('validation')} validation, {c.get('test')} test dialogues)")
    else:
        where = (f"split {c.get('train')} train / {c.get('validation')} validation / {c.get('test')} test "
                 "conversation(s)")
    steps = f"{run.get('steps')} optimizer step(s)"
    if run.get("raised_to_min_steps"):
        steps += f" (raised to min_steps {run.get('min_steps')})"
    warm = f"{run.get('warmup_steps')} warm-up step(s)" if run.get("warmup_steps") else "no warm-up"
    lr_min = run.get("step_learning_rate_min")
    lrs = f"; step rates {lr_min:.2e} to {run.get('step_learning_rate_max'):.2e}" if lr_min is not None else ""
    epochs = run.get("epochs") or 0.0
    text = (f"{where}; {steps}, {epochs:.1f} epoch(s), learning rate {run.get('learning_rate'):g} ({warm}{lrs}); "
            f"{run.get('train_seconds', 0):.1f} s training, {run.get('total_seconds', 0):.1f} s with evaluation.")
    if run.get("changes_model") is False:
        text += " The adapter leaves the model unchanged (every lora_B matrix is zero): it cannot be promoted."
    elif run.get("changes_model"):
        w = (manifest.get("training") or {}).get("weight_change") or {}
        text += f" The adapter changes the model ({w.get('lora_B_nonzero')} of {w.get('lora_B_total')} lora_B " \
                "matrices non-zero)."
    return text


def _flat_metrics(m: dict | None) -> dict:
    """``{"val_loss", "perplexity", "rouge_l", "self_stop_rate", "test_n", "mean_new_tokens"}`` from scores."""
    if not m:
        return {}
    val, test = m.get("validation") or {}, m.get("test") or {}
    return {
        "val_loss": val.get("loss"),
        "perplexity": val.get("perplexity"),
        "rouge_l": test.get("rouge_l"),
        "self_stop_rate": test.get("self_stop_rate"),
        "test_n": test.get("n"),
        "mean_new_tokens": test.get("mean_new_tokens"),
    }


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None
