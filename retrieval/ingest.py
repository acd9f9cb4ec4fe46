"""Incremental, idempotent ingestion: files -> documents -> chunks -> embeddings -> a new index version.

Chunk ids derive from content, so ingesting the same files twice changes
nothing (no new version is published); a changed file's old chunks are
replaced; with ``sync=True`` documents that were ingested from the same root but
are gone from it are removed. Vectors of unchanged chunks are copied from the
current version instead of being embedded again.

Each document's manifest entry records the ``chunker_version`` that cut it
(:data:`retrieval.chunking.CHUNKER_VERSION`; entries without one are version 1). A
document cut by an older chunker is re-chunked the next time it is ingested, even
when its file is unchanged (reported as updated); its chunks whose text did not
change keep their ids and vectors, so only text the new rules cut differently
(such as long Chinese or Japanese paragraphs) is embedded again.

Every change builds a whole new index (flat or HNSW by size, see
:mod:`retrieval.index`) and publishes it as a new version beside the old one; the
``CURRENT`` pointer is swapped atomically, and a running :class:`~retrieval.retriever.Retriever`
picks the new version up on its next search. Writers of one index folder (API replicas on
shared storage, the CLI beside a server) take turns: each builds on the version the one before published.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chatbot.errors import RetrievalError
from retrieval.chunking import CHUNKER_VERSION, chunk_document
from retrieval.documents import Chunk, Document
from retrieval.embedder import Embedder
from retrieval.index import IndexOptions, VectorIndex, load_version, publish_version
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
    index_options: IndexOptions | None = None,
) -> IngestReport:
    """Ingest files and folders into the versioned index at ``index_dir``.

    Args:
        paths: files or folders (Markdown, text, HTML, PDF, DOCX; see :mod:`retrieval.loaders`).
        index_dir: the index directory (created when missing).
        embedder: the embedder; must match the current version's embedder and dim.
        chunk_tokens, overlap_tokens: chunking bounds in embedder tokens.
        sync: also remove documents previously ingested from these roots that no longer exist.
        show_progress: show progress bars while reading and embedding.
        index_options: index kind thresholds and HNSW parameters (default :class:`IndexOptions`).

    Raises:
        DocumentNotFoundError: a named path does not exist.
        RetrievalIndexError: the current version is unreadable.
        RetrievalError: the current version was built with another embedder or chunking, or
            ``chunk_tokens`` exceeds what the embedder reads.
    """
    paths = [Path(p) for p in paths]
    roots = {str(p.resolve()) if p.is_dir() else str(p.resolve().parent) for p in paths}
    docs, skipped = load_paths(paths, show_progress=show_progress)
    for doc in docs:
        file_path = Path(doc.metadata.get("path", doc.source)).resolve()
        doc.metadata["root"] = next(
            (r for r in sorted(roots, key=len, reverse=True) if file_path.is_relative_to(r)), None
        )
    return ingest_documents(
        docs,
        index_dir,
        embedder,
        chunk_tokens,
        overlap_tokens,
        sync=sync,
        roots=roots,
        skipped=skipped,
        show_progress=show_progress,
        index_options=index_options,
    )


def _one_writer(fn):
    """Run ``fn(docs, index_dir, ...)`` holding an exclusive ``flock`` on ``index_dir/.writer.lock``, so ingests
    into one folder from several threads or processes (shared storage included) run one after the other:
    otherwise two that read the same current version would each publish it plus their own documents, and the
    later one would drop the earlier one's."""

    @functools.wraps(fn)
    def locked(docs, index_dir, *args, **kwargs):
        Path(index_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(index_dir) / ".writer.lock", "a+") as f:  # closing the file releases the lock
            fcntl.flock(f, fcntl.LOCK_EX)
            return fn(docs, index_dir, *args, **kwargs)

    return locked


