"""VectorIndex: id map across add/remove/save/load (flat and HNSW), cosine scores, top_k bounds, GPU guard."""

from __future__ import annotations

import numpy as np
import pytest

from chatbot.errors import ConfigError, RetrievalIndexError
from retrieval.index import IndexOptions, VectorIndex, gpu_count


def _unit(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _new(kind: str, dim: int = 16) -> VectorIndex:
    return VectorIndex(dim, kind=kind, hnsw_m=8, ef_construction=40, ef_search=32)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_id_map_add_remove_add_then_save_load(tmp_path, kind):
    rng = np.random.default_rng(0)
    vecs = _unit(rng, 10)
    ids = np.array([11, 22, 33, 44, 55, 66, 77, 88, 99, 1010], dtype=np.int64)
    idx = _new(kind)
    idx.add(ids[:5], vecs[:5])
    assert idx.remove(np.array([22, 44, 12345])) == 2  # absent id ignored
    idx.add(ids[5:], vecs[5:])
    live = np.array([11, 33, 55, 66, 77, 88, 99, 1010])
    live_vecs = vecs[[0, 2, 4, 5, 6, 7, 8, 9]]
    assert len(idx) == 8 and sorted(idx.ids().tolist()) == sorted(live.tolist())

    def check(index: VectorIndex) -> None:
        scores, got = index.search(live_vecs, 1)
        assert got[:, 0].tolist() == live.tolist()  # every vector's top hit is itself
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
        np.testing.assert_allclose(index.reconstruct(live), live_vecs, atol=1e-6)
        assert not index.contains(np.array([22, 44])).any()
        with pytest.raises(KeyError, match="22"):
            index.reconstruct(np.array([22]))

    check(idx)
    idx.save(tmp_path / "index.faiss")
    loaded = VectorIndex.load(tmp_path / "index.faiss")
    assert loaded.kind == kind and len(loaded) == 8
    check(loaded)
    # the map keeps working after load: remove and add again
    assert loaded.remove(np.array([11])) == 1
    loaded.add(np.array([22]), vecs[1:2])
    assert loaded.search(vecs[1:2], 1)[1][0, 0] == 22
    assert 11 not in loaded.ids().tolist()


def test_cosine_ranking_normalises_vectors():
    idx = VectorIndex(2)
    idx.add(np.array([1, 2]), np.array([[0.1, 0.0], [0.5, 0.5]], dtype=np.float32))
    scores, ids = idx.search(np.array([[1.0, 0.0]], dtype=np.float32), 2)
    # raw inner product would rank [0.5, 0.5] first (0.5 > 0.1); cosine ranks [0.1, 0] first
    assert ids[0].tolist() == [1, 2]
    np.testing.assert_allclose(scores[0], [1.0, np.sqrt(0.5)], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(idx.reconstruct(np.array([1, 2])), axis=1), 1.0, atol=1e-6)


def test_scores_stay_in_cosine_range():
    rng = np.random.default_rng(1)
    idx = VectorIndex(8)
    idx.add(np.arange(50), rng.standard_normal((50, 8)) * 100)  # unnormalised, large norms
    scores, _ = idx.search(rng.standard_normal((5, 8)) * 7, 50)
    assert scores.max() <= 1.0 + 1e-5 and scores.min() >= -1.0 - 1e-5
    assert scores.max() > 0.5 and scores.min() < -0.5  # not degenerate


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_top_k_larger_than_collection(kind):
    idx = _new(kind, dim=4)
    idx.add(np.array([7, 9]), np.array([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32))
    _, ids = idx.search(np.array([[1, 0.2, 0, 0]], dtype=np.float32), 5)
    assert ids.shape == (1, 2) and ids[0].tolist() == [7, 9]
    assert -1 not in ids and len(set(ids[0].tolist())) == 2


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_empty_index_returns_nothing(kind):
    idx = _new(kind, dim=4)
    scores, ids = idx.search(np.ones((3, 4), dtype=np.float32), 5)
    assert scores.shape == (3, 0) and ids.shape == (3, 0)
    assert idx.remove(np.array([1])) == 0


def test_bad_arguments_name_the_value():
    idx = VectorIndex(4)
    idx.add(np.array([3]), np.ones((1, 4)))
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        idx.search(np.ones((1, 4)), 0)
    with pytest.raises(ValueError, match=r"shape \(n, 4\), got \(1, 3\)"):
        idx.add(np.array([4]), np.ones((1, 3)))
    with pytest.raises(ValueError, match="id 3 is already in the index"):
        idx.add(np.array([3]), np.ones((1, 4)))
    with pytest.raises(ValueError, match="ids must be >= 0, got -1"):
        idx.add(np.array([-1]), np.ones((1, 4)))
    with pytest.raises(ValueError, match="finite"):
        idx.add(np.array([5]), np.full((1, 4), np.nan))
    with pytest.raises(ValueError, match="kind must be 'flat' or 'hnsw', got 'ivf'"):
        VectorIndex(4, kind="ivf")
    with pytest.raises(ValueError, match="hnsw_m must be >= 4, got 2"):
        IndexOptions(hnsw_m=2)


def test_build_picks_flat_or_hnsw_by_threshold():
    rng = np.random.default_rng(2)
    vecs = _unit(rng, 30)
    small = VectorIndex.build(16, np.arange(30), vecs, IndexOptions(ann_threshold=30))
    big = VectorIndex.build(16, np.arange(30), vecs, IndexOptions(ann_threshold=29, hnsw_m=12, hnsw_ef_search=20))
    assert small.kind == "flat" and small.describe()["exact"] is True
    d = big.describe()
    assert big.kind == "hnsw" and d["M"] == 12 and d["ef_search"] == 20 and d["exact"] is False


def test_hnsw_recall_against_exact_and_ef_search_override(tmp_path):
    rng = np.random.default_rng(3)
    base = _unit(rng, 3000, dim=32)
    queries = _unit(rng, 50, dim=32)
    flat = VectorIndex.build(32, np.arange(3000), base, IndexOptions(ann_threshold=10_000))
    hnsw = VectorIndex.build(32, np.arange(3000), base, IndexOptions(ann_threshold=0, hnsw_m=16, hnsw_ef_search=128))
    _, exact = flat.search(queries, 10)
    _, approx = hnsw.search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.tolist(), exact.tolist())])
    assert recall >= 0.95
    hnsw.save(tmp_path / "h.faiss")
    assert VectorIndex.load(tmp_path / "h.faiss").ef_search == 128  # saved efSearch kept
    assert VectorIndex.load(tmp_path / "h.faiss", IndexOptions(hnsw_ef_search=7)).ef_search == 7


