"""Lexical search: BM25 over chunk texts with ``bm25s``.

``bm25s`` (sparse-matrix BM25, precomputed scores; maintained, MIT) is used
rather than ``rank_bm25``, which scores every document in Python per query and
has had no release since 2022.

Terms (:func:`bm25_terms`): text is NFKC-normalised (full-width Latin and digits,
half-width katakana become their usual forms) and lower-cased. Each run of CJK
characters (Han, kana, Hangul) becomes its characters plus its overlapping
character bigrams: Lucene's CJKBigramFilter with ``outputUnigrams``, which needs no
dictionary and serves Chinese, Japanese and Korean alike ("故乡" finds "低头思故乡",
"返品" finds "返品は30日以内です", "鞋" finds "运动鞋"). Everything else is split on
word characters, English stop words are dropped and words are Snowball-stemmed
(PyStemmer), so "refunds" matches "refund". Uni+bigrams were chosen over bigrams
alone, unigrams alone and jieba word segmentation by ``bench/cjk_bm25.py`` (numbers
in its docstring and in ``docs/retrieval.md``).

The BM25 index lives in memory and is rebuilt from the chunks when an index
version loads, so a change of terms needs no rebuild of index folders.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable, Sequence

import numpy as np
from chatbot.errors import RetrievalError

log = logging.getLogger(__name__)

# Han (ext. A, unified, compatibility, ext. B+), iteration marks 々〆〇, hiragana, katakana (incl. ー and the
# phonetic extensions), Hangul syllables and jamo. After NFKC, half-width katakana is full-width.
_CJK_RUN = re.compile(
    "[\u3005-\u3007\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\uac00-\ud7af\u1100-\u11ff\u3130-\u318f\U00020000-\U0002fa1f]+"
)

Analyzer = Callable[[Sequence[str]], list[list[str]]]
"""Texts -> one list of BM25 terms per text."""


def cjk_bigrams(run: str) -> list[str]:
    """Overlapping character bigrams of a CJK run (``"思故乡"`` -> ``["思故", "故乡"]``); one character -> itself."""
    if len(run) < 2:
        return [run] if run else []
    return [run[i : i + 2] for i in range(len(run) - 1)]


def cjk_unigrams_bigrams(run: str) -> list[str]:
    """Characters then overlapping bigrams of a CJK run (``"故乡"`` -> ``["故", "乡", "故乡"]``)."""
    return list(run) + cjk_bigrams(run) if len(run) > 1 else list(run)


def split_cjk(text: str) -> tuple[str, list[str]]:
    """``(text with each CJK run replaced by a space, the CJK runs in order)``."""
    runs = _CJK_RUN.findall(text)
    return _CJK_RUN.sub(" ", text), runs


def bm25_terms(
    texts: Sequence[str], cjk: Callable[[str], list[str]] = cjk_unigrams_bigrams
) -> list[list[str]]:
    """BM25 terms of each text: stemmed English-style words plus ``cjk(run)`` for each CJK run.

    Args:
        texts: documents or queries.
        cjk: terms of one CJK run (default :func:`cjk_unigrams_bigrams`).

    Returns:
        One list of terms per text (may be empty), in text order for the words, then the CJK terms.
    """
    import bm25s
    import Stemmer

    norm = [unicodedata.normalize("NFKC", t).lower() for t in texts]
    parts = [split_cjk(t) for t in norm]
    words = bm25s.tokenize([p[0] for p in parts], stopwords="en", stemmer=Stemmer.Stemmer("english"),
                           return_ids=False, show_progress=False)
    return [[w for w in ws if w] + [g for run in runs for g in cjk(run)] for ws, (_, runs) in zip(words, parts)]


class BM25Index:
    """BM25 (Okapi, k1=1.5, b=0.75) over ``texts``, answering with ``ids``.

    Args:
        ids: one int64 id per text (chunk ids).
        texts: the indexed texts (for chunks: title, heading path and text).
        analyzer: texts -> terms, used for ``texts`` and for queries (default :func:`bm25_terms`).

    Raises:
        RetrievalError: ``ids`` and ``texts`` differ in length.
    """

    def __init__(self, ids: Sequence[int], texts: Sequence[str], analyzer: Analyzer = bm25_terms) -> None:
        import bm25s

        if len(ids) != len(texts):
            raise RetrievalError(f"ids and texts differ in length: {len(ids)} vs {len(texts)}")
        self._ids = np.asarray(ids, dtype=np.int64)
        self._analyzer = analyzer
        self._bm25 = None
        terms = analyzer(list(texts)) if len(texts) else []
        if any(terms):
            self._bm25 = bm25s.BM25()
            self._bm25.index(terms, show_progress=False)

    def __len__(self) -> int:
        return len(self._ids)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """Best ``k`` ``(id, bm25 score)`` pairs, best first; only documents sharing a term with the query.

        Raises:
            RetrievalError: ``k < 1``.
        """
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        """:meth:`search` for each of ``queries``.

        Returns:
            One list per query, of at most ``min(k, len(self))`` pairs with score > 0, no duplicate ids.

        Raises:
            RetrievalError: ``k < 1``.
        """
        if k < 1:
            raise RetrievalError(f"top_k must be >= 1, got {k}")
        if self._bm25 is None or len(queries) == 0:
            return [[] for _ in queries]
        k = min(k, len(self._ids))
        out: list[list[tuple[int, float]]] = []
        for q in self._analyzer(list(queries)):
            q = [t for t in q if t in self._bm25.vocab_dict]
            if not q:
                out.append([])
                continue
            docs, scores = self._bm25.retrieve([q], k=k, show_progress=False, n_threads=1)
            out.append([(int(self._ids[d]), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0])
        return out
