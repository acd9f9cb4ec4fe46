"""Retrieval benchmark: ingestion throughput and vector-search latency/recall, baseline beside ours.

1. Ingestion: chunks/s of ``retrieval.ingest.ingest_documents`` (chunking, embedding,
   index build, atomic publish) beside the raw embedder's chunks/s on the very same
   texts (``Embedder.encode`` of each chunk's embedding text). Target: ours >= 90 %.
   Texts: DSTC11 Track 5 review sentences and FAQs (``../shared/data``), one chunk each.
2. Search: for each size (10k, 100k, 1M by default) of L2-normalised 384-d vectors,
   single-query latency p50/p95 (one query per call, as a server sends them) and
   recall@10 against exact search, for
   - baseline: a bare ``faiss.IndexFlatIP`` (exact),
   - ours, flat: :class:`retrieval.index.VectorIndex` ``kind="flat"`` (id map, exact),
   - ours, HNSW: :class:`retrieval.index.VectorIndex` ``kind="hnsw"`` at each ``--ef-search``.
   Target at 1M: HNSW p95 <= 5 ms with recall@10 >= 0.95 on a 2-core machine.

Vectors: ``--data clustered`` (default) draws points around 1,000 random centres
with noise (cosine to the centre ~0.6), so neighbourhoods look like sentence
embeddings (low intrinsic dimension); ``--data uniform`` draws uniformly on the sphere,
the worst case for any ANN index (every point is nearly equidistant). Queries are
drawn from the same distribution and are not in the index.

Usage (the 1M case needs ~5 GB RAM and several minutes of HNSW build)::

    OMP_NUM_THREADS=1 nice -n 10 python bench/retrieval.py --sizes 10000,100000 --json var/bench/retrieval.json
    OMP_NUM_THREADS=2 python bench/retrieval.py --sizes 1000000 --skip-ingest
    python bench/retrieval.py --gpu-check        # on a machine with faiss-gpu: flat search on the GPU

Prints two tables and writes JSON (``--json``, default ``var/bench/retrieval.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402  (after the path insert)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def _table(heads: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(heads), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# --- ingestion
def _corpus(limit: int):
    from retrieval.evaluate import load_dstc11_track5

    docs = load_dstc11_track5().documents
    rng = np.random.default_rng(0)
    pick = rng.choice(len(docs), size=min(limit, len(docs)), replace=False)
    return [docs[i] for i in sorted(pick)]


def bench_ingest(n_texts: int, repeats: int) -> dict:
    """Raw embedder vs ingest_documents on the same chunk texts; best of ``repeats`` each."""
    from chatbot.assets import resolve_embedder
    from chatbot.config import Settings
    from retrieval.chunking import chunk_document
    from retrieval.embedder import Embedder
    from retrieval.ingest import ingest_documents

    s = Settings()
    emb = Embedder(resolve_embedder(s), name=s.embedder)
    docs = _corpus(n_texts)
    texts = [c.embedding_text() for d in docs for c in chunk_document(d, emb.count_tokens, s.chunk_tokens,
                                                                       s.chunk_overlap)]
    emb.encode(texts[:64])  # load and warm up
    raw_s, ours_s, raw_cpu, ours_cpu = [], [], [], []
    for _ in range(repeats):  # interleaved, so load on a shared machine hits both alike
        c0, t0 = time.process_time(), time.perf_counter()
        emb.encode(texts)
        raw_s.append(time.perf_counter() - t0)
        raw_cpu.append(time.process_time() - c0)
        with tempfile.TemporaryDirectory() as tmp:
            c0, t0 = time.process_time(), time.perf_counter()
            rep = ingest_documents(docs, Path(tmp) / "index", emb, s.chunk_tokens, s.chunk_overlap)
            ours_s.append(time.perf_counter() - t0)
            ours_cpu.append(time.process_time() - c0)
        assert rep.chunks_total == len(texts) == rep.chunks_embedded, (rep.chunks_total, len(texts))
    raw, ours = min(raw_s), min(ours_s)
    return {
        "texts": len(docs),
        "chunks": len(texts),
        "repeats": repeats,
        "raw_embedder": {"seconds": raw, "chunks_per_s": len(texts) / raw, "all_seconds": raw_s,
                         "cpu_seconds": min(raw_cpu), "all_cpu_seconds": raw_cpu},
        "ours_ingest": {"seconds": ours, "chunks_per_s": len(texts) / ours, "all_seconds": ours_s,
                        "cpu_seconds": min(ours_cpu), "all_cpu_seconds": ours_cpu},
        "ratio": raw / ours,
        "cpu_ratio": min(raw_cpu) / min(ours_cpu),
        "target_ratio": 0.9,
    }


# --- search
def make_vectors(n: int, nq: int, dim: int, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(base (n, dim), queries (nq, dim)), float32, rows of norm 1."""
    rng = np.random.default_rng(seed)
    out = []
    if kind == "clustered":
        centres = rng.standard_normal((1000, dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for count in (n, nq):
        parts = []
        for start in range(0, count, 100_000):
            m = min(100_000, count - start)
            x = rng.standard_normal((m, dim), dtype=np.float32)
            if kind == "clustered":
                x *= 1.3 / np.sqrt(dim)  # noise norm ~1.3: cosine to the centre ~0.6
                x += centres[rng.integers(0, len(centres), m)]
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            parts.append(x)
        out.append(np.concatenate(parts) if parts else np.zeros((0, dim), np.float32))
    return out[0], out[1]


def _latencies(search, queries: np.ndarray, k: int) -> tuple[list[float], list[float], np.ndarray]:
    """Wall-clock and CPU (this thread) milliseconds per single-query search, and the ids found.

    CPU time is reported beside wall time because a shared machine's load shows up in
    the wall-clock tail; with OMP_NUM_THREADS=1 the search runs on the calling thread.
    """
    for q in queries[:5]:  # warm-up
        search(q[None, :], k)
    wall, cpu, ids = [], [], []
    for q in queries:
        c0, t0 = time.thread_time(), time.perf_counter()
        _, i = search(q[None, :], k)
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.thread_time() - c0) * 1000)
        ids.append(i[0])
    return wall, cpu, np.stack(ids)


