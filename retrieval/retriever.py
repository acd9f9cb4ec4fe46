"""Dense, BM25 and hybrid retrieval over the published index version, following new versions without a restart.

Modes (per request, default ``Settings.retrieval_mode``):

* ``dense``: cosine similarity of MiniLM embeddings (FAISS inner product on normalised vectors).
* ``bm25``: lexical BM25 (:mod:`retrieval.bm25`) over title, heading path and chunk text.
* ``hybrid``: both, each to depth ``hybrid_candidates``, fused by reciprocal rank fusion:
  ``fused = sum over the two rankings of 1 / (rrf_k + rank)`` (Cormack et al., 2009).

``min_score`` is a cosine threshold in every mode: a hit whose dense cosine with
the query is below it is dropped, whatever its BM25 or fused rank. In hybrid and
BM25 mode the cosine of a chunk found only by BM25 is computed from its stored
vector. So a lexical match on an unrelated passage ("order" in a shipping FAQ)
cannot lift it above the "no source" line, and the assistant says it has no source
instead of guessing. ``Hit.score`` is always that cosine.

Default mode: ``dense``. On DSTC11 Track 5 val (2,129 knowledge-seeking turns over
10,882 FAQ and review snippets, ``chatbot eval retrieval --dataset dstc11_track5``)
dense beats both BM25 and RRF hybrid (recall@10 0.163 / 0.072 / 0.132 on the last
turn; 0.330 / 0.070 / 0.223 with context), and weighting the fusion towards dense
(0.7-0.9) only ties dense. Hybrid stays one setting away for collections with
exact identifiers (order numbers, product codes), where BM25 finds what embeddings blur.

The BM25 index of a version is built in memory from its chunks when the version is
loaded (unless the default mode is dense; then on the first BM25/hybrid request):
about 1-2 s per 10k chunks on one core.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np

from chatbot.errors import RetrievalError, RetrievalIndexError
from retrieval.documents import Hit
from retrieval.embedder import Embedder
from retrieval.index import IndexOptions, IndexVersion, current_version_name, load_version

log = logging.getLogger(__name__)

MODES = ("dense", "bm25", "hybrid")


@dataclass(frozen=True)
class SearchOptions:
    """How a :class:`Retriever` searches (built from ``Settings`` by :func:`chatbot.options.search_options`).

    Attributes:
        mode: default search, ``"dense"`` (cosine), ``"bm25"`` (lexical) or ``"hybrid"`` (reciprocal rank fusion).
        rrf_k: reciprocal rank fusion constant, score = sum 1 / (rrf_k + rank) (Cormack et al., SIGIR 2009); >= 1.
        hybrid_candidates: hits taken from each of dense and BM25 before fusion; >= 1.
        index: how vector indexes are searched (efSearch, device).

    Raises:
        RetrievalError: a field is out of range; the message names it and the value.
    """

    mode: str = "dense"
    rrf_k: int = 60
    hybrid_candidates: int = 50
    index: IndexOptions = field(default_factory=IndexOptions)

    def __post_init__(self) -> None:
        _check_mode(self.mode)
        if self.rrf_k < 1:
            raise RetrievalError(f"rrf_k must be >= 1, got {self.rrf_k}")
        if self.hybrid_candidates < 1:
            raise RetrievalError(f"hybrid_candidates must be >= 1, got {self.hybrid_candidates}")


class Retriever:
    """Search the published index version of ``index_dir``.

    Before each search the ``CURRENT`` pointer is read (one small file); when it
    names a new version, one caller loads it (vectors, chunks and, unless the
    default mode is dense, the BM25 index) while concurrent searches keep using the
    old version; then the new one is swapped in whole. A running server thus
    follows ``chatbot ingest`` without a restart and never sees a half-built index.
    A version that fails to load is logged and skipped; the old one stays in use
    until ``CURRENT`` changes again.

    Args:
        index_dir: the index directory written by :func:`retrieval.ingest.ingest`.
        embedder: the embedder the index was built with.
        options: default mode, fusion and index options (:class:`SearchOptions`); None: its defaults.
    """

    def __init__(self, index_dir: Path, embedder: Embedder, options: SearchOptions | None = None) -> None:
        options = options or SearchOptions()
        self.index_dir = Path(index_dir)
        self.embedder = embedder
        self.mode = options.mode
        self.rrf_k = options.rrf_k
        self.candidates = options.hybrid_candidates
        self.index_options = options.index
        self._version: IndexVersion | None = None
        self._failed: str | None = None
        self._lock = threading.Lock()

    @property
    def version(self) -> str | None:
        """Name of the loaded index version (None when nothing is published)."""
        v = self.refresh()
        return v.version if v else None

    def refresh(self) -> IndexVersion | None:
        """Load the published version if it changed; return the one to search.

        Raises:
            RetrievalIndexError: the published version is unreadable and no older one is loaded.
        """
        name = current_version_name(self.index_dir)
        cur = self._version
        if (cur is not None and cur.version == name) or (cur is None and name is None) or name == self._failed:
            return cur
        if cur is not None and not self._lock.acquire(blocking=False):
            return cur  # another thread is loading the new version; serve the old one meanwhile
        if cur is None:
            self._lock.acquire()
        try:
            if self._version is not None and self._version.version == name:
                return self._version
            if name is None:
                self._version = None
                return None
            try:
                new = load_version(self.index_dir, name, self.index_options)
                if new is not None and self.mode != "dense":
                    new.bm25()
            except RetrievalIndexError:
                if self._version is None:
                    raise
                log.exception("index version %s failed to load; staying on %s", name, self._version.version)
                self._failed = name
                return self._version
            self._version, self._failed = new, None
            log.info("retriever now on index version %s", name)
            return new
        finally:
            self._lock.release()

    def search(self, query: str, top_k: int = 4, min_score: float | None = None, mode: str | None = None) -> list[Hit]:
        """Return up to ``top_k`` chunks for ``query``, best first.

        Args:
            query: the customer's text.
            top_k: most hits (>= 1); fewer when the index is smaller or ``min_score`` drops some.
            min_score: drop hits whose dense cosine with the query is below this (in every mode).
            mode: ``"dense"``, ``"bm25"`` or ``"hybrid"``; None uses the configured default.

        Returns:
            Hits with distinct chunk ids and ranks 1..n; empty for an empty index.

        Raises:
            RetrievalError (a ValueError): ``top_k < 1`` or an unknown ``mode``.
            RetrievalIndexError: the published index is unreadable.
        """
        return self.search_batch([query], top_k, min_score, mode)[0]

    def search_batch(
        self,
        queries: Sequence[str],
        top_k: int = 4,
        min_score: float | None = None,
        mode: str | None = None,
        query_vectors: np.ndarray | None = None,
    ) -> list[list[Hit]]:
        """:meth:`search` for many queries, embedding them in one batch (evaluation, bulk jobs).

        Args:
            queries, top_k, min_score, mode: as :meth:`search`.
            query_vectors: the queries' embeddings, (len(queries), dim), when already computed.

        Returns:
            One hit list per query, in the order given.

        Raises:
            RetrievalError (a ValueError): ``top_k < 1``, an unknown ``mode`` or ``query_vectors`` of the wrong shape.
        """
        if top_k < 1:
            raise RetrievalError(f"top_k must be >= 1, got {top_k}")
        mode = _check_mode(mode or self.mode)
        queries = list(queries)
        v = self.refresh()
        if v is None or len(v.index) == 0 or not queries:
            return [[] for _ in queries]
        if query_vectors is None:
            qvecs = self.embedder.encode(queries)
        else:
            qvecs = np.asarray(query_vectors, dtype=np.float32)
            if qvecs.shape != (len(queries), v.index.dim):
                raise RetrievalError(
                    f"query_vectors must have shape ({len(queries)}, {v.index.dim}), got {qvecs.shape}"
                )
            qvecs = qvecs / np.maximum(np.linalg.norm(qvecs, axis=1, keepdims=True), 1e-12)
        # hybrid fuses two deep lists; a threshold may drop hits, so look deeper than top_k then too
        depth = top_k if mode != "hybrid" and min_score is None else max(top_k, self.candidates)
        dense: list[list[tuple[int, float]]] = [[] for _ in queries]
        if mode in ("dense", "hybrid"):
            scores, ids = v.index.search(qvecs, depth)
            dense = [list(zip(i.tolist(), s.tolist())) for s, i in zip(scores, ids)]
        lexical: list[list[tuple[int, float]]] = [[] for _ in queries]
        if mode in ("bm25", "hybrid"):
            lexical = v.bm25().search_batch(queries, depth)
        return [
            self._rank(v, qvecs[qi], dense[qi], lexical[qi], mode, top_k, min_score) for qi in range(len(queries))
        ]

    def _rank(
        self,
        v: IndexVersion,
        qvec: np.ndarray,
        dense: list[tuple[int, float]],
        lexical: list[tuple[int, float]],
        mode: str,
        top_k: int,
        min_score: float | None,
    ) -> list[Hit]:
        cosine = dict(dense)
        bm25 = dict(lexical)
        missing = [cid for cid in bm25 if cid not in cosine]
        if missing:
            vecs = v.index.reconstruct(np.array(missing, dtype=np.int64))
            cosine.update(zip(missing, (vecs @ qvec).astype(float).tolist()))
        fused: dict[int, float] = {}
        if mode == "dense":
            order = [cid for cid, _ in dense]
        elif mode == "bm25":
            order = [cid for cid, _ in lexical]
        else:
            for ranking in (dense, lexical):
                for rank, (cid, _) in enumerate(ranking, 1):
                    fused[cid] = fused.get(cid, 0.0) + 1.0 / (self.rrf_k + rank)
            order = sorted(fused, key=lambda c: (-fused[c], -cosine[c], c))
        hits: list[Hit] = []
        for cid in order:
            score = cosine[cid]
            if min_score is not None and score < min_score:
                continue
            c = v.chunks[cid]
            hits.append(
                Hit(cid, c.doc_id, c.title, c.source, c.text, float(score), rank=len(hits) + 1, mode=mode,
                    bm25_score=bm25.get(cid), fused_score=fused.get(cid), headings=list(c.headings), url=c.url)
            )
            if len(hits) == top_k:
                break
        return hits


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise RetrievalError(f"retrieval_mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode
