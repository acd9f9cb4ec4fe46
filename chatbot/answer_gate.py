"""The promotion gate on answers (issue 15): a candidate adapter is judged by what customers would read.

The candidate and the reference (the live adapter, or the base model when none is live) answer the same fixed
question set through the real turn pipeline (:func:`chatbot.answer_eval.run_answer_eval`, one engine, the adapter
switched hot between the two runs). The candidate is refused when it lowers *correct* or *K-Precision*, or raises
the *unsupported-claim rate*, by more than its tolerance. The side-by-side table goes with the decision, so the CLI
and the console can show it and the registry can keep it beside the adapter's metrics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from chatbot.answer_eval import AnswerCase, format_summary, run_answer_eval, summarize
from chatbot.errors import InvalidInputError

log = logging.getLogger(__name__)

#: ``(summary key, name as people read it, +1 when higher is better / -1 when lower is, tolerance field)``.
GATE_MEASURES = (
    ("correct", "Correct", +1, "max_correct_drop"),
    ("k_precision", "K-Precision", +1, "max_k_precision_drop"),
    ("unsupported_rate", "Unsupported-claim rate", -1, "max_unsupported_increase"),
)

#: File in the adapter folder that keeps the gate's last table and verdict.
GATE_FILE = "answer_gate.json"


@dataclass(frozen=True)
class AnswerGateOptions:
    """Tolerances of the answer gate and how the answers are made.

    Attributes:
        max_correct_drop, max_k_precision_drop: the most the candidate may lower them, in [0, 1].
        max_unsupported_increase: the most it may raise the unsupported-claim rate, in [0, 1].
        mode: the answer mode both run in; ``generate`` (default) judges the model itself, since ``verified``
            withholds what the model invents.
        concurrency: conversations at once.
    """

    max_correct_drop: float = 0.02
    max_k_precision_drop: float = 0.02
    max_unsupported_increase: float = 0.02
    mode: str = "generate"
    concurrency: int = 8

    def __post_init__(self) -> None:
        for name in ("max_correct_drop", "max_k_precision_drop", "max_unsupported_increase"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InvalidInputError(f"{name} must be in [0, 1], got {v}")
        if self.mode not in ("generate", "verified", "extractive"):
            raise InvalidInputError(f"mode must be generate, verified or extractive, got {self.mode!r}")


def judge(candidate: dict, reference: dict, options: AnswerGateOptions, reference_name: str = "the live model"
          ) -> list[str]:
    """The reasons to refuse ``candidate`` beside ``reference`` (answer-evaluation summaries): one sentence per
    measure of :data:`GATE_MEASURES` that is worse by more than its tolerance; empty when it passes."""
    reasons = []
    for key, name, sign, tol_field in GATE_MEASURES:
        c, r = candidate.get(key), reference.get(key)
        if c is None or r is None:
            continue
        worse = (r - c) if sign > 0 else (c - r)
        tol = getattr(options, tol_field)
        if worse > tol + 1e-9:
            better = "higher" if sign > 0 else "lower"
            reasons.append(f"{name}: {c:.3f} against {r:.3f} for {reference_name} ({better} is better; "
                           f"tolerance {tol}): worse by {worse:.3f}.")
    return reasons


@dataclass
class AnswerGateDecision:
    """The answer gate's verdict.

    Attributes:
        candidate, reference: ``(name, summary)`` of each run (reference ``"base"`` when none is live).
        reasons: why it was refused (empty when it passed).
        rows: the number of questions.
        forced: promoted although refused (``--force``).
    """

    candidate: tuple[str, dict]
    reference: tuple[str, dict]
    reasons: list[str]
    rows: int
    forced: bool = False
    dataset: str = ""
    options: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.reasons

    def table(self) -> str:
        """The side-by-side Markdown table (reference first, as every evaluation prints the baseline first)."""
        ref_name = self.reference[0] if self.reference[0] == "base" else f"{self.reference[0]} (live)"
        return format_summary([(ref_name, self.reference[1]), (self.candidate[0], self.candidate[1])])

    def sentences(self) -> list[str]:
        """The verdict in words, then the reasons."""
        verdict = "passes" if self.ok else ("refused, promoted with --force" if self.forced else "refused")
        return [f"Answer gate ({self.rows} questions, {self.options.get('mode', '')} mode): {self.candidate[0]} "
                f"{verdict} beside {self.reference[0]}.", *self.reasons]

    def to_dict(self) -> dict:
        """JSON-ready: verdict, reasons, both summaries, the table, the dataset and options."""
        return {"ok": self.ok, "forced": self.forced, "reasons": self.reasons, "rows": self.rows,
                "candidate": {"name": self.candidate[0], "summary": self.candidate[1]},
                "reference": {"name": self.reference[0], "summary": self.reference[1]},
                "table": self.table(), "dataset": self.dataset, "options": self.options}

    def save(self, adapter_dir: str | Path) -> Path:
        """Keep the decision beside the adapter's metrics (``answer_gate.json`` in its folder)."""
        path = Path(adapter_dir) / GATE_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str), encoding="utf-8")
        return path


