"""Retriever: dense/BM25/hybrid modes, RRF, min_score, top_k bounds, empty index, hot reload."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from chatbot.config import Settings
from chatbot.options import search_options
from chatbot.errors import RetrievalIndexError
from retrieval.bm25 import BM25Index
from retrieval.documents import Document
from retrieval.ingest import ingest_documents
from retrieval.retriever import Retriever

FACTS = {
    "refunds": ("Refunds", "Refunds are paid back to the original card within five business days."),
    "shipping": ("Shipping", "Standard shipping takes three to five days; express arrives the next day."),
    "password": ("Password reset", "To reset a forgotten password, click 'Forgot password' on the sign-in page."),
    "giftcards": ("Gift cards", "Gift cards never expire and can be used online and in stores."),
    "sku": ("Product codes", "The winter parka has the product code ZX-9042 in our catalogue."),
    "warranty": ("Warranty", "Electronics carry a two year warranty against manufacturing defects."),
}


def _settings(tmp_path, **kw) -> Settings:
    return Settings(data_dir=tmp_path / "var", **kw)


@pytest.fixture
def index_dir(tmp_path, embedder):
    docs = [Document(k, t, f"kb/{k}.md", text, format="text") for k, (t, text) in FACTS.items()]
    ingest_documents(docs, tmp_path / "index", embedder, 64, 8)
    return tmp_path / "index"


@pytest.fixture
def retriever(index_dir, embedder, tmp_path):
    return Retriever(index_dir, embedder, search_options(_settings(tmp_path)))


def test_dense_search_finds_the_paraphrase(retriever):
    hits = retriever.search("how long until my money comes back?", top_k=3, mode="dense")
    assert hits[0].doc_id == "refunds" and [h.rank for h in hits] == [1, 2, 3]
    assert all(-1.0 <= h.score <= 1.0 for h in hits) and hits[0].score > hits[1].score >= hits[2].score
    assert hits[0].title == "Refunds" and hits[0].source == "kb/refunds.md" and hits[0].mode == "dense"
    assert hits[0].bm25_score is None and hits[0].fused_score is None


def test_bm25_finds_the_exact_code(retriever):
    hits = retriever.search("ZX-9042", top_k=5, mode="bm25")
    assert [h.doc_id for h in hits] == ["sku"]  # only documents sharing a term
    assert hits[0].bm25_score > 0 and -1 <= hits[0].score <= 1  # score stays the cosine


def test_hybrid_is_reciprocal_rank_fusion(retriever):
    q = "forgot my password for the online store gift card"
    v = retriever.refresh()
    qv = retriever.embedder.encode([q])
    _, ids = v.index.search(qv, 50)
    dense = ids[0].tolist()
    lexical = [cid for cid, _ in v.bm25().search(q, 50)]
    assert dense and lexical
    expected: dict[int, float] = {}
    for ranking in (dense, lexical):
        for rank, cid in enumerate(ranking, 1):
            expected[cid] = expected.get(cid, 0.0) + 1.0 / (60 + rank)
    hits = retriever.search(q, top_k=6, mode="hybrid")
    assert [h.chunk_id for h in hits] == sorted(expected, key=lambda c: -expected[c])[:6]
    for h in hits:
        assert h.fused_score == pytest.approx(expected[h.chunk_id])
        assert h.mode == "hybrid"


def test_top_k_larger_than_collection_and_no_duplicates(tmp_path, embedder):
    docs = [Document("a", "A", "a", "Returns are free.", format="text"),
            Document("b", "B", "b", "Shipping is free over fifty euros.", format="text")]
    ingest_documents(docs, tmp_path / "index", embedder, 64, 8)
    r = Retriever(tmp_path / "index", embedder, search_options(_settings(tmp_path)))
    for mode in ("dense", "bm25", "hybrid"):
        hits = r.search("free returns", top_k=5, mode=mode)
        ids = [h.chunk_id for h in hits]
        assert 1 <= len(hits) <= 2 and len(set(ids)) == len(ids) and all(i >= 0 for i in ids), mode
    assert len(r.search("free returns", top_k=5, mode="dense")) == 2


def test_empty_index_returns_nothing(tmp_path, embedder):
    r = Retriever(tmp_path / "nothing", embedder, search_options(_settings(tmp_path)))
    assert r.search("anything") == [] and r.version is None
    ingest_documents([], tmp_path / "empty", embedder, 64, 8, sync=True)
    ingest_documents([Document("a", "A", "a", "x y z", format="text")], tmp_path / "empty", embedder, 64, 8)
    ingest_documents([], tmp_path / "empty", embedder, 64, 8, sync=True)  # everything removed again
    r2 = Retriever(tmp_path / "empty", embedder, search_options(_settings(tmp_path)))
    assert r2.version is not None
    for mode in ("dense", "bm25", "hybrid"):
        assert r2.search("x y z", top_k=3, mode=mode) == []


def test_min_score_is_a_cosine_threshold_in_every_mode(retriever):
    q = "zebra migration across the serengeti"
    for mode in ("dense", "bm25", "hybrid"):
        assert retriever.search(q, top_k=4, min_score=0.5, mode=mode) == []
    unfiltered = retriever.search("gift cards expire?", top_k=6, mode="hybrid")
    cut = unfiltered[0].score - 0.01
    kept = retriever.search("gift cards expire?", top_k=6, min_score=cut, mode="hybrid")
    assert [h.chunk_id for h in kept] == [h.chunk_id for h in unfiltered if h.score >= cut]
    assert kept[0].doc_id == "giftcards" and [h.rank for h in kept] == list(range(1, len(kept) + 1))


def test_default_mode_from_settings_and_positional_signature(index_dir, embedder, tmp_path):
    r = Retriever(index_dir, embedder, search_options(_settings(tmp_path, retrieval_mode="bm25")))
    assert r.mode == "bm25"
    hits = r.search("ZX-9042", 2, 0.0)  # the service's call: (query, top_k, min_score)
    assert [h.mode for h in hits] == ["bm25"]
    assert Retriever(index_dir, embedder, search_options(_settings(tmp_path))).mode == Settings().retrieval_mode
    with pytest.raises(ValidationError, match="retrieval_mode"):
        _settings(tmp_path, retrieval_mode="sparse")


def test_bad_arguments_name_the_value(retriever):
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        retriever.search("x", top_k=0)
    with pytest.raises(ValueError, match="retrieval_mode must be one of dense, bm25, hybrid, got 'fuzzy'"):
        retriever.search("x", mode="fuzzy")


def test_hot_reload_follows_new_versions_and_ignores_broken_ones(index_dir, embedder, tmp_path, caplog):
    r = Retriever(index_dir, embedder, search_options(_settings(tmp_path)))
    v1 = r.version
    assert r.search("loyalty points", top_k=1, mode="bm25") == []
    (index_dir / "versions" / ".tmp-v9999999999999").mkdir()  # a half-written version is never read
    docs = [Document(k, t, f"kb/{k}.md", text, format="text") for k, (t, text) in FACTS.items()]
    docs.append(Document("loyalty", "Loyalty", "kb/loyalty.md", "Loyalty points are earned on every order.",
                         format="text"))
    v2 = ingest_documents(docs, index_dir, embedder, 64, 8).version
    assert v2 != v1
    hits = r.search("loyalty points", top_k=1, mode="bm25")  # same Retriever, no restart
    assert r.version == v2 and hits[0].doc_id == "loyalty"
    # CURRENT names a version that cannot be read: keep serving v2
    (index_dir / "CURRENT").write_text("v0000000000001\n")
    with caplog.at_level(logging.ERROR, logger="retrieval.retriever"):
        assert r.search("loyalty points", top_k=1, mode="bm25")[0].doc_id == "loyalty"
    assert r._version.version == v2 and "failed to load" in caplog.text
    with pytest.raises(RetrievalIndexError, match="v0000000000001"):
        Retriever(index_dir, embedder, search_options(_settings(tmp_path))).search("x")


def test_searches_keep_the_old_version_while_another_thread_loads(index_dir, embedder, tmp_path):
    r = Retriever(index_dir, embedder, search_options(_settings(tmp_path)))
    v1 = r.version
    docs = [Document("only", "Only", "kb/only.md", "Only document left.", format="text")]
    ingest_documents(docs, index_dir, embedder, 64, 8, sync=True)
    r._lock.acquire()  # as if another request were loading the new version
    try:
        hits = r.search("refund", top_k=2, mode="dense")
        assert r._version.version == v1 and hits[0].doc_id == "refunds"
    finally:
        r._lock.release()
    assert r.search("refund", top_k=2, mode="dense")[0].doc_id == "only"


def test_bm25_index_edge_cases():
    assert BM25Index([], []).search("anything", 3) == []
    only_stopwords = BM25Index([1], ["the and of"])
    assert only_stopwords.search("the", 3) == []
    b = BM25Index([10, 20, 30], ["refunds take five days", "shipping is free", "refund policy for shoes"])
    got = b.search("Refunding shoes", 10)
    assert [i for i, _ in got] == [30, 10] and got[0][1] > got[1][1] > 0  # stemmed, no zero-score docs
    assert b.search("the of", 2) == []
    with pytest.raises(ValueError, match="ids and texts differ in length: 1 vs 2"):
        BM25Index([1], ["a", "b"])


def test_chinese_japanese_and_mixed_queries_through_an_ingested_index(tmp_path, embedder):
    """Issue 13 item 3 end to end: ingest (chunking), the index version's BM25, and hybrid fusion."""
    from tests.retrieval.cjk_data import long_chinese_paragraph

    docs = [
        Document("poem", "静夜思", "kb/poem.md", "床前明月光，疑是地上霜。举头望明月，低头思故乡。", format="text"),
        Document("returns-ja", "返品", "kb/returns-ja.md", "返品は30日以内です", format="text"),
        Document("app", "App", "kb/app.md", "在 App Store 搜索 ShopMate 即可下载我们的App。", format="text"),
        Document("policy-zh", "政策", "kb/policy-zh.md", long_chinese_paragraph(False), format="text"),
        *[Document(k, t, f"kb/{k}.md", text, format="text") for k, (t, text) in FACTS.items()],
    ]
    ingest_documents(docs, tmp_path / "index", embedder, 200, 32)
    r = Retriever(tmp_path / "index", embedder, search_options(_settings(tmp_path)))
    for mode in ("bm25", "hybrid"):
        assert r.search("故乡", 3, mode=mode)[0].doc_id == "poem"
        assert r.search("返品", 3, mode=mode)[0].doc_id == "returns-ja"
        assert r.search("ShopMate下载", 3, mode=mode)[0].doc_id == "app"
        assert r.search("refund to my card", 3, mode=mode)[0].doc_id == "refunds"
    # the end of the 3,000-character paragraph was embedded and indexed too, not cut off at 256 tokens
    tail_hits = r.search("第117条", 3, mode="bm25")
    assert tail_hits and tail_hits[0].doc_id == "policy-zh" and "第117条" in tail_hits[0].text
