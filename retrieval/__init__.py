"""Retrieval: files -> documents -> heading-aware chunks -> embeddings -> versioned FAISS index -> search.

Public API: :class:`Document`, :class:`Chunk`, :class:`Hit`, :class:`Embedder`,
:class:`VectorIndex`, :func:`ingest`, :class:`IngestReport`, :class:`Retriever`,
:func:`chunk_document`, :func:`load_paths`.
"""

from retrieval.chunking import chunk_document
from retrieval.documents import Chunk, Document, Hit
from retrieval.embedder import Embedder
from retrieval.index import VectorIndex
from retrieval.ingest import IngestReport, ingest
from retrieval.loaders import load_paths
from retrieval.retriever import Retriever

__all__ = [
    "Chunk",
    "Document",
    "Embedder",
    "Hit",
    "IngestReport",
    "Retriever",
    "VectorIndex",
    "chunk_document",
    "ingest",
    "load_paths",
]
