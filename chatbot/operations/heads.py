"""The routing classification heads (intent with calibrated confidence and out-of-scope; token-level slots):
loading labelled data, training, evaluating and loading a head, for the CLI (the fine-tuning organ's
:mod:`finetune.heads` and :mod:`finetune.intent_data`, reached only here and by the router)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from chatbot.errors import InvalidInputError

#: The two kinds of head.
KINDS = ("intent", "entity")


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise InvalidInputError(f"head kind must be one of {KINDS}, got {kind!r}")
    return kind


def head_config(kind: str, overrides: dict | None = None):
    """A :class:`~finetune.heads.HeadConfig` for a ``kind`` head: ``max_length`` 64 tokens for intents, 128 for
    entities, then the non-None ``overrides`` (its fields, e.g. from the command line).

    Raises:
        InvalidInputError: an unknown kind. ConfigError: a field is out of range.
    """
    from finetune.heads import HeadConfig

    cfg = {"max_length": 64 if _kind(kind) == "intent" else 128}
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return HeadConfig(**cfg)


def load_splits(kind: str, dataset: str | Path, validation: Path | None = None, test: Path | None = None, **kwargs):
    """Train / validation / test rows of a labelled set for a ``kind`` head
    (:func:`finetune.intent_data.load_intent_splits` or :func:`~finetune.intent_data.load_entity_splits`; intent
    ``kwargs``: ``text_field``, ``label_field``, ``oos_label``, ``labels``).

    Raises:
        NotFoundError: no such set. InvalidInputError: a row is malformed or has an unknown label (the row named).
    """
    from finetune.intent_data import load_entity_splits, load_intent_splits

    if _kind(kind) == "intent":
        return load_intent_splits(dataset, validation=validation, test=test, **kwargs)
    return load_entity_splits(dataset, validation=validation, test=test)


def train_head(kind: str, splits, config, progress: bool = True):
    """Fine-tune a ``kind`` head on ``splits`` with ``config`` (:meth:`finetune.heads.IntentHead.train`: calibrated,
    with an out-of-scope threshold; :meth:`~finetune.heads.EntityHead.train`: a span-score threshold). Not saved."""
    from finetune.heads import EntityHead, IntentHead

    cls = IntentHead if _kind(kind) == "intent" else EntityHead
    return cls.train(splits, config, out_dir=None, progress=progress)


def load_head(kind: str, folder: str | Path):
    """A saved ``kind`` head from ``folder``.

    Raises:
        NotFoundError / ModelAssetError: no head there, or its base model is missing or changed.
    """
    from finetune.heads import EntityHead, IntentHead

    return (IntentHead if _kind(kind) == "intent" else EntityHead).load(folder)


def head_report(kind: str, head, rows: Sequence, threshold: float | None = None, progress: bool = True) -> dict:
    """Evaluate a ``kind`` head on labelled ``rows`` (:func:`finetune.heads.intent_report`: per-label report,
    accuracy, out-of-scope recall and precision; :func:`~finetune.heads.entity_report`: seqeval report, micro-F1,
    exact character match), at ``threshold`` (default the head's own)."""
    from finetune.heads import entity_report, intent_report

    if _kind(kind) == "intent":
        return intent_report(head, rows, threshold=threshold, progress=progress)
    return entity_report(head, rows, threshold=threshold)
