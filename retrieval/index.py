"""FAISS vector index with an id map, and versioned on-disk index folders.

Layout of an index directory::

    index_dir/
      CURRENT                  name of the published version (replaced atomically)
      versions/<version>/
        index.faiss            faiss.IndexIDMap2 over IndexFlatIP, or over IndexHNSWFlat (inner product)
        chunks.jsonl           one Chunk per line, same ids as the FAISS id map
        manifest.json          embedder, dim, normalisation, chunking, index type, document hashes, counts

Index kinds (chosen per published version by :meth:`VectorIndex.build`):

* ``flat`` (up to ``IndexOptions.ann_threshold`` vectors): exact inner-product search.
  On a machine with ``faiss-gpu`` and a GPU, searches run on a GPU copy
  (:meth:`VectorIndex.use_device`); the CPU index stays the source of truth for
  add/remove/reconstruct/save.
* ``hnsw`` (above the threshold): ``IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT``,
  approximate search with ``M``/``efConstruction``/``efSearch`` from the settings.
  HNSW graphs cannot delete nodes, so :meth:`VectorIndex.remove` rebuilds the graph
  from the remaining vectors (O(n)); ingestion never removes in place, it builds
  each new version from scratch and publishes it, so the cost is paid offline.
  The HNSW index stays on the CPU (FAISS has no GPU HNSW).

Vectors are L2-normalised (by the embedder, and again by :class:`VectorIndex` on
add and search, so callers cannot get it wrong): inner product is cosine and every
score lies in [-1, 1].
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from chatbot.errors import ConfigError, RetrievalError, RetrievalIndexError
from retrieval.documents import Chunk

if TYPE_CHECKING:
    from retrieval.bm25 import BM25Index

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "hnsw"]
#: Largest ``k`` FAISS GPU flat search accepts; larger searches use the CPU index.
_GPU_MAX_K = 2048


@dataclass(frozen=True)
class IndexOptions:
    """How vector indexes are built and searched.

    Attributes:
        ann_threshold: above this many vectors a version gets an HNSW index, else exact flat.
        hnsw_m: HNSW links per node (memory ~ ``4 * 2 * hnsw_m`` bytes per vector on top of the vectors).
        hnsw_ef_construction: HNSW candidate list size while building (build time vs graph quality).
        hnsw_ef_search: HNSW candidate list size while searching (latency vs recall).
        device: ``auto`` (GPU when faiss-gpu sees one), ``cpu`` or ``gpu`` (fail when there is none).

    Raises:
        RetrievalError: a field is out of range; the message names it and the value.
    """

    ann_threshold: int = 50_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.ann_threshold < 0:
            raise RetrievalError(f"ann_threshold must be >= 0, got {self.ann_threshold}")
        if self.hnsw_m < 4:
            raise RetrievalError(f"hnsw_m must be >= 4, got {self.hnsw_m}")
        if self.hnsw_ef_construction < 8:
            raise RetrievalError(f"hnsw_ef_construction must be >= 8, got {self.hnsw_ef_construction}")
        if self.hnsw_ef_search < 1:
            raise RetrievalError(f"hnsw_ef_search must be >= 1, got {self.hnsw_ef_search}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise RetrievalError(f"index_device must be one of auto, cpu, gpu, got {self.device!r}")


def gpu_count() -> int:
    """GPUs FAISS can use: 0 with faiss-cpu (no ``StandardGpuResources``) or when none is visible."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # a broken CUDA install reports as "no GPU", never as a crash
        log.warning("faiss.get_num_gpus() failed; searching on the CPU", exc_info=True)
        return 0


def _normalized(x: np.ndarray) -> np.ndarray:
    """Rows scaled to L2 norm 1 (zero rows stay zero), float32, C-contiguous, a copy."""
    import faiss

    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if x.ndim == 2 and len(x):
        faiss.normalize_L2(x)  # in place, multi-threaded; leaves zero rows at zero
    return x


