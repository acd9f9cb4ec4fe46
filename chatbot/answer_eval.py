"""Answer evaluation (``chatbot eval answers``): the real turn pipeline scored for correctness and faithfulness.

Each dataset row is a customer question ``{"id", "query", "history": [earlier customer messages],
"gold": [doc ids], "facts": [[acceptable phrasings], ...], "answerable": bool}``. The earlier
messages are sent first in the same conversation, then the question; the reply, its passages
and its route are scored:

- **correct**: answerable: every fact present and no unsupported claim; unanswerable: an abstention.
- **fact recall**: share of a row's facts present (a fact is present when one of its phrasings
  occurs case-insensitively in the reply).
- **K-Precision** (Adlakha et al., TACL 2024): share of the reply's content tokens
  (:func:`chatbot.verification.content_tokens`, citation markers removed) that occur in the
  passages the turn showed the customer (its citations); 0 for a reply without passages.
- **unsupported-claim rate**: rows whose reply holds a number, amount, duration, percentage,
  URL, e-mail address or phone number (:func:`chatbot.verification.claims`) no shown passage holds.
- **reach**: answerable rows whose retrieved passages (every passage the turn was verified against, shown or not)
  hold every fact. A row the router sent to a person or to a clarifying question retrieves nothing and does not
  reach, nor does a failed row. It is what routing and retrieval leave a ``verified`` or ``extractive`` answer,
  whose every sentence a passage must support, whatever the chat model: ``correct`` can pass it only through the
  few words a supported sentence may add (``verify_min_overlap``) and the company's own contact details. Top-k
  retrieval accuracy in Karpukhin et al., EMNLP 2020 (DPR), with the row's facts for the answer string.
- **gold cited**: a gold document among the turn's citations; **clarify rate**: answerable rows
  routed to ``clarify``; **abstention**: unanswerable rows whose reply says it cannot answer and
  offers a person (or hands the customer to one) with no unsupported claim; **false abstention**:
  answerable rows that got such a reply (the documents answer it, the bot declined).
- latency p50 / p95 (ms) and completion tokens per answer.
Fact recall, K-Precision, correct, reach, clarify and gold-cited rates are over answerable rows;
abstention over unanswerable rows, false abstention over answerable rows; the unsupported-claim rate over
all rows.
"""

from __future__ import annotations

import asyncio
import logging
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chatbot.errors import ChatbotError, DataError
from chatbot.hashing import sha256_file
from chatbot.jsonl import iter_jsonl
from chatbot.verification import Verifier, claims, content_tokens, strip_markers

log = logging.getLogger(__name__)

#: the reply says it cannot answer ...
_CANNOT = re.compile(r"\b(can'?t|cannot|can not|couldn'?t|could not|unable to|not able to|don'?t have|do not have|"
                     r"not sure|no information|don'?t know)\b", re.I)
#: ... and offers a person
_PERSON = re.compile(r"\b(person|human|agent|someone|staff|support team|representative)\b", re.I)


@dataclass
class AnswerCase:
    """One row of an answer dataset (see the module docstring)."""

    id: str
    query: str
    gold: list[str]
    facts: list[list[str]]
    answerable: bool
    history: list[str] = field(default_factory=list)


def load_answer_set(path: Path) -> list[AnswerCase]:
    """Read and validate a JSONL answer dataset.

    Raises:
        DataError: unreadable file, bad JSON, a missing or mistyped field, a duplicate id, an
            answerable row without facts or an unanswerable row with some (line and field named).
    """
    path = Path(path)
    out: list[AnswerCase] = []
    seen: set[str] = set()
    try:
        rows = list(iter_jsonl(path))
    except OSError as exc:
        raise DataError(f"cannot read answer dataset {path}: {exc}") from exc
    for n, row in rows:
        where = f"{path}:{n}"
        for key, typ in (("id", str), ("query", str), ("gold", list), ("facts", list), ("answerable", bool)):
            if not isinstance(row.get(key), typ):
                raise DataError(f"{where}: field {key!r} must be {typ.__name__}, got {row.get(key)!r}")
        history = row.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, str) and h.strip() for h in history):
            raise DataError(f"{where}: field 'history' must be a list of messages, got {history!r}")
        facts = row["facts"]
        if not all(isinstance(f, list) and f and all(isinstance(p, str) and p.strip() for p in f) for f in facts):
            raise DataError(f"{where}: field 'facts' must be a list of non-empty phrasing lists, got {facts!r}")
        if row["answerable"] and not facts:
            raise DataError(f"{where}: an answerable row needs at least one fact")
        if not row["answerable"] and (facts or row["gold"]):
            raise DataError(f"{where}: an unanswerable row has no facts and no gold documents")
        if row["id"] in seen:
            raise DataError(f"{where}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        out.append(AnswerCase(row["id"], row["query"], [str(g) for g in row["gold"]], facts, row["answerable"],
                              history))
    if not out:
        raise DataError(f"answer dataset {path} has no rows")
    return out


