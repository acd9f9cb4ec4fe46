"""FAISS vector index with an id map, and versioned on-disk index folders.

Layout of an index directory::

    index_dir/
      CURRENT                  name of the published version (replaced atomically)
      versions/<version>/
        index.faiss            faiss.IndexIDMap2 over IndexFlatIP (normalised vectors)
        chunks.jsonl           one Chunk per line, same ids as the FAISS id map
        manifest.json          embedder, dim, normalisation, chunking, document hashes, counts
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatbot.errors import RetrievalIndexError
from retrieval.documents import Chunk

log = logging.getLogger(__name__)


class VectorIndex:
    """Exact inner-product search over normalised vectors, keyed by int64 ids.

    Wraps ``faiss.IndexIDMap2(faiss.IndexFlatIP(dim))`` so ids survive
    add/remove/save/load, and vectors can be read back by id.

    Args:
        dim: vector dimension (>= 1).
    """

    def __init__(self, dim: int, _index=None) -> None:
        import faiss

        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self._index = _index if _index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` (n, dim) float32 under ``ids`` (n,) int64.

        Raises:
            ValueError: shapes disagree, or an id is negative or already present.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {vectors.shape}")
        if len(ids) != len(vectors):
            raise ValueError(f"ids and vectors differ in length: {len(ids)} vs {len(vectors)}")
        if (ids < 0).any():
            raise ValueError("ids must be >= 0")
        if len(set(ids.tolist())) != len(ids) or self.contains(ids).any():
            raise ValueError("ids must be unique and not already in the index")
        if len(ids):
            self._index.add_with_ids(vectors, ids)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``ids`` are in the index."""
        present = set(self.ids().tolist())
        return np.array([int(i) in present for i in np.asarray(ids).reshape(-1)], dtype=bool)

    def ids(self) -> np.ndarray:
        """All ids in insertion order (int64)."""
        import faiss

        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids``; return how many were present."""
        import faiss

        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return 0
        return int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of ``ids`` (n, dim)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._index.reconstruct(int(i)) for i in ids]).astype(np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product.

        Args:
            queries: (q, dim) float32.
            k: results wanted per query (>= 1); more than the index holds returns what exists.

        Returns:
            (scores, ids), each of shape (q, min(k, len(self))); never id -1.

        Raises:
            ValueError: ``k < 1`` or a bad query shape.
        """
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (q, {self.dim}), got {queries.shape}")
        k = min(k, len(self))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, ids = self._index.search(queries, k)
        return scores, ids

    def save(self, path: Path) -> None:
        """Write the index to ``path`` (a ``.faiss`` file)."""
        import faiss

        faiss.write_index(self._index, str(path))

    @classmethod
    def load(cls, path: Path) -> "VectorIndex":
        """Read an index written by :meth:`save`.

        Raises:
            RetrievalIndexError: the file is missing or not a FAISS index.
        """
        import faiss

        try:
            idx = faiss.read_index(str(path))
        except Exception as exc:  # faiss raises RuntimeError with C++ text
            raise RetrievalIndexError(f"cannot read FAISS index {path}: {exc}") from exc
        return cls(idx.d, _index=idx)


@dataclass
class IndexVersion:
    """One published index: vectors, chunks and manifest."""

    version: str
    path: Path
    index: VectorIndex
    chunks: dict[int, Chunk]
    manifest: dict


def _versions_dir(index_dir: Path) -> Path:
    return Path(index_dir) / "versions"


def current_version_name(index_dir: Path) -> str | None:
    """Name of the published version, or None when nothing is published."""
    p = Path(index_dir) / "CURRENT"
    try:
        name = p.read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def load_version(index_dir: Path, version: str | None = None) -> IndexVersion | None:
    """Load ``version`` (default: the published one); None when nothing is published.

    Raises:
        RetrievalIndexError: the version folder is incomplete or inconsistent.
    """
    version = version or current_version_name(index_dir)
    if version is None:
        return None
    path = _versions_dir(index_dir) / version
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        chunks = {}
        with open(path / "chunks.jsonl", encoding="utf-8") as f:
            for line in f:
                c = Chunk(**json.loads(line))
                chunks[c.chunk_id] = c
    except (OSError, ValueError, TypeError) as exc:
        raise RetrievalIndexError(f"index version {version} at {path} is unreadable: {exc}") from exc
    index = VectorIndex.load(path / "index.faiss")
    if len(index) != len(chunks) or set(index.ids().tolist()) != set(chunks):
        raise RetrievalIndexError(
            f"index version {version}: {len(index)} vectors but {len(chunks)} chunks, or their ids differ"
        )
    return IndexVersion(version=version, path=path, index=index, chunks=chunks, manifest=manifest)


def publish_version(index_dir: Path, index: VectorIndex, chunks: list[Chunk], manifest: dict) -> str:
    """Write a new version beside the old ones and make it current atomically.

    The folder is written under a temporary name, renamed into ``versions/``, then
    ``CURRENT`` is replaced with ``os.replace``; a reader sees the old or the new
    version, never a half-written one. The two newest older versions are kept.

    Returns:
        The new version name (``v<unix-ms>``).
    """
    vdir = _versions_dir(index_dir)
    vdir.mkdir(parents=True, exist_ok=True)
    version = f"v{int(time.time() * 1000)}"
    while (vdir / version).exists():
        version = f"v{int(version[1:]) + 1}"
    tmp = vdir / f".tmp-{version}"
    tmp.mkdir()
    index.save(tmp / "index.faiss")
    with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
        for c in chunks:
            f.write(json.dumps(c.to_dict(), ensure_ascii=False) + "\n")
    manifest = {**manifest, "version": version, "chunk_count": len(chunks)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    tmp.rename(vdir / version)
    cur_tmp = Path(index_dir) / ".CURRENT.tmp"
    cur_tmp.write_text(version + "\n")
    os.replace(cur_tmp, Path(index_dir) / "CURRENT")
    _prune(vdir, keep={version}, keep_newest=3)
    log.info("published index version %s (%d chunks)", version, len(chunks))
    return version


def _prune(vdir: Path, keep: set[str], keep_newest: int) -> None:
    versions = sorted((p for p in vdir.iterdir() if p.is_dir() and p.name.startswith("v")), key=lambda p: p.name)
    for p in versions[:-keep_newest]:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
