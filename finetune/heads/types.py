"""What the heads return at run time: an intent prediction and a typed slot (no model code)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
