"""The intent head: sequence classification with calibrated confidence and an out-of-scope decision.

Scores are calibrated by temperature scaling on the validation split (Guo et al. 2017), and a message is
out-of-scope when the argmax is the out-of-scope class or the calibrated score is below the threshold
chosen on validation for a target in-scope accuracy (:mod:`finetune.calibration`). Training and the head
folder are shared with the entity head (:mod:`finetune.heads.training`, :mod:`finetune.heads.folder`).

torch / transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from chatbot.errors import ConfigError, InvalidInputError
from finetune.calibration import choose_threshold, expected_calibration_error, fit_temperature, nll, softmax
from finetune.heads.config import HeadConfig
from finetune.heads.evaluation import intent_report
from finetune.heads.folder import SavedHead
from finetune.heads.training import finish, require_rows, start, train_loop
from finetune.heads.types import IntentPrediction
from finetune.intent_data import IntentSplits, label_counts_warnings

log = logging.getLogger(__name__)


class IntentHead(SavedHead):
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
        from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

        config = config or HeadConfig()
        require_rows(splits, "intent")
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

        base, tok, model = start(config, AutoModelForSequenceClassification, labels, "intent")
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
        train_metrics = train_loop(model, tok, items, DataCollatorWithPadding(tok), config, progress)

        head = cls(model, tok, labels, 1.0, 0.0, splits.oos_label, config.max_length)
        val_texts = [t for t, _ in splits.validation]
        val_y = np.array([label2id[y] for _, y in splits.validation])
        logits = head.logits(val_texts, progress=progress)
        head.temperature = fit_temperature(logits, val_y)
        probs = softmax(logits, head.temperature)
        choice = choose_threshold(probs, val_y, head.oos_id, config.target_in_scope_accuracy)
        head.threshold = choice.threshold

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
        meta = {"labels": labels, "oos_label": splits.oos_label, "temperature": head.temperature,
                "threshold": head.threshold, "target_in_scope_accuracy": config.target_in_scope_accuracy,
                "max_length": config.max_length}
        return finish(head, config, splits, base, meta, {"warnings": warnings}, train_metrics, t0, out_dir)

    # -- persistence
    def _folder_fields(self) -> dict:
        return {"labels": self.labels, "oos_label": self.oos_label, "temperature": self.temperature,
                "threshold": self.threshold, "max_length": self.max_length}

    @classmethod
    def _auto_class(cls):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    @classmethod
    def _from_folder(cls, model, tokenizer, meta: dict) -> IntentHead:
        return cls(model, tokenizer, meta["labels"], meta["temperature"], meta["threshold"], meta.get("oos_label"),
                   meta.get("max_length", 64), meta)