class PinnedAdapter:
    """Keeps an engine on one adapter (``path`` None: the base model): the evaluation's stand-in for the
    live-adapter watcher, so the run is not switched to whatever ``LIVE.json`` names.

    ``checkpoint``: the adapter's merged checkpoint (``adapter_serving="merged"``); an engine that can switch
    checkpoints (vLLM) then loads it, as the servers will, and the evaluation starts only once it is served.
    With ``path`` None, such an engine goes back to the base checkpoint when it serves another one.
    """

    def __init__(self, path: str | None, version: str | None, checkpoint: str | None = None) -> None:
        self.path, self.version, self.checkpoint = path, version, checkpoint

    async def sync(self, engine) -> None:
        if hasattr(engine, "set_checkpoint"):
            if self.checkpoint is not None:
                if engine.checkpoint != self.checkpoint or engine.info.adapter_version != self.version:
                    await engine.set_checkpoint(self.checkpoint, self.version, wait=True)
                return
            if engine.checkpoint != engine.model_path:  # LoRA, or the base model, on the base weights
                await engine.set_checkpoint(None, None, wait=True)
        if engine.info.adapter_version != self.version:
            await engine.set_adapter(self.path, self.version)


async def evaluate_answers(assistant, cases: Sequence[AnswerCase], adapter: tuple | None,
                           concurrency: int = 8) -> dict:
    """Answer ``cases`` with ``assistant``'s engine on ``adapter`` (``(path, version)`` or ``(path, version,
    merged checkpoint)``, as :class:`PinnedAdapter` takes them; None: the base model) and
    return the summary (:func:`chatbot.answer_eval.summarize`).

    Raises:
        EngineError: the engine cannot load the adapter.
    """
    assistant.adapters = PinnedAdapter(*(adapter or (None, None)))
    await assistant.adapters.sync(assistant.engine)
    return summarize(await run_answer_eval(assistant, cases, concurrency))


async def answer_gate(assistant, cases: Sequence[AnswerCase], candidate: tuple,
                      reference: tuple | None, options: AnswerGateOptions | None = None,
                      dataset: str = "") -> AnswerGateDecision:
    """Judge ``candidate`` (``(path, version[, merged checkpoint])``) against ``reference`` (the live adapter, or
    None for the base model) on ``cases``, with ``assistant`` (its engine must load adapters; its ``answer_mode``
    should be ``options.mode``). The engine is left on the reference, so a refused candidate is not what it serves.

    Raises:
        InvalidInputError: no case.
        EngineError: the engine cannot load an adapter.
    """
    options = options or AnswerGateOptions()
    if not cases:
        raise InvalidInputError("the answer gate needs at least one question")
    cand = await evaluate_answers(assistant, cases, candidate, options.concurrency)
    ref = await evaluate_answers(assistant, cases, reference, options.concurrency)
    ref_name = reference[1] if reference is not None else "base"
    reasons = judge(cand, ref, options, "the base model" if reference is None else f"the live adapter {ref_name}")
    d = AnswerGateDecision((candidate[1], cand), (ref_name, ref), reasons, len(cases), dataset=dataset,
                           options={"mode": options.mode, "max_correct_drop": options.max_correct_drop,
                                    "max_k_precision_drop": options.max_k_precision_drop,
                                    "max_unsupported_increase": options.max_unsupported_increase})
    log.info("answer gate: %s", " ".join(d.sentences()))
    return d
