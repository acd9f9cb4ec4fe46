"""Retrieval evaluation: recall@k, hit@k and MRR of dense, BM25 and hybrid search on labelled queries.

Datasets:

* ``dstc11_track5`` (:func:`load_dstc11_track5`): DSTC11 Track 5 validation split.
  The corpus is every FAQ (question and answer) and every review sentence of
  ``knowledge.json``, one document each, titled with the hotel's or restaurant's
  name (``hotel/20/faq/3``, ``restaurant/19250/review/0/4``); the queries are the
  last user turns of the knowledge-seeking instances of ``val/`` (``target``
  true), optionally followed by earlier turns (``with_context``); the gold set
  is the instance's ``knowledge`` list.
* Generic JSONL (:func:`load_jsonl`): one ``{"query": str, "gold": [doc_id, ...]}``
  object per line (optional ``"id"``), where the doc ids are those of the index
  being searched (for files: the path relative to the ingested folder).

Metrics (per query, then averaged over queries), on the ranked list of distinct
document ids (chunks of one document count once, at their best rank):

* ``recall@k`` = |gold within the top k| / |gold|;
* ``hit@k`` = 1 if any gold document is within the top k, else 0;
* ``mrr`` = 1 / rank of the first gold document within the top ``max(ks)``, else 0
  (MRR@10 with the default ks).

These three are a few lines of plain Python; an evaluation library (``ranx``,
``pytrec_eval``) would add numba or a C build to the install for no gain, so they
are written here and pinned by hand-computed values in the tests.

:func:`run_eval` ties it together: ingest the corpus into its own index folder
(incremental, so a second run embeds nothing), then score each mode.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from chatbot.errors import RetrievalError, RetrievalIndexError
from chatbot.jsonl import iter_jsonl
from retrieval.documents import Document
from retrieval.ingest import ingest_documents
from retrieval.retriever import Retriever, SearchOptions

log = logging.getLogger(__name__)

#: Default location of the shared datasets (``<repo>/../shared/data``).
DEFAULT_DATA_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DEFAULT_KS = (1, 5, 10)


@dataclass(frozen=True)
class EvalQuery:
    """One labelled query.

    Attributes:
        qid: identifier (line number, or the instance index for DSTC11).
        text: the query text as given to the retriever.
        gold: relevant document ids (non-empty).
    """

    qid: str
    text: str
    gold: frozenset[str]


@dataclass
class EvalSet:
    """Queries, and the corpus to index for them (None: search an existing index)."""

    name: str
    queries: list[EvalQuery]
    documents: list[Document] | None = None
    info: dict = field(default_factory=dict)


# --- metrics
def _check_k(k: int) -> None:
    if k < 1:
        raise RetrievalError(f"k must be >= 1, got {k}")


def recall_at_k(ranked: Sequence[str], gold: set[str] | frozenset[str], k: int) -> float:
    """Fraction of ``gold`` among the first ``k`` of ``ranked``; 0.0 for an empty gold set.

    Raises:
        RetrievalError: ``k < 1``.
    """
    _check_k(k)
    if not gold:
        return 0.0
    return len(gold.intersection(ranked[:k])) / len(gold)


def hit_at_k(ranked: Sequence[str], gold: set[str] | frozenset[str], k: int) -> float:
    """1.0 when any of ``gold`` is among the first ``k`` of ``ranked``, else 0.0.

    Raises:
        RetrievalError: ``k < 1``.
    """
    _check_k(k)
    return 1.0 if gold.intersection(ranked[:k]) else 0.0


def reciprocal_rank(ranked: Sequence[str], gold: set[str] | frozenset[str], k: int | None = None) -> float:
    """1 / (1-based rank of the first gold id in ``ranked[:k]``), or 0.0 when none is there."""
    for i, doc_id in enumerate(ranked[:k] if k else ranked, 1):
        if doc_id in gold:
            return 1.0 / i
    return 0.0


def score_rankings(
    rankings: Sequence[Sequence[str]], golds: Sequence[frozenset[str]], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Mean ``recall@k``, ``hit@k`` (for each k) and ``mrr`` (within the top ``max(ks)``) over queries.

    Args:
        rankings: per query, document ids best first (distinct).
        golds: per query, the relevant ids.
        ks: cut-offs (each >= 1).

    Returns:
        ``{"recall@1": .., "hit@1": .., ..., "mrr": .., "queries": n}``; zeros for no queries.

    Raises:
        RetrievalError: lengths differ or a k < 1.
    """
    if len(rankings) != len(golds):
        raise RetrievalError(f"rankings and golds differ in length: {len(rankings)} vs {len(golds)}")
    for k in ks:
        _check_k(k)
    n = len(rankings)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = sum(recall_at_k(r, g, k) for r, g in zip(rankings, golds)) / n if n else 0.0
    for k in ks:
        out[f"hit@{k}"] = sum(hit_at_k(r, g, k) for r, g in zip(rankings, golds)) / n if n else 0.0
    depth = max(ks)
    out["mrr"] = sum(reciprocal_rank(r, g, depth) for r, g in zip(rankings, golds)) / n if n else 0.0
    out["queries"] = n
    return out


