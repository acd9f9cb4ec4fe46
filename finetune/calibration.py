"""Confidence calibration of a classifier: temperature scaling and the out-of-scope threshold.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks",
ICML) divides the logits by one scalar ``T > 0`` fitted on a validation split by
minimising the negative log-likelihood; it leaves the argmax unchanged and makes
the softmax score usable as a probability. The out-of-scope threshold is then
chosen on the same split: the highest calibrated score threshold that keeps the
in-scope accuracy at or above a target (so as many out-of-scope requests as
possible are caught at that price), after Larson et al. 2019 (CLINC150).

Pure numpy/scipy: no torch.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass

import numpy as np

from chatbot.errors import ConfigError, InvalidInputError

log = logging.getLogger(__name__)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``; shape ``(N, C)`` in and out, float64."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats) of integer ``labels`` (N,) under ``softmax(logits / T)`` (N, C)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): confidence-vs-accuracy gap over ``bins`` equal-width bins, in [0, 1]."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Fit the temperature ``T`` minimising validation NLL (Guo et al. 2017).

    Args:
        logits: float array ``(N, C)`` of uncalibrated logits.
        labels: int array ``(N,)`` of gold class ids in ``[0, C)``.
        bounds: search interval for ``T``.

    Returns:
        ``T`` (> 0); calibrated probabilities are ``softmax(logits / T)``.

    Raises:
        InvalidInputError: empty input, or shapes / label ids that do not match.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) == 0 or len(labels) != len(logits):
        raise InvalidInputError(f"logits must be (N, C) with N = len(labels) > 0, got {logits.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise InvalidInputError(f"labels must be in [0, {logits.shape[1]}), got range [{labels.min()}, {labels.max()}]")
    res = minimize_scalar(
        lambda log_t: nll(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(bounds[0]), np.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(res.x))


@dataclass
class ThresholdChoice:
    """The chosen threshold and what it gives on the split it was chosen on.

    Attributes:
        threshold: calibrated score below which a prediction becomes out-of-scope.
        target_in_scope_accuracy: the requested floor.
        in_scope_accuracy: accuracy on in-scope examples at ``threshold`` (a rejected
            in-scope example counts as wrong); None without in-scope examples.
        oos_recall, oos_precision: for the out-of-scope examples / predictions; None
            without out-of-scope examples.
        in_scope_accepted: fraction of in-scope examples not rejected.
        met_target: False when even threshold 0 misses the target (threshold is 0).
    """

    threshold: float
    target_in_scope_accuracy: float
    in_scope_accuracy: float | None
    oos_recall: float | None
    oos_precision: float | None
    in_scope_accepted: float | None
    met_target: bool

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return asdict(self)


def decide(probs: np.ndarray, threshold: float, oos_id: int | None) -> np.ndarray:
    """Final class ids: the argmax, or ``oos_id`` (``-1`` when None) where it is out-of-scope.

    Out-of-scope = the argmax is ``oos_id`` or the top calibrated score is below
    ``threshold``. ``probs``: ``(N, C)``; returns int ``(N,)``.
    """
    top = probs.argmax(axis=1)
    reject = probs.max(axis=1) < threshold
    if oos_id is not None:
        reject |= top == oos_id
    out = top.copy()
    out[reject] = -1 if oos_id is None else oos_id
    return out


def oos_metrics(pred: np.ndarray, labels: np.ndarray, oos_id: int | None) -> dict:
    """In-scope accuracy, out-of-scope recall and precision of final predictions ``pred``.

    Without ``oos_id``, rejections are ``-1`` and there are no out-of-scope golds.
    Returns a dict with ``in_scope_accuracy``, ``oos_recall``, ``oos_precision``,
    ``in_scope_accepted`` (None where undefined).
    """
    reject_id = -1 if oos_id is None else oos_id
    ins = labels != reject_id
    oos = ~ins
    pred_oos = pred == reject_id
    return {
        "in_scope_accuracy": float((pred[ins] == labels[ins]).mean()) if ins.any() else None,
        "oos_recall": float(pred_oos[oos].mean()) if oos.any() else None,
        "oos_precision": float(oos[pred_oos].mean()) if pred_oos.any() and oos.any() else None,
        "in_scope_accepted": float((~pred_oos[ins]).mean()) if ins.any() else None,
    }


def choose_threshold(
    probs: np.ndarray, labels: np.ndarray, oos_id: int | None, target_in_scope_accuracy: float
) -> ThresholdChoice:
    """The highest threshold whose in-scope accuracy is at least the target.

    Args:
        probs: calibrated probabilities ``(N, C)``.
        labels: gold ids ``(N,)``; ``oos_id`` marks out-of-scope examples.
        oos_id: class id of the out-of-scope class, or None when the label set has none.
        target_in_scope_accuracy: in ``(0, 1]``.

    Returns:
        :class:`ThresholdChoice`. The candidates are 0 and the observed top scores, so
        the result is exact on this split; a higher threshold rejects more in-scope
        examples (lower in-scope accuracy) and catches more out-of-scope ones.

    Raises:
        ConfigError: the target is outside ``(0, 1]``.
    """
    if not 0.0 < target_in_scope_accuracy <= 1.0:
        raise ConfigError(f"target_in_scope_accuracy must be in (0, 1], got {target_in_scope_accuracy}")
    labels = np.asarray(labels)
    reject_id = -1 if oos_id is None else oos_id
    ins = labels != reject_id
    top = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    if not ins.any():
        t = 0.0
    else:
        # in-scope accuracy at threshold t = #(correct, not oos-argmax, conf >= t) / #in-scope
        ok = (top == labels) & ins
        if oos_id is not None:
            ok &= top != oos_id
        conf_ok = np.sort(conf[ok])  # accepted-correct count at t = #(conf_ok >= t)
        need = int(np.ceil(target_in_scope_accuracy * ins.sum() - 1e-9))
        if len(conf_ok) < need:
            t = 0.0
        else:
            # keep the `need` highest-scoring correct in-scope examples
            t = float(conf_ok[len(conf_ok) - need]) if need > 0 else 1.0 + 1e-9
    pred = decide(probs, t, oos_id)
    m = oos_metrics(pred, labels, oos_id)
    met = m["in_scope_accuracy"] is None or m["in_scope_accuracy"] >= target_in_scope_accuracy - 1e-12
    if not met:
        log.warning(
            "in-scope accuracy %.4f at threshold 0 is below the target %.4f; threshold set to 0",
            m["in_scope_accuracy"], target_in_scope_accuracy,
        )
    return ThresholdChoice(
        threshold=t,
        target_in_scope_accuracy=target_in_scope_accuracy,
        in_scope_accuracy=m["in_scope_accuracy"],
        oos_recall=m["oos_recall"],
        oos_precision=m["oos_precision"],
        in_scope_accepted=m["in_scope_accepted"],
        met_target=bool(met),
    )
