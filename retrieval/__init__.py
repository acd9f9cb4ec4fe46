"""Retrieval: files -> documents -> heading-aware chunks -> embeddings -> versioned FAISS index -> search.

Public API: :class:`Document`, :class:`Chunk`, :class:`Hit`, :class:`Embedder`,
:class:`VectorIndex`, :class:`IndexOptions`, :class:`BM25Index`, :func:`ingest`,
:func:`ingest_documents`, :class:`IngestReport`, :class:`Retriever`,
:func:`chunk_document`, :func:`load_paths`. Evaluation lives in
:mod:`retrieval.evaluate` (imported on demand).
"""

from retrieval.bm25 import BM25Index
from retrieval.chunking import chunk_document
from retrieval.documents import Chunk, Document, Hit
from retrieval.embedder import Embedder
from retrieval.index import IndexOptions, VectorIndex
from retrieval.ingest import IngestReport, ingest, ingest_documents
from retrieval.loaders import load_paths
from retrieval.retriever import Retriever

__all__ = [
    "BM25Index",
    "Chunk",
    "Document",
    "Embedder",
    "Hit",
    "IndexOptions",
    "IngestReport",
    "Retriever",
    "VectorIndex",
    "chunk_document",
    "ingest",
    "ingest_documents",
    "load_paths",
]