# --- datasets
def _dstc_doc_id(domain: str, entity_id, doc_type: str, doc_id, sent_id=None) -> str:
    base = f"{domain}/{entity_id}/{doc_type}/{doc_id}"
    return base if sent_id is None else f"{base}/{sent_id}"


def load_dstc11_track5(
    root: Path | None = None, with_context: bool = False, context_turns: int = 4
) -> EvalSet:
    """The DSTC11 Track 5 validation split as an :class:`EvalSet` (see the module notes).

    Args:
        root: folder with ``knowledge.json`` and ``val/{logs,labels}.json``
            (default ``<repo>/../shared/data/dstc11_track5``).
        with_context: append up to ``context_turns`` earlier turns, most recent first,
            after the last user turn (the last turn comes first, so truncation by the
            embedder cuts old context, never the question).
        context_turns: earlier turns appended when ``with_context`` (>= 1).

    Raises:
        DocumentNotFoundError: a file is missing.
        RetrievalError: logs and labels differ in length, or ``context_turns < 1``.
    """
    root = Path(root) if root else DEFAULT_DATA_ROOT / "dstc11_track5"
    if context_turns < 1:
        raise RetrievalError(f"context_turns must be >= 1, got {context_turns}")
    knowledge = json.loads((root / "knowledge.json").read_text(encoding="utf-8"))
    logs = json.loads((root / "val" / "logs.json").read_text(encoding="utf-8"))
    labels = json.loads((root / "val" / "labels.json").read_text(encoding="utf-8"))
    if len(logs) != len(labels):
        raise RetrievalError(f"val/logs.json has {len(logs)} instances but val/labels.json {len(labels)}")
    docs: list[Document] = []
    for domain, entities in knowledge.items():
        for entity_id, ent in entities.items():
            name = str(ent.get("name") or f"{domain} {entity_id}")
            for faq_id, faq in (ent.get("faqs") or {}).items():
                did = _dstc_doc_id(domain, entity_id, "faq", faq_id)
                docs.append(Document(did, name, f"dstc11_track5 knowledge.json {did}",
                                     f"{faq['question']}\n{faq['answer']}", format="text"))
            for rev_id, rev in (ent.get("reviews") or {}).items():
                for sent_id, sent in rev.get("sentences", {}).items():
                    did = _dstc_doc_id(domain, entity_id, "review", rev_id, sent_id)
                    docs.append(Document(did, name, f"dstc11_track5 knowledge.json {did}", sent, format="text"))
    queries: list[EvalQuery] = []
    for i, (turns, label) in enumerate(zip(logs, labels)):
        if not label.get("target"):
            continue
        gold = frozenset(
            _dstc_doc_id(k["domain"], k["entity_id"], k["doc_type"], k["doc_id"], k.get("sent_id"))
            for k in label.get("knowledge", [])
        )
        if not gold:
            continue
        text = turns[-1]["text"]
        if with_context:
            earlier = [t["text"] for t in reversed(turns[:-1])][:context_turns]
            text = " ".join([text, *earlier])
        queries.append(EvalQuery(str(i), text, gold))
    info = {"root": str(root), "with_context": with_context, "context_turns": context_turns if with_context else 0,
            "documents": len(docs), "instances": len(logs)}
    return EvalSet("dstc11_track5", queries, docs, info)


def load_jsonl(path: Path) -> EvalSet:
    """Labelled queries from a JSONL file: ``{"query": str, "gold": [doc_id, ...], "id"?: str}`` per line.

    Blank lines are ignored.

    Raises:
        FileNotFoundError: no such file.
        DataError: a line is not a JSON object (:func:`chatbot.jsonl.iter_jsonl`).
        RetrievalError: a line lacks a non-empty ``query``/``gold``; the message names the line.
    """
    path = Path(path)
    queries: list[EvalQuery] = []
    for n, row in iter_jsonl(path):
        q, gold = row.get("query"), row.get("gold")
        if not isinstance(q, str) or not q.strip():
            raise RetrievalError(f"{path}:{n}: 'query' must be a non-empty string, got {q!r}")
        if isinstance(gold, str):
            gold = [gold]
        if not isinstance(gold, list) or not gold:
            raise RetrievalError(f"{path}:{n}: 'gold' must be a non-empty list of doc ids, got {gold!r}")
        queries.append(EvalQuery(str(row.get("id", n)), q, frozenset(str(g) for g in gold)))
    return EvalSet(path.stem, queries, None, {"path": str(path)})


# --- running
def _doc_ranking(hits, depth: int) -> list[str]:
    ranked: list[str] = []
    for h in hits:
        if h.doc_id not in ranked:
            ranked.append(h.doc_id)
            if len(ranked) == depth:
                break
    return ranked