def _row(n: int, name: str, build: float, wall: list[float], cpu: list[float], recall: float) -> dict:
    return {"size": n, "index": name, "build_s": build, "p50_ms": _pct(wall, 50), "p95_ms": _pct(wall, 95),
            "cpu_p50_ms": _pct(cpu, 50), "cpu_p95_ms": _pct(cpu, 95), "recall@10": recall}


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / exact.shape[1] for f, e in zip(found, exact)]))


def bench_search(n: int, args) -> list[dict]:
    import faiss

    from retrieval.index import IndexOptions, VectorIndex

    dim, k = args.dim, 10
    t0 = time.perf_counter()
    base, queries = make_vectors(n, args.queries, dim, args.data)
    gen_s = time.perf_counter() - t0
    ids = np.arange(n, dtype=np.int64) * 7 + 3  # ids unrelated to positions: exercises the id map
    rows = []

    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(base)
    build = time.perf_counter() - t0
    wall, cpu, exact_pos = _latencies(flat.search, queries, k)
    exact = ids[exact_pos]
    rows.append(_row(n, "baseline: faiss IndexFlatIP (exact)", build, wall, cpu, 1.0))
    del flat

    t0 = time.perf_counter()
    ours_flat = VectorIndex.build(dim, ids, base, IndexOptions(ann_threshold=n))
    build = time.perf_counter() - t0
    wall, cpu, found = _latencies(ours_flat.search, queries, k)
    rows.append(_row(n, "ours: VectorIndex flat (exact)", build, wall, cpu, _recall(found, exact)))
    del ours_flat

    t0 = time.perf_counter()
    opts = IndexOptions(ann_threshold=0, hnsw_m=args.hnsw_m, hnsw_ef_construction=args.ef_construction,
                        hnsw_ef_search=args.ef_search[0])
    hnsw = VectorIndex.build(dim, ids, base, opts)
    build = time.perf_counter() - t0
    for ef in args.ef_search:
        hnsw.set_ef_search(ef)
        wall, cpu, found = _latencies(hnsw.search, queries, k)
        rows.append(_row(n, f"ours: VectorIndex HNSW M={args.hnsw_m} ef={ef}", build, wall, cpu,
                         _recall(found, exact)))
    del hnsw, base
    for r in rows:
        r["p95_speedup_vs_exact"] = rows[0]["p95_ms"] / r["p95_ms"]
        r["cpu_p95_speedup_vs_exact"] = rows[0]["cpu_p95_ms"] / max(r["cpu_p95_ms"], 1e-6)
        r["data_gen_s"] = gen_s
    return rows


