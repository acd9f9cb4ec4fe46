"""Incremental, idempotent ingestion: files -> documents -> chunks -> embeddings -> a new index version.

Chunk ids derive from content, so ingesting the same files twice changes
nothing (no new version is published); a changed file's old chunks are
replaced; with ``sync=True`` documents that were ingested from the same root but
are gone from it are removed. Vectors of unchanged chunks are copied from the
current version instead of being embedded again.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval.chunking import chunk_document
from retrieval.documents import Chunk
from retrieval.embedder import Embedder
from retrieval.index import VectorIndex, load_version, publish_version
from retrieval.loaders import Skipped, load_paths

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    """What an ingest did.

    Attributes:
        version: the published version (the unchanged current one when nothing changed;
            None when the index is still empty).
        published: True when a new version was written.
        added, updated, removed, unchanged: document ids in each state.
        chunks_total: chunks in the resulting version.
        chunks_embedded: chunks embedded in this run (new or changed text).
        skipped: files not ingested, with reasons.
    """

    version: str | None
    published: bool
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    chunks_total: int = 0
    chunks_embedded: int = 0
    skipped: list[Skipped] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the CLI."""
        return (
            f"index {self.version or '(empty)'}{' (new)' if self.published else ' (unchanged)'}: "
            f"{len(self.added)} added, {len(self.updated)} updated, {len(self.removed)} removed, "
            f"{len(self.unchanged)} unchanged documents; {self.chunks_total} chunks "
            f"({self.chunks_embedded} embedded); {len(self.skipped)} files skipped"
        )


def ingest(
    paths: Iterable[Path],
    index_dir: Path,
    embedder: Embedder,
    chunk_tokens: int = 200,
    overlap_tokens: int = 32,
    sync: bool = False,
    show_progress: bool = False,
) -> IngestReport:
    """Ingest files and folders into the versioned index at ``index_dir``.

    Args:
        paths: files or folders (Markdown and text; see :mod:`retrieval.loaders`).
        index_dir: the index directory (created when missing).
        embedder: the embedder; must match the current version's embedder and dim.
        chunk_tokens, overlap_tokens: chunking bounds in embedder tokens.
        sync: also remove documents previously ingested from these roots that no longer exist.
        show_progress: show a progress bar while embedding.

    Raises:
        FileNotFoundError: a named path does not exist.
        RetrievalIndexError: the current version is unreadable.
        ValueError: the current version was built with another embedder or chunking.
    """
    paths = [Path(p) for p in paths]
    roots = {str(p.resolve()) if p.is_dir() else str(p.resolve().parent) for p in paths}
    docs, skipped = load_paths(paths)
    current = load_version(index_dir)
    chunking = {"chunk_tokens": chunk_tokens, "overlap_tokens": overlap_tokens, "method": "heading-aware"}
    old_docs: dict[str, dict] = {}
    old_chunks: dict[int, Chunk] = {}
    if current is not None:
        m = current.manifest
        if m.get("embedder") != embedder.name or m.get("dim") != embedder.dim:
            raise ValueError(
                f"index {current.version} was built with embedder {m.get('embedder')!r} ({m.get('dim')} dims); "
                f"got {embedder.name!r} ({embedder.dim} dims): ingest into a new index_dir"
            )
        if m.get("chunking") != chunking:
            raise ValueError(f"index {current.version} used chunking {m.get('chunking')}, got {chunking}")
        old_docs = dict(m.get("documents", {}))
        old_chunks = current.chunks

    report = IngestReport(version=current.version if current else None, published=False, skipped=skipped)
    new_docs: dict[str, dict] = {}
    keep_chunks: list[Chunk] = []
    fresh_chunks: list[Chunk] = []
    seen: set[str] = set()
    for doc in docs:
        seen.add(doc.doc_id)
        file_path = Path(doc.metadata.get("path", doc.source)).resolve()
        root = next((r for r in sorted(roots, key=len, reverse=True) if file_path.is_relative_to(r)), None)
        entry = {"sha256": doc.sha256, "title": doc.title, "source": doc.source, "root": root}
        prev = old_docs.get(doc.doc_id)
        if prev is not None and prev.get("sha256") == doc.sha256:
            ids = prev.get("chunk_ids", [])
            if all(i in old_chunks for i in ids):
                keep_chunks.extend(old_chunks[i] for i in ids)
                new_docs[doc.doc_id] = {**entry, "root": prev.get("root", root), "chunk_ids": ids}
                report.unchanged.append(doc.doc_id)
                continue
        chunks = chunk_document(doc, embedder.count_tokens, chunk_tokens, overlap_tokens)
        new_docs[doc.doc_id] = {**entry, "chunk_ids": [c.chunk_id for c in chunks]}
        (report.updated if prev is not None else report.added).append(doc.doc_id)
        fresh_chunks.extend(chunks)
    for doc_id, prev in old_docs.items():
        if doc_id in seen:
            continue
        if sync and prev.get("root") in roots:
            report.removed.append(doc_id)
            continue
        ids = prev.get("chunk_ids", [])
        keep_chunks.extend(old_chunks[i] for i in ids if i in old_chunks)
        new_docs[doc_id] = prev

    all_chunks = keep_chunks + fresh_chunks
    report.chunks_total = len(all_chunks)
    if not (report.added or report.updated or report.removed):
        log.info("nothing changed")
        return report

    reuse = [c for c in fresh_chunks if c.chunk_id in old_chunks]
    embed = [c for c in fresh_chunks if c.chunk_id not in old_chunks]
    report.chunks_embedded = len(embed)
    index = VectorIndex(embedder.dim)
    if keep_chunks or reuse:
        ids = np.array([c.chunk_id for c in keep_chunks + reuse], dtype=np.int64)
        index.add(ids, current.index.reconstruct(ids))
    if embed:
        vecs = embedder.encode([c.embedding_text() for c in embed], show_progress=show_progress)
        index.add(np.array([c.chunk_id for c in embed], dtype=np.int64), vecs)
    ordered = sorted(all_chunks, key=lambda c: (c.doc_id, c.position))
    manifest = {
        "embedder": embedder.name,
        "dim": embedder.dim,
        "normalized": True,
        "metric": "inner_product (cosine)",
        "index_type": "IndexIDMap2(IndexFlatIP)",
        "chunking": chunking,
        "document_count": len(new_docs),
        "documents": new_docs,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "parent_version": current.version if current else None,
    }
    report.version = publish_version(index_dir, index, ordered, manifest)
    report.published = True
    return report