def evaluate(
    retriever,
    queries: Sequence[EvalQuery],
    modes: Sequence[str] = ("dense", "bm25", "hybrid"),
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 256,
    show_progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Run ``queries`` through ``retriever`` in each mode and score them.

    Queries are embedded once and shared by the modes. Each query retrieves
    ``3 * max(ks)`` chunks (no ``min_score``), folded into distinct document ids.
    ``ms_per_query`` is the mean time per query: embedding plus that mode's search.

    Args:
        retriever: a :class:`~retrieval.retriever.Retriever` over the corpus.
        queries: labelled queries.
        modes: search modes to compare.
        ks: recall/hit cut-offs.
        batch_size: queries embedded per batch (>= 1).
        show_progress: tqdm bar per mode.

    Returns:
        ``{mode: {"recall@1": .., ..., "mrr": .., "queries": n, "ms_per_query": ..}}``.

    Raises:
        RetrievalError: ``batch_size < 1``, a bad k or an unknown mode.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise RetrievalError(f"batch_size must be >= 1, got {batch_size}")
    depth = max(ks)
    results: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    qvecs = retriever.embedder.encode([q.text for q in queries], show_progress=show_progress)
    embed_ms = 1000 * (time.perf_counter() - t0) / max(len(queries), 1)
    for mode in modes:
        rankings: list[list[str]] = []
        t0 = time.perf_counter()
        for start in tqdm(range(0, len(queries), batch_size), desc=f"eval {mode}", unit="batch",
                          disable=not show_progress):
            batch = queries[start : start + batch_size]
            hits = retriever.search_batch([q.text for q in batch], top_k=3 * depth, mode=mode,
                                          query_vectors=qvecs[start : start + batch_size])
            rankings.extend(_doc_ranking(h, depth) for h in hits)
        elapsed = time.perf_counter() - t0
        scores = score_rankings(rankings, [q.gold for q in queries], ks)
        scores["ms_per_query"] = embed_ms + 1000 * elapsed / max(len(queries), 1)
        results[mode] = scores
        log.info("%s: %s", mode, {k: round(v, 4) for k, v in scores.items()})
    return results


def format_table(results: dict[str, dict[str, float]], ks: Sequence[int] = DEFAULT_KS) -> str:
    """A plain-text table: one row per mode, columns recall@k, hit@k, MRR, ms/query."""
    cols = [f"recall@{k}" for k in ks] + [f"hit@{k}" for k in ks] + ["mrr", "ms_per_query"]
    heads = ["mode", *[c.replace("ms_per_query", "ms/query") for c in cols]]
    rows = [[mode, *[f"{r.get(c, float('nan')):.{1 if c == 'ms_per_query' else 4}f}" for c in cols]]
            for mode, r in results.items()]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(heads), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def run_eval(
    evalset: EvalSet,
    embedder,
    index_dir: Path,
    options: SearchOptions | None = None,
    modes: Sequence[str] = ("dense", "bm25", "hybrid"),
    chunk_tokens: int = 200,
    chunk_overlap: int = 32,
    ks: Sequence[int] = DEFAULT_KS,
    show_progress: bool = False,
) -> dict:
    """Index ``evalset.documents`` into ``index_dir`` (when it has a corpus), then :func:`evaluate`.

    Args:
        evalset: queries and optional corpus.
        embedder: a :class:`~retrieval.embedder.Embedder`.
        index_dir: index folder for the corpus (mirrors it: other documents are removed),
            or the existing index to search when the set has no corpus.
        options: fusion and index options (:class:`retrieval.retriever.SearchOptions`; None: its defaults).
        modes, ks, show_progress: as :func:`evaluate`.
        chunk_tokens, chunk_overlap: chunk size and overlap in embedder tokens for the corpus.

    Returns:
        A JSON-ready dict: dataset, info, index version and kind, embedder, options, and
        ``results`` ``{mode: metrics}``.

    Raises:
        RetrievalIndexError: nothing is indexed at ``index_dir``.
    """
    options = options or SearchOptions()
    t0 = time.perf_counter()
    ingest_info = None
    if evalset.documents is not None:
        report = ingest_documents(
            evalset.documents, index_dir, embedder, chunk_tokens, chunk_overlap,
            sync=True, roots=None, show_progress=show_progress, index_options=options.index,
        )
        ingest_info = {"summary": report.summary(), "chunks": report.chunks_total, "embedded": report.chunks_embedded,
                       "seconds": round(time.perf_counter() - t0, 2)}
        log.info("%s", report.summary())
    retriever = Retriever(index_dir, embedder, options)
    version = retriever.refresh()
    if version is None or len(version.index) == 0:
        raise RetrievalIndexError(f"no documents indexed at {index_dir}; ingest a corpus first (or pass --docs)")
    results = evaluate(retriever, evalset.queries, modes, ks, show_progress=show_progress)
    return {
        "dataset": evalset.name,
        "info": evalset.info,
        "queries": len(evalset.queries),
        "index_dir": str(index_dir),
        "index_version": version.version,
        "index": version.index.describe(),
        "chunks": len(version.index),
        "embedder": embedder.name,
        "options": {"rrf_k": options.rrf_k, "hybrid_candidates": options.hybrid_candidates,
                    "chunk_tokens": chunk_tokens, "chunk_overlap": chunk_overlap},
        "ingest": ingest_info,
        "ks": list(ks),
        "results": results,
    }
