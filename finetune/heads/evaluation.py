"""Evaluation of the intent and entity heads: per-label reports, out-of-scope metrics, entity F1.

The text report has the layout of scikit-learn's ``classification_report`` (per-label
precision, recall, F1, support; then micro, macro and weighted averages). Intent
numbers come from ``sklearn.metrics.precision_recall_fscore_support``; entity numbers
from ``seqeval`` (span-level, CoNLL-style: a span counts only when type and both
ends match) over the heads' BIO tags re-derived from character spans.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from chatbot.errors import InvalidInputError
from finetune.calibration import decide, oos_metrics
from finetune.heads.bio import align_tags
from finetune.intent_data import Span

log = logging.getLogger(__name__)


def format_report(rows: dict[str, dict], averages: dict[str, dict], digits: int = 4) -> str:
    """Text table in scikit-learn's ``classification_report`` layout.

    Args:
        rows: label -> ``{"precision", "recall", "f1-score", "support"}``.
        averages: ``"micro avg"`` / ``"macro avg"`` / ``"weighted avg"`` -> the same keys.
        digits: decimals of the scores.
    """
    names = list(rows) + list(averages)
    width = max(max((len(n) for n in names), default=0), len("weighted avg"), digits)
    head_fmt = "{:>{width}s} " + " {:>9}" * 4
    out = head_fmt.format("", "precision", "recall", "f1-score", "support", width=width) + "\n\n"
    row_fmt = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"
    for name, r in rows.items():
        out += row_fmt.format(name, r["precision"], r["recall"], r["f1-score"], int(r["support"]),
                              width=width, digits=digits)
    out += "\n"
    for name, r in averages.items():
        out += row_fmt.format(name, r["precision"], r["recall"], r["f1-score"], int(r["support"]),
                              width=width, digits=digits)
    return out


def label_report(y_true: Sequence[str], y_pred: Sequence[str], digits: int = 4) -> tuple[str, dict]:
    """Per-label and micro/macro/weighted precision, recall, F1 (sklearn); returns (text, dict)."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = sorted(set(y_true) | set(y_pred))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    rows = {
        lab: {"precision": float(p[i]), "recall": float(r[i]), "f1-score": float(f[i]), "support": int(s[i])}
        for i, lab in enumerate(labels)
    }
    averages = {}
    for avg in ("micro", "macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        averages[f"{avg} avg"] = {"precision": float(ap), "recall": float(ar), "f1-score": float(af),
                                  "support": int(s.sum())}
    return format_report(rows, averages, digits), {**rows, **averages}


def intent_report(head, rows: Sequence[tuple[str, str]], probs: np.ndarray | None = None,
                  threshold: float | None = None, progress: bool = False) -> dict:
    """Evaluate an :class:`~finetune.heads.intent.IntentHead` on ``(text, label)`` rows.

    Args:
        head: the intent head.
        rows: labelled messages; golds must be head labels (the out-of-scope label too).
        probs: precomputed calibrated probabilities ``(N, C)`` (skips inference).
        threshold: override of the head's threshold.
        progress: show a progress bar.

    Returns:
        ``accuracy`` (argmax, no rejection: the usual benchmark number),
        ``accuracy_at_threshold``, ``macro_f1`` (at threshold), ``report`` (text, per
        label at the threshold), ``per_label`` (dict), ``threshold``, ``n``; with an
        out-of-scope label or a threshold > 0 also ``in_scope_accuracy``,
        ``oos_recall``, ``oos_precision``, ``in_scope_accepted``.

    Raises:
        InvalidInputError: no rows, or a gold label the head does not know (names the row).
    """
    if not rows:
        raise InvalidInputError("evaluation needs at least one labelled row, got 0")
    for i, (_, y) in enumerate(rows, start=1):
        if y not in head.label2id:
            raise InvalidInputError(
                f"evaluation row {i}: label {y!r} is not one of the head's {len(head.labels)} labels"
            )
    if probs is None:
        probs = head.probabilities([t for t, _ in rows], progress=progress)
    t = head.threshold if threshold is None else float(threshold)
    gold = np.array([head.label2id[y] for _, y in rows])
    top = probs.argmax(axis=1)
    final = decide(probs, t, head.oos_id)
    names = head.labels
    reject = head.reject_label
    y_true = [names[g] for g in gold]
    y_pred = [reject if k < 0 else names[k] for k in final]
    text, per_label = label_report(y_true, y_pred)
    out = {
        "n": len(rows),
        "threshold": t,
        "temperature": head.temperature,
        "accuracy": float((top == gold).mean()),
        "accuracy_at_threshold": float(np.mean([a == b for a, b in zip(y_true, y_pred)])),
        "macro_f1": per_label["macro avg"]["f1-score"],
        "report": text,
        "per_label": per_label,
    }
    if head.oos_id is not None or t > 0:
        out.update(oos_metrics(final, gold, head.oos_id))
        out["n_out_of_scope"] = int((gold == head.oos_id).sum()) if head.oos_id is not None else 0
    return out