def gpu_check() -> dict:
    """On a machine with faiss-gpu: the flat index searches on the GPU and agrees with the CPU."""
    from retrieval.index import VectorIndex, gpu_count

    base, queries = make_vectors(20_000, 100, 384, "clustered")
    idx = VectorIndex.build(384, np.arange(len(base)), base)
    s_cpu, i_cpu = idx.search(queries, 10)
    device = idx.use_device("gpu")  # raises ConfigError without a GPU
    s_gpu, i_gpu = idx.search(queries, 10)
    return {"gpus": gpu_count(), "device": device, "recall@10_gpu_vs_cpu": _recall(i_gpu, i_cpu),
            "max_score_diff": float(np.abs(s_gpu - s_cpu).max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated vector counts")
    p.add_argument("--queries", type=int, default=300, help="single queries timed per index")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--ef-search", default="32,64,128", help="comma-separated efSearch values to time")
    p.add_argument("--ingest-texts", type=int, default=2000, help="texts for the ingestion benchmark")
    p.add_argument("--ingest-repeats", type=int, default=2)
    p.add_argument("--skip-ingest", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--gpu-check", action="store_true", help="only check the GPU search path")
    p.add_argument("--json", type=Path, default=ROOT / "var" / "bench" / "retrieval.json")
    args = p.parse_args(argv)
    args.ef_search = [int(x) for x in args.ef_search.split(",") if x]
    import faiss

    result: dict = {
        "machine": {"cpus": os.cpu_count(), "omp_threads": faiss.omp_get_max_threads(),
                    "platform": platform.platform(), "faiss": faiss.__version__},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if args.gpu_check:
        from chatbot.errors import ConfigError

        try:
            result["gpu_check"] = gpu_check()
        except ConfigError as exc:
            print(f"gpu check: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(result["gpu_check"], indent=2))
    else:
        if not args.skip_ingest:
            ing = bench_ingest(args.ingest_texts, args.ingest_repeats)
            result["ingest"] = ing
            print(f"\nIngestion ({ing['chunks']} chunks, DSTC11 knowledge snippets; best of {ing['repeats']})")
            raw, ours = ing["raw_embedder"], ing["ours_ingest"]
            print(_table(["pipeline", "what", "seconds", "chunks/s", "ratio", "cpu s", "cpu ratio"], [
                ["baseline", "raw embedder.encode", f"{raw['seconds']:.2f}", f"{raw['chunks_per_s']:.1f}", "1.00",
                 f"{raw['cpu_seconds']:.2f}", "1.00"],
                ["ours", "ingest_documents (chunk+embed+index+publish)", f"{ours['seconds']:.2f}",
                 f"{ours['chunks_per_s']:.1f}", f"{ing['ratio']:.2f}", f"{ours['cpu_seconds']:.2f}",
                 f"{ing['cpu_ratio']:.2f}"],
            ]))
            print("(ratio: our chunks/s over the raw embedder's, wall clock; cpu ratio: the same in process CPU time)")
        if not args.skip_search:
            rows = []
            for n in [int(x) for x in args.sizes.split(",") if x]:
                rows += bench_search(n, args)
                result["search"] = rows
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=2))  # keep partial results of long runs
            print(f"\nSearch ({args.data} {args.dim}-d unit vectors, {args.queries} single queries, top 10, "
                  f"{result['machine']['omp_threads']} OpenMP threads)")
            print(_table(["size", "index", "build s", "p50 ms", "p95 ms", "cpu p50", "cpu p95", "recall@10",
                          "p95 speedup"], [
                [f"{r['size']:,}", r["index"], f"{r['build_s']:.1f}", f"{r['p50_ms']:.3f}", f"{r['p95_ms']:.3f}",
                 f"{r['cpu_p50_ms']:.3f}", f"{r['cpu_p95_ms']:.3f}", f"{r['recall@10']:.3f}",
                 f"{r['p95_speedup_vs_exact']:.1f}x"] for r in rows
            ]))
            print("(p50/p95: wall clock per query; cpu: CPU time of the searching thread; speedup: exact p95 / p95)")
    print()
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