def fact_present(fact: Sequence[str], reply: str) -> bool:
    """True when one of the fact's phrasings occurs case-insensitively in ``reply``."""
    low = reply.lower()
    return any(p.lower() in low for p in fact)


def k_precision(reply: str, passages: Sequence[str]) -> float | None:
    """Share of ``reply``'s content tokens (citation markers removed) found in ``passages``;
    None for a reply without content tokens; 0.0 when there are no passages."""
    tokens = content_tokens(strip_markers(reply))
    if not tokens:
        return None
    known = {t for p in passages for t in content_tokens(p)}
    return sum(t in known for t in tokens) / len(tokens)


def unsupported_claims(reply: str, passages: Sequence[str], trusted: Sequence[str] = ()) -> list[str]:
    """Claims of ``reply`` (numbers, amounts, URLs, e-mail addresses, phone numbers) that no
    passage (or ``trusted`` text) contains."""
    if not claims(reply):
        return []
    v = Verifier(passages, trusted=trusted)
    return v.unsupported_claims(strip_markers(reply))


def is_abstention(reply: str, held: bool = False) -> bool:
    """The reply says it cannot answer and offers a person, or the customer was handed to one."""
    return held or bool(_CANNOT.search(reply) and _PERSON.search(reply))


@dataclass
class RowResult:
    """The scores of one row (see the module docstring)."""

    id: str
    answerable: bool
    query: str
    reply: str
    kind: str | None
    action: str | None
    facts_found: int
    facts_total: int
    k_precision: float | None
    unsupported: list[str]
    gold_cited: bool
    abstained: bool
    correct: bool
    latency_ms: float
    completion_tokens: int
    withheld: int = 0
    cited: list[str] = field(default_factory=list)
    reach: bool = False


def score_row(case: AnswerCase, reply: str, passages: Sequence[str], cited_docs: Sequence[str],
              action: str | None = None, kind: str | None = None, held: bool = False, latency_ms: float = 0.0,
              completion_tokens: int = 0, withheld: int = 0, trusted: Sequence[str] = (),
              retrieved: Sequence[str] | None = None) -> RowResult:
    """Score one reply of ``case``.

    Args:
        reply: the text the customer read.
        passages: the passage texts shown with it (the turn's citations).
        cited_docs: doc ids of those passages.
        action: the routing action (``clarify`` counts against answerable rows).
        held: the turn handed the customer to a person.
        trusted: texts whose claims count as supported (the company's configured contact details).
        retrieved: every passage text the turn retrieved and verified against (default ``passages``); an answerable
            row has ``reach`` when these hold every fact.
    """
    found = sum(fact_present(f, reply) for f in case.facts)
    pool = "\n".join(passages if retrieved is None else retrieved)
    unsupported = unsupported_claims(reply, passages, trusted)
    abstained = is_abstention(reply, held) and not unsupported
    if case.answerable:
        correct = found == len(case.facts) and not unsupported
    else:
        correct = abstained
    return RowResult(
        id=case.id, answerable=case.answerable, query=case.query, reply=reply, kind=kind, action=action,
        facts_found=found, facts_total=len(case.facts),
        k_precision=k_precision(reply, passages) if case.answerable else None,
        unsupported=unsupported, gold_cited=bool(set(case.gold) & set(cited_docs)), abstained=abstained,
        correct=correct, latency_ms=latency_ms, completion_tokens=completion_tokens, withheld=withheld,
        cited=list(dict.fromkeys(cited_docs)),
        reach=case.answerable and all(fact_present(f, pool) for f in case.facts),
    )


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _pct(xs: Sequence[float], q: float) -> float | None:
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1]


def summarize(rows: Sequence[RowResult]) -> dict:
    """The summary measures of scored rows (keys as in :data:`SUMMARY_COLUMNS`)."""
    ans = [r for r in rows if r.answerable]
    una = [r for r in rows if not r.answerable]
    lat = [r.latency_ms for r in rows]
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r.kind or "none"] = kinds.get(r.kind or "none", 0) + 1
    return {
        "rows": len(rows), "answerable": len(ans), "unanswerable": len(una),
        "correct": _mean([float(r.correct) for r in ans]),
        "reach": _mean([float(r.reach) for r in ans]),
        "fact_recall": _mean([r.facts_found / r.facts_total for r in ans]),
        "k_precision": _mean([r.k_precision if r.k_precision is not None else 0.0 for r in ans]),
        "unsupported_rate": _mean([float(bool(r.unsupported)) for r in rows]),
        "gold_cited": _mean([float(r.gold_cited) for r in ans]),
        "clarify_rate": _mean([float(r.action == "clarify") for r in ans]),
        "abstention": _mean([float(r.abstained) for r in una]),
        "false_abstention": _mean([float(r.abstained) for r in ans]),
        "correct_all": _mean([float(r.correct) for r in rows]),
        "latency_p50_ms": _pct(lat, 50), "latency_p95_ms": _pct(lat, 95),
        "tokens_per_answer": _mean([r.completion_tokens for r in rows]),
        "withheld_per_answer": _mean([r.withheld for r in rows]),
        "kinds": kinds,
    }