def _token_view(tokenizer, text: str):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["offset_mapping"], [False] * len(enc["offset_mapping"])


def _tags_for(offsets, special, spans) -> list[str]:
    return [t for t in align_tags(offsets, spans, special) if t is not None]


def entity_report(head, rows: Sequence[tuple[str, list[Span]]], threshold: float | None = None) -> dict:
    """Evaluate an :class:`~finetune.heads.entity.EntityHead` on ``(text, spans)`` rows with seqeval.

    Gold and predicted spans are both turned into BIO tags over the same (untruncated)
    tokenisation, so the score is span-level exact match on token boundaries.

    Returns:
        ``micro_f1``, ``micro_precision``, ``micro_recall``, ``report`` (seqeval text:
        per type and micro/macro/weighted averages), ``per_type`` (dict), ``n``,
        ``threshold``, ``exact_char_match`` (fraction of gold spans predicted with the
        same type and character offsets).

    Raises:
        InvalidInputError: no rows, or a gold entity type the head does not know (names the row).
    """
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    if not rows:
        raise InvalidInputError("evaluation needs at least one row, got 0")
    known = set(head.types)
    for i, (_, spans) in enumerate(rows, start=1):
        for s in spans:
            if s.type not in known:
                raise InvalidInputError(f"evaluation row {i}: entity type {s.type!r} is not one of {sorted(known)}")
    preds = head.predict([t for t, _ in rows], threshold=threshold)
    y_true, y_pred = [], []
    gold_n = hit = 0
    for (text, spans), slots in zip(rows, preds):
        offsets, special = _token_view(head.tokenizer, text)
        y_true.append(_tags_for(offsets, special, spans))
        y_pred.append(_tags_for(offsets, special, [Span(s.start, s.end, s.type) for s in slots]))
        got = {(s.start, s.end, s.type) for s in slots}
        gold_n += len(spans)
        hit += sum((s.start, s.end, s.type) in got for s in spans)
    report = classification_report(y_true, y_pred, digits=4, zero_division=0)
    per_type = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    per_type = {k: {kk: float(vv) for kk, vv in v.items()} for k, v in per_type.items()}
    return {
        "n": len(rows),
        "threshold": head.threshold if threshold is None else float(threshold),
        "micro_f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "micro_precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "micro_recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "exact_char_match": hit / gold_n if gold_n else None,
        "report": report,
        "per_type": per_type,
    }


def choose_entity_threshold(head, rows: Sequence[tuple[str, list[Span]]],
                            candidates: Sequence[float] = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
                            ) -> tuple[float, dict]:
    """Span-score threshold with the best span-level micro-F1 on ``rows`` (ties: the lowest).

    Returns:
        ``(threshold, {str(threshold): micro_f1})``.
    """
    preds = head.predict([t for t, _ in rows], threshold=0.0)
    gold = [{(s.start, s.end, s.type) for s in spans} for _, spans in rows]
    sweep = {}
    best_t, best_f = 0.0, -1.0
    for t in candidates:
        tp = fp = fn = 0
        for g, slots in zip(gold, preds):
            p = {(s.start, s.end, s.type) for s in slots if s.score >= t}
            tp += len(g & p)
            fp += len(p - g)
            fn += len(g - p)
        f = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        sweep[str(t)] = f
        if f > best_f + 1e-12:
            best_t, best_f = float(t), f
    return best_t, sweep
