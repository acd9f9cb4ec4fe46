"""Dense retrieval over the published index version, switching to a new version without a restart."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from retrieval.documents import Hit
from retrieval.embedder import Embedder
from retrieval.index import IndexVersion, current_version_name, load_version

log = logging.getLogger(__name__)


class Retriever:
    """Search the published index version of ``index_dir``.

    Before each search the ``CURRENT`` pointer is read (one small file); when it
    names a new version, that version is loaded and swapped in whole, so a
    running server follows ``chatbot ingest`` without a restart and never sees a
    half-built index.

    Args:
        index_dir: the index directory written by :func:`retrieval.ingest.ingest`.
        embedder: the embedder the index was built with.
    """

    def __init__(self, index_dir: Path, embedder: Embedder) -> None:
        self.index_dir = Path(index_dir)
        self.embedder = embedder
        self._version: IndexVersion | None = None
        self._lock = threading.Lock()

    @property
    def version(self) -> str | None:
        """Name of the loaded index version (None when nothing is published)."""
        self.refresh()
        return self._version.version if self._version else None

    def refresh(self) -> IndexVersion | None:
        """Load the published version if it changed; return the one in use."""
        name = current_version_name(self.index_dir)
        cur = self._version
        if cur is not None and cur.version == name:
            return cur
        with self._lock:
            if self._version is None or self._version.version != name:
                self._version = load_version(self.index_dir, name) if name else None
                if self._version:
                    log.info("retriever now on index version %s", name)
            return self._version

    def search(self, query: str, top_k: int = 4, min_score: float | None = None) -> list[Hit]:
        """Return up to ``top_k`` chunks most similar to ``query`` (cosine, best first).

        Args:
            query: the customer's text.
            top_k: most hits (>= 1); fewer when the index is smaller.
            min_score: drop hits whose cosine is below this.

        Returns:
            Hits with distinct chunk ids and ranks 1..n; empty for an empty index.

        Raises:
            ValueError: ``top_k < 1``.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        v = self.refresh()
        if v is None or len(v.index) == 0:
            return []
        q = self.embedder.encode([query])
        scores, ids = v.index.search(q, top_k)
        hits: list[Hit] = []
        for score, cid in zip(scores[0].tolist(), ids[0].tolist()):
            if cid < 0 or (min_score is not None and score < min_score):
                continue
            c = v.chunks[cid]
            hits.append(Hit(cid, c.doc_id, c.title, c.source, c.text, float(score), rank=len(hits) + 1))
        return hits