def test_load_rejects_garbage(tmp_path):
    (tmp_path / "x.faiss").write_bytes(b"not an index")
    with pytest.raises(RetrievalIndexError, match="cannot read FAISS index"):
        VectorIndex.load(tmp_path / "x.faiss")


def test_gpu_guard_on_cpu_machine():
    """With faiss-cpu (this machine) the guard reports no GPU and search stays on the CPU."""
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present; the CPU guard is not exercised here")
    assert gpu_count() == 0
    idx = VectorIndex(4)
    idx.add(np.array([1]), np.ones((1, 4)))
    assert idx.use_device("auto") == "cpu" and idx.device == "cpu"
    with pytest.raises(ConfigError, match="index_device is 'gpu'"):
        idx.use_device("gpu")
    with pytest.raises(ValueError, match="index_device must be one of auto, cpu, gpu, got 'tpu'"):
        idx.use_device("tpu")
    assert idx.search(np.ones((1, 4)), 1)[1][0, 0] == 1


def test_gpu_code_path_with_a_stand_in_for_faiss_gpu(monkeypatch):
    """The GPU branch: clone to the device, search there, refresh the copy after add/remove.

    faiss-gpu is not installable here, so ``StandardGpuResources``/``index_cpu_to_gpu``
    are replaced by CPU stand-ins that record the calls; the real GPU run is done on a
    machine with a GPU (see bench/retrieval.py --gpu-check).
    """
    import faiss

    calls = []
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "res", raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)

    def to_gpu(res, device, index):
        calls.append((res, device, index.ntotal))
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    assert gpu_count() == 1
    idx = VectorIndex(4)
    idx.add(np.array([1, 2]), np.eye(4, dtype=np.float32)[:2])
    assert idx.use_device("auto") == "gpu" and idx.describe()["device"] == "gpu"
    assert calls == [("res", 0, 2)]
    idx.add(np.array([3]), np.eye(4, dtype=np.float32)[2:3])
    assert calls[-1] == ("res", 0, 3)  # the device copy follows the CPU index
    assert idx.search(np.eye(4, dtype=np.float32)[2:3], 1)[1][0, 0] == 3
    idx.remove(np.array([3]))
    assert calls[-1] == ("res", 0, 2)
    assert idx.search(np.eye(4, dtype=np.float32)[2:3], 5)[1].shape == (1, 2)
    hnsw = VectorIndex(4, kind="hnsw", hnsw_m=8)
    hnsw.add(np.array([1]), np.ones((1, 4)))
    assert hnsw.use_device("auto") == "cpu"  # HNSW has no GPU version
    assert idx.use_device("cpu") == "cpu"