#: (key, header, format) of the summary table
SUMMARY_COLUMNS = (
    ("correct", "correct", "{:.2f}"), ("reach", "reach", "{:.2f}"), ("fact_recall", "fact rec", "{:.2f}"),
    ("k_precision", "K-Prec", "{:.2f}"),
    ("unsupported_rate", "unsupp", "{:.2f}"), ("abstention", "abstain", "{:.2f}"),
    ("false_abstention", "false abst", "{:.2f}"),
    ("clarify_rate", "clarify", "{:.2f}"), ("gold_cited", "gold cit", "{:.2f}"),
    ("tokens_per_answer", "tok/ans", "{:.0f}"), ("latency_p50_ms", "p50 ms", "{:.0f}"),
    ("latency_p95_ms", "p95 ms", "{:.0f}"),
)


def format_summary(results: Sequence[tuple[str, dict]]) -> str:
    """A Markdown table: one row per ``(label, summary)``."""
    head = "| run | rows | " + " | ".join(h for _, h, _ in SUMMARY_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(SUMMARY_COLUMNS) + 2)]
    for label, s in results:
        cells = ["-" if s.get(k) is None else f.format(s[k]) for k, _, f in SUMMARY_COLUMNS]
        lines.append(f"| {label} | {s['rows']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_rows(rows: Sequence[RowResult]) -> str:
    """One line per row: verdict, facts, K-Precision, kind/action, unsupported claims, the reply (cut)."""
    out = []
    for r in rows:
        verdict = "ok " if r.correct else "BAD"
        kp = "-" if r.k_precision is None else f"{r.k_precision:.2f}"
        extra = f" unsupported={r.unsupported}" if r.unsupported else ""
        reply = r.reply.replace("\n", " ")
        reply = reply if len(reply) <= 110 else reply[:107] + "..."
        out.append(f"{verdict} {r.id:<10} facts {r.facts_found}/{r.facts_total} kp {kp:<4} "
                   f"{(r.kind or '-')}/{(r.action or '-')}{extra} | {reply}")
    return "\n".join(out)


async def run_case(assistant, case: AnswerCase) -> RowResult:
    """Send the case's earlier messages, then its question, through ``assistant`` (one
    conversation) and score the last reply."""
    import time

    cid = None
    for text in case.history:
        t = await assistant.respond(cid, text)
        cid = t.conversation_id
    t0 = time.perf_counter()
    turn = await assistant.respond(cid, case.query)
    latency = (time.perf_counter() - t0) * 1000
    return score_row(
        case, turn.text, [c.passage for c in turn.citations], [c.doc_id for c in turn.citations],
        action=turn.route.action if turn.route is not None else None, kind=turn.answer_kind, held=turn.held,
        latency_ms=latency, completion_tokens=turn.completion_tokens, withheld=len(turn.withheld),
        trusted=list(assistant.settings.company_fields.values()),
        retrieved=[h.text for h in turn.prompt.hits],
    )


async def run_answer_eval(assistant, cases: Sequence[AnswerCase], concurrency: int = 8,
                          progress=None) -> list[RowResult]:
    """Run every case through ``assistant`` (at most ``concurrency`` conversations at once).

    Args:
        progress: called with each finished :class:`RowResult` (e.g. a progress bar's update).
    """
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(case: AnswerCase) -> RowResult:
        async with sem:
            try:
                r = await run_case(assistant, case)
            except ChatbotError as exc:  # one refused or failed turn is a wrong answer, not the end of the run
                log.warning("row %s failed: %s", case.id, exc)
                r = score_row(case, f"(error: {exc})", [], [], action="error", kind="error")
                r.correct = False
        if progress is not None:
            progress(r)
        return r

    return list(await asyncio.gather(*(one(c) for c in cases)))


def report(dataset: Path, runs: Sequence[tuple[str, dict, list[RowResult]]], info: dict) -> dict:
    """The JSON report: dataset path and hash, settings ``info`` (engine, model, adapter, index
    version, the documents' hash), and per run its summary and rows."""
    return {
        "dataset": str(dataset), "dataset_sha256": sha256_file(dataset), **info,
        "runs": [{"mode": m, "summary": s, "rows": [asdict(r) for r in rows]} for m, s, rows in runs],
    }
