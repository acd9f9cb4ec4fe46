"""The organs' options, built from :class:`chatbot.config.Settings` (service layer).

Organs (``retrieval``, ``finetune``, ``chatbot.engines``, ``chatbot.store``) never read ``Settings``: they take
frozen option dataclasses and paths. This module is the one place that turns settings into those options, so a
new retrieval or training setting is wired here and nowhere else.
"""

from __future__ import annotations

from chatbot.config import Settings
from retrieval.index import IndexOptions
from retrieval.retriever import SearchOptions


def index_options(settings: Settings) -> IndexOptions:
    """How vector indexes are built and searched: ``ann_threshold``, ``hnsw_*`` and ``index_device``.

    Raises:
        RetrievalError: a value is out of range (Settings validates them first, so only for hand-built settings).
    """
    return IndexOptions(
        ann_threshold=settings.ann_threshold,
        hnsw_m=settings.hnsw_m,
        hnsw_ef_construction=settings.hnsw_ef_construction,
        hnsw_ef_search=settings.hnsw_ef_search,
        device=settings.index_device,
    )


def build_embedder(settings: Settings):
    """The configured sentence embedder (:class:`retrieval.embedder.Embedder`), its model resolved to a local folder
    (the embedded MiniLM by default; :func:`chatbot.assets.resolve_embedder`).

    Raises:
        ModelAssetError: the embedded model cannot be found or prepared.
    """
    from chatbot.assets import resolve_embedder
    from retrieval.embedder import Embedder

    return Embedder(resolve_embedder(settings), name=settings.embedder)


def search_options(settings: Settings) -> SearchOptions:
    """How the retriever searches: ``retrieval_mode``, ``rrf_k``, ``hybrid_candidates`` and :func:`index_options`."""
    return SearchOptions(mode=settings.retrieval_mode, rrf_k=settings.rrf_k,
                         hybrid_candidates=settings.hybrid_candidates, index=index_options(settings))