class VectorIndex:
    """Cosine search over L2-normalised vectors, keyed by int64 ids.

    Wraps ``faiss.IndexIDMap2`` around ``IndexFlatIP`` (``kind="flat"``, exact) or
    ``IndexHNSWFlat`` (``kind="hnsw"``, approximate), so ids survive
    add/remove/save/load and vectors can be read back by id. Added vectors and
    queries are L2-normalised first, so scores are cosines in [-1, 1] and
    :meth:`reconstruct` returns unit vectors.

    Args:
        dim: vector dimension (>= 1).
        kind: ``"flat"`` or ``"hnsw"``.
        hnsw_m, ef_construction, ef_search: HNSW parameters (ignored for flat).

    Raises:
        RetrievalError: ``dim < 1`` or an unknown ``kind``.
    """

    def __init__(
        self,
        dim: int,
        kind: IndexKind = "flat",
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
        _index=None,
    ) -> None:
        import faiss

        if dim < 1:
            raise RetrievalError(f"dim must be >= 1, got {dim}")
        if kind not in ("flat", "hnsw"):
            raise RetrievalError(f"kind must be 'flat' or 'hnsw', got {kind!r}")
        self.dim = dim
        self.kind: IndexKind = kind
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self._index = _index if _index is not None else self._new_faiss_index()
        self._device = "cpu"
        self._gpu_res = None
        self._gpu_index = None
        self._gpu_lock = threading.Lock()
        if kind == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = ef_search

    def _new_faiss_index(self):
        import faiss

        if self.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = self.ef_construction
        inner.hnsw.efSearch = self.ef_search
        return faiss.IndexIDMap2(inner)

    @classmethod
    def build(
        cls, dim: int, ids: np.ndarray, vectors: np.ndarray, options: IndexOptions | None = None
    ) -> "VectorIndex":
        """A new index holding ``vectors`` (n, dim) under ``ids`` (n,): flat up to
        ``options.ann_threshold`` vectors, HNSW above.

        Raises:
            RetrievalError: see :meth:`add`.
        """
        options = options or IndexOptions()
        kind: IndexKind = "hnsw" if len(ids) > options.ann_threshold else "flat"
        index = cls(dim, kind, options.hnsw_m, options.hnsw_ef_construction, options.hnsw_ef_search)
        index.add(ids, vectors)
        return index

    def describe(self) -> dict:
        """Type and parameters, for the manifest."""
        if self.kind == "flat":
            return {"kind": "flat", "faiss": "IndexIDMap2(IndexFlatIP)", "exact": True, "device": self._device}
        return {
            "kind": "hnsw",
            "faiss": "IndexIDMap2(IndexHNSWFlat, METRIC_INNER_PRODUCT)",
            "exact": False,
            "M": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "device": "cpu",
        }

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def device(self) -> str:
        """``"gpu"`` when searches run on a GPU copy, else ``"cpu"``."""
        return self._device

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` (n, dim) under ``ids`` (n,) int64; vectors are stored L2-normalised.

        Raises:
            RetrievalError: shapes disagree, a vector is not finite, or an id is negative or already present.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise RetrievalError(f"vectors must have shape (n, {self.dim}), got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise RetrievalError("vectors must be finite (found NaN or inf)")
        vectors = _normalized(vectors)
        if len(ids) != len(vectors):
            raise RetrievalError(f"ids and vectors differ in length: {len(ids)} vs {len(vectors)}")
        if (ids < 0).any():
            raise RetrievalError(f"ids must be >= 0, got {int(ids[ids < 0][0])}")
        if len(np.unique(ids)) != len(ids):
            raise RetrievalError("ids must be unique")
        present = self.contains(ids)
        if present.any():
            raise RetrievalError(f"id {int(ids[present][0])} is already in the index")
        if len(ids):
            self._index.add_with_ids(vectors, ids)
            self._invalidate_gpu()

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``ids`` are in the index."""
        return np.isin(np.asarray(ids, dtype=np.int64).reshape(-1), self.ids())

    def ids(self) -> np.ndarray:
        """All ids in internal order (int64, shape (n,))."""
        import faiss

        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All ``(ids (n,), vectors (n, dim))`` in internal order."""
        import faiss

        n = len(self)
        if n == 0:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        inner = faiss.downcast_index(self._index.index)
        return self.ids(), np.ascontiguousarray(inner.reconstruct_n(0, n), dtype=np.float32)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids`` (absent ones are ignored); return how many were present.

        A flat index removes in place; an HNSW index is rebuilt from the remaining
        vectors (HNSW cannot delete nodes), which costs a full build.
        """
        import faiss

        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0 or len(self) == 0:
            return 0
        if self.kind == "flat":
            n = int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))
        else:
            all_ids, vecs = self.vectors()
            keep = ~np.isin(all_ids, ids)
            n = int((~keep).sum())
            if n:
                self._index = self._new_faiss_index()
                if keep.any():
                    self._index.add_with_ids(vecs[keep], all_ids[keep])
        if n:
            self._invalidate_gpu()
        return n

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of ``ids``, shape (n, dim) float32, in the order asked.

        Raises:
            KeyError: an id is not in the index.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(ids) <= 32:
            out = np.empty((len(ids), self.dim), np.float32)
            for row, i in enumerate(ids.tolist()):
                try:
                    out[row] = self._index.reconstruct(int(i))
                except RuntimeError as exc:
                    raise KeyError(f"id {i} is not in the index") from exc
            return out
        all_ids, vecs = self.vectors()
        order = np.argsort(all_ids, kind="stable")
        pos = np.searchsorted(all_ids, ids, sorter=order)
        pos = np.minimum(pos, len(all_ids) - 1)
        rows = order[pos]
        missing = all_ids[rows] != ids
        if missing.any():
            raise KeyError(f"id {int(ids[missing][0])} is not in the index")
        return vecs[rows]

    def set_ef_search(self, ef_search: int) -> None:
        """Change HNSW ``efSearch`` (no effect on a flat index).

        Raises:
            RetrievalError: ``ef_search < 1``.
        """
        import faiss

        if ef_search < 1:
            raise RetrievalError(f"hnsw_ef_search must be >= 1, got {ef_search}")
        self.ef_search = ef_search
        if self.kind == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = ef_search

    # --- GPU
    def use_device(self, device: str = "auto") -> str:
        """Search on a GPU copy when asked and possible; return the device in use.

        ``auto`` moves a flat index to GPU 0 when FAISS has GPU support
        (``StandardGpuResources``) and sees a GPU, else stays on the CPU; ``gpu``
        insists; ``cpu`` drops any GPU copy. HNSW always stays on the CPU.

        Raises:
            ConfigError: ``device="gpu"`` but FAISS has no GPU support or sees no GPU.
            RetrievalError: unknown ``device``.
        """
        import faiss

        if device not in ("auto", "cpu", "gpu"):
            raise RetrievalError(f"index_device must be one of auto, cpu, gpu, got {device!r}")
        with self._gpu_lock:
            self._gpu_index = None
            self._device = "cpu"
            if device == "cpu":
                return "cpu"
            if gpu_count() == 0:
                if device == "gpu":
                    raise ConfigError(
                        "index_device is 'gpu' but FAISS has no GPU support or sees no GPU "
                        "(install faiss-gpu on a machine with a CUDA GPU, or set CHATBOT_INDEX_DEVICE=auto)"
                    )
                return "cpu"
            if self.kind != "flat":
                log.info("HNSW index stays on the CPU (FAISS has no GPU HNSW)")
                return "cpu"
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._index)
            self._device = "gpu"
            log.info("flat index (%d vectors) searches on GPU 0", len(self))
            return "gpu"

    def _invalidate_gpu(self) -> None:
        if self._device == "gpu":
            self.use_device("gpu")

    # --- search
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product (cosine for normalised vectors).

        Args:
            queries: (q, dim) float32 (normalised here; the norm does not change the ranking).
            k: results wanted per query (>= 1); more than the index holds returns what exists.

        Returns:
            (scores float32, ids int64), each of shape (q, min(k, len(self))), best
            first; never id -1 and no duplicate within a row.

        Raises:
            RetrievalError: ``k < 1`` or a bad query shape.
        """
        if k < 1:
            raise RetrievalError(f"top_k must be >= 1, got {k}")
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise RetrievalError(f"queries must have shape (q, {self.dim}), got {queries.shape}")
        queries = _normalized(queries)
        k = min(k, len(self))
        if k == 0 or len(queries) == 0:
            return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
        gpu = self._gpu_index
        index = gpu if gpu is not None and k <= _GPU_MAX_K else self._index
        scores, ids = index.search(queries, k)
        bad = (ids < 0).any(axis=1)
        if bad.any():
            # HNSW may come back short (disconnected region, small efSearch): answer those rows exactly.
            log.debug("ANN search returned fewer than %d hits for %d queries; exact fallback", k, int(bad.sum()))
            all_ids, vecs = self.vectors()
            sims = queries[bad] @ vecs.T
            top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            scores[bad] = np.take_along_axis(sims, top, axis=1)
            ids[bad] = all_ids[top]
        return scores, ids.astype(np.int64, copy=False)

    # --- persistence
    def save(self, path: Path) -> None:
        """Write the (CPU) index to ``path`` (a ``.faiss`` file)."""
        import faiss

        faiss.write_index(self._index, str(path))

    @classmethod
    def load(cls, path: Path, options: IndexOptions | None = None) -> "VectorIndex":
        """Read an index written by :meth:`save`; ``options.hnsw_ef_search`` overrides the saved efSearch.

        Raises:
            RetrievalIndexError: the file is missing or not an id-mapped FAISS index of a known kind.
        """
        import faiss

        try:
            idx = faiss.read_index(str(path))
        except Exception as exc:  # faiss raises RuntimeError with C++ text
            raise RetrievalIndexError(f"cannot read FAISS index {path}: {exc}") from exc
        if not isinstance(idx, faiss.IndexIDMap2):
            raise RetrievalIndexError(f"FAISS index {path} is a {type(idx).__name__}, expected IndexIDMap2")
        inner = faiss.downcast_index(idx.index)
        if isinstance(inner, faiss.IndexHNSWFlat):
            ef_search = options.hnsw_ef_search if options else int(inner.hnsw.efSearch)
            return cls(idx.d, "hnsw", int(inner.hnsw.nb_neighbors(1)), int(inner.hnsw.efConstruction), ef_search, idx)
        if isinstance(inner, faiss.IndexFlat):
            return cls(idx.d, "flat", _index=idx)
        raise RetrievalIndexError(f"FAISS index {path} wraps a {type(inner).__name__}, expected IndexFlatIP or HNSW")


@dataclass
class IndexVersion:
    """One published index: vectors, chunks and manifest.

    The BM25 index over the chunks is built on first use (:meth:`bm25`) and cached here.
    """

    version: str
    path: Path
    index: VectorIndex
    chunks: dict[int, Chunk]
    manifest: dict
    _bm25: "BM25Index | None" = field(default=None, repr=False)
    _bm25_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bm25(self) -> "BM25Index":
        """The BM25 index over this version's chunks (title, heading path and text), built once."""
        if self._bm25 is None:
            with self._bm25_lock:
                if self._bm25 is None:
                    from retrieval.bm25 import BM25Index

                    t0 = time.perf_counter()
                    chunks = list(self.chunks.values())
                    self._bm25 = BM25Index([c.chunk_id for c in chunks], [c.embedding_text() for c in chunks])
                    log.info("BM25 index of version %s: %d chunks in %.2f s", self.version, len(chunks),
                             time.perf_counter() - t0)
        return self._bm25


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


def load_version(
    index_dir: Path, version: str | None = None, options: IndexOptions | None = None
) -> IndexVersion | None:
    """Load ``version`` (default: the published one); None when nothing is published.

    Args:
        index_dir: the index directory.
        version: a version name, or None for the one ``CURRENT`` names.
        options: search-time options (HNSW efSearch, device); None keeps what was saved, on the CPU.

    Raises:
        RetrievalIndexError: the version folder is incomplete or inconsistent.
        ConfigError: ``options.device == "gpu"`` and no GPU is usable.
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
    index = VectorIndex.load(path / "index.faiss", options)
    if len(index) != len(chunks) or set(index.ids().tolist()) != set(chunks):
        raise RetrievalIndexError(
            f"index version {version}: {len(index)} vectors but {len(chunks)} chunks, or their ids differ"
        )
    if options is not None:
        index.use_device(options.device)
    return IndexVersion(version=version, path=path, index=index, chunks=chunks, manifest=manifest)


def publish_version(index_dir: Path, index: VectorIndex, chunks: list[Chunk], manifest: dict) -> str:
    """Write a new version beside the old ones and make it current atomically.

    The folder is written under a temporary name, renamed into ``versions/``, then
    ``CURRENT`` is replaced with ``os.replace``; a reader sees the old or the new
    version, never a half-written one. The two newest older versions are kept.
    The manifest gets ``version``, ``chunk_count`` and ``index`` (kind and parameters).

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
    manifest = {**manifest, "version": version, "chunk_count": len(chunks), "index": index.describe()}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    tmp.rename(vdir / version)
    cur_tmp = Path(index_dir) / ".CURRENT.tmp"
    cur_tmp.write_text(version + "\n")
    os.replace(cur_tmp, Path(index_dir) / "CURRENT")
    _prune(vdir, keep={version}, keep_newest=3)
    log.info("published index version %s (%d chunks, %s)", version, len(chunks), index.kind)
    return version


def _prune(vdir: Path, keep: set[str], keep_newest: int) -> None:
    versions = sorted((p for p in vdir.iterdir() if p.is_dir() and p.name.startswith("v")), key=lambda p: p.name)
    for p in versions[:-keep_newest]:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