@_one_writer
def ingest_documents(
    docs: Iterable[Document],
    index_dir: Path,
    embedder: Embedder,
    chunk_tokens: int = 200,
    overlap_tokens: int = 32,
    sync: bool = False,
    roots: set[str] | None = None,
    skipped: list[Skipped] | None = None,
    show_progress: bool = False,
    index_options: IndexOptions | None = None,
) -> IngestReport:
    """Ingest already-loaded documents (the core of :func:`ingest`; also used by evaluation).

    Args:
        docs: documents with unique ``doc_id``; ``metadata["root"]`` (optional) names the
            folder they came from, for ``sync``.
        index_dir, embedder, chunk_tokens, overlap_tokens, show_progress, index_options: as :func:`ingest`.
        sync: remove previously ingested documents that are not in ``docs``: those whose
            root is in ``roots``, or every one when ``roots`` is None (mirror ``docs`` exactly).
        roots: see ``sync``.
        skipped: files already skipped while loading, carried into the report.

    Concurrent ingests into one ``index_dir`` (threads or processes) run one at a time.

    Returns:
        What changed; a new version is published only when something did.

    Raises:
        RetrievalIndexError: the current version is unreadable.
        RetrievalError: duplicate doc ids, another embedder or chunking than the current
            version, or ``chunk_tokens`` beyond what the embedder reads.
    """
    docs = list(docs)
    index_options = index_options or IndexOptions()
    checked = False

    def check_embedder() -> None:
        # Loads the embedder; deferred until a document needs chunking, so an
        # ingest that changes nothing (a second `make run`) never loads the model.
        nonlocal checked
        if checked:
            return
        checked = True
        limit = embedder.max_seq_length - 2  # [CLS] and [SEP]
        if chunk_tokens > limit:
            raise RetrievalError(
                f"chunk_tokens must be <= {limit} (the embedder reads {limit + 2} tokens), got {chunk_tokens}"
            )
        if current is not None and current.manifest.get("dim") != embedder.dim:
            raise RetrievalError(
                f"index {current.version} has {current.manifest.get('dim')}-dim vectors, embedder "
                f"{embedder.name!r} gives {embedder.dim}: ingest into a new index_dir"
            )

    ids_seen: set[str] = set()
    for doc in docs:
        if doc.doc_id in ids_seen:
            raise RetrievalError(f"doc_id must be unique, got {doc.doc_id!r} twice")
        ids_seen.add(doc.doc_id)
    current = load_version(index_dir)
    chunking = {"chunk_tokens": chunk_tokens, "overlap_tokens": overlap_tokens, "method": "heading-aware"}
    old_docs: dict[str, dict] = {}
    old_chunks: dict[int, Chunk] = {}
    if current is not None:
        m = current.manifest
        if m.get("embedder") != embedder.name:
            raise RetrievalError(
                f"index {current.version} was built with embedder {m.get('embedder')!r}; "
                f"got {embedder.name!r}: ingest into a new index_dir"
            )
        if m.get("chunking") != chunking:
            raise RetrievalError(f"index {current.version} used chunking {m.get('chunking')}, got {chunking}")
        old_docs = dict(m.get("documents", {}))
        old_chunks = current.chunks

    report = IngestReport(version=current.version if current else None, published=False, skipped=list(skipped or []))
    new_docs: dict[str, dict] = {}
    keep_chunks: list[Chunk] = []
    fresh_chunks: list[Chunk] = []
    from tqdm.auto import tqdm

    for doc in tqdm(docs, desc="chunking", unit="doc", disable=not show_progress or not docs):
        root = doc.metadata.get("root")
        entry = {"sha256": doc.sha256, "title": doc.title, "source": doc.source, "root": root}
        prev = old_docs.get(doc.doc_id)
        if prev is not None and prev.get("sha256") == doc.sha256 and prev.get("chunker_version", 1) == CHUNKER_VERSION:
            ids = prev.get("chunk_ids", [])
            if all(i in old_chunks for i in ids):
                keep_chunks.extend(old_chunks[i] for i in ids)
                new_docs[doc.doc_id] = {**entry, "root": prev.get("root", root), "chunk_ids": ids}
                report.unchanged.append(doc.doc_id)
                continue
        check_embedder()
        if prev is not None and prev.get("sha256") == doc.sha256:
            log.info("%s: re-chunked (cut by chunker version %s, now %s)", doc.doc_id,
                     prev.get("chunker_version", 1), CHUNKER_VERSION)
        chunks = chunk_document(doc, embedder.count_tokens, chunk_tokens, overlap_tokens)
        new_docs[doc.doc_id] = {**entry, "chunker_version": CHUNKER_VERSION, "chunk_ids": [c.chunk_id for c in chunks]}
        (report.updated if prev is not None else report.added).append(doc.doc_id)
        fresh_chunks.extend(chunks)
    for doc_id, prev in old_docs.items():
        if doc_id in ids_seen:
            continue
        if sync and (roots is None or prev.get("root") in roots):
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
    check_embedder()

    reuse = [c for c in fresh_chunks if c.chunk_id in old_chunks]
    embed = [c for c in fresh_chunks if c.chunk_id not in old_chunks]
    report.chunks_embedded = len(embed)
    ids_parts: list[np.ndarray] = []
    vec_parts: list[np.ndarray] = []
    if keep_chunks or reuse:
        ids = np.array([c.chunk_id for c in keep_chunks + reuse], dtype=np.int64)
        ids_parts.append(ids)
        vec_parts.append(current.index.reconstruct(ids))
    if embed:
        ids_parts.append(np.array([c.chunk_id for c in embed], dtype=np.int64))
        vec_parts.append(embedder.encode([c.embedding_text() for c in embed], show_progress=show_progress))
    all_ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    all_vecs = np.concatenate(vec_parts) if vec_parts else np.zeros((0, embedder.dim), np.float32)
    index = VectorIndex.build(embedder.dim, all_ids, all_vecs, index_options)
    ordered = sorted(all_chunks, key=lambda c: (c.doc_id, c.position))
    manifest = {
        "embedder": embedder.name,
        "dim": embedder.dim,
        "normalized": True,
        "metric": "inner_product (cosine)",
        "index_type": index.describe()["faiss"],
        "chunking": chunking,
        "document_count": len(new_docs),
        "documents": new_docs,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "parent_version": current.version if current else None,
    }
    report.version = publish_version(index_dir, index, ordered, manifest)
    report.published = True
    return report
