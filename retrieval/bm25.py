"""Lexical search: BM25 over chunk texts with ``bm25s``.

``bm25s`` (sparse-matrix BM25, precomputed scores; maintained, MIT) is used
rather than ``rank_bm25``, which scores every document in Python per query and
has had no release since 2022. Text is lower-cased, split on word characters,
English stop words are dropped and words are Snowball-stemmed (PyStemmer), so
"refunds" matches "refund".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


class BM25Index:
    """BM25 (Okapi, k1=1.5, b=0.75) over ``texts``, answering with ``ids``.

    Args:
        ids: one int64 id per text (chunk ids).
        texts: the indexed texts (for chunks: title, heading path and text).

    Raises:
        ValueError: ``ids`` and ``texts`` differ in length.
    """

    def __init__(self, ids: Sequence[int], texts: Sequence[str]) -> None:
        import bm25s
        import Stemmer

        if len(ids) != len(texts):
            raise ValueError(f"ids and texts differ in length: {len(ids)} vs {len(texts)}")
        self._ids = np.asarray(ids, dtype=np.int64)
        self._stemmer = Stemmer.Stemmer("english")
        self._bm25 = None
        tokens = bm25s.tokenize(list(texts), stopwords="en", stemmer=self._stemmer, show_progress=False)
        if len(texts) and tokens.vocab:
            self._bm25 = bm25s.BM25()
            self._bm25.index(tokens, show_progress=False)

    def __len__(self) -> int:
        return len(self._ids)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """Best ``k`` ``(id, bm25 score)`` pairs, best first; only documents sharing a term with the query.

        Raises:
            ValueError: ``k < 1``.
        """
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        """:meth:`search` for each of ``queries``.

        Returns:
            One list per query, of at most ``min(k, len(self))`` pairs with score > 0, no duplicate ids.

        Raises:
            ValueError: ``k < 1``.
        """
        import bm25s

        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {k}")
        if self._bm25 is None or len(queries) == 0:
            return [[] for _ in queries]
        k = min(k, len(self._ids))
        toks = bm25s.tokenize(list(queries), stopwords="en", stemmer=self._stemmer, return_ids=False,
                              show_progress=False)
        out: list[list[tuple[int, float]]] = []
        for q in toks:
            if not q:
                out.append([])
                continue
            docs, scores = self._bm25.retrieve([q], k=k, show_progress=False, n_threads=1)
            out.append([(int(self._ids[d]), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0])
        return out
