"""Ingest: idempotent, incremental, sync deletes, bad files skipped, manifest, versions, CLI output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from retrieval.documents import Document
from retrieval.index import IndexOptions, current_version_name, load_version
from retrieval.ingest import ingest, ingest_documents
from tests.retrieval.conftest import make_docx, make_pdf

DOCS = {
    "returns.md": "# Returns\n\nYou can return any item within 30 days for a full refund.\n\n"
    "## Damaged items\n\nSend us a photo and we ship a replacement.\n",
    "shipping.md": "# Shipping\n\nStandard delivery takes 3 to 5 business days.\n",
    "account.txt": "To reset your password, use the link on the sign-in page.\n",
}


def _write_kb(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (root / name).write_text(text)
    return root


def _chunk_ids_by_doc(index_dir: Path) -> dict[str, set[int]]:
    v = load_version(index_dir)
    out: dict[str, set[int]] = {}
    for c in v.chunks.values():
        out.setdefault(c.doc_id, set()).add(c.chunk_id)
    return out


def test_reingest_same_folder_changes_nothing(tmp_path, embedder):
    kb = _write_kb(tmp_path / "kb")
    first = ingest([kb], tmp_path / "index", embedder, chunk_tokens=64, overlap_tokens=8)
    assert first.published and sorted(first.added) == sorted(DOCS) and first.chunks_total >= 3
    before = _chunk_ids_by_doc(tmp_path / "index")
    second = ingest([kb], tmp_path / "index", embedder, chunk_tokens=64, overlap_tokens=8)
    assert not second.published and second.version == first.version
    assert second.chunks_total == first.chunks_total and second.chunks_embedded == 0
    assert sorted(second.unchanged) == sorted(DOCS)
    assert current_version_name(tmp_path / "index") == first.version
    assert _chunk_ids_by_doc(tmp_path / "index") == before
    # the same folder reached through another path keeps its ids
    third = ingest([tmp_path / "." / "kb"], tmp_path / "index", embedder, chunk_tokens=64, overlap_tokens=8)
    assert not third.published


def test_changed_file_replaces_its_chunks(tmp_path, embedder):
    kb = _write_kb(tmp_path / "kb")
    ingest([kb], tmp_path / "index", embedder, chunk_tokens=64, overlap_tokens=8)
    before = _chunk_ids_by_doc(tmp_path / "index")
    (kb / "shipping.md").write_text("# Shipping\n\nExpress delivery arrives the next business day.\n")
    report = ingest([kb], tmp_path / "index", embedder, chunk_tokens=64, overlap_tokens=8)
    assert report.published and report.updated == ["shipping.md"] and report.chunks_embedded == 1
    after = _chunk_ids_by_doc(tmp_path / "index")
    assert not after["shipping.md"] & before["shipping.md"]  # old chunks gone
    assert after["returns.md"] == before["returns.md"] and after["account.txt"] == before["account.txt"]
    v = load_version(tmp_path / "index")
    texts = [c.text for c in v.chunks.values() if c.doc_id == "shipping.md"]
    assert texts == ["# Shipping\n\nExpress delivery arrives the next business day."]
    assert len(v.index) == sum(len(s) for s in after.values())
    # the re-used vectors are the ones embedded the first time (copied, not re-embedded)
    rid = sorted(after["returns.md"])
    want = embedder.encode([v.chunks[i].embedding_text() for i in rid])
    np.testing.assert_allclose(v.index.reconstruct(np.array(rid)), want, atol=1e-4)


def test_deleted_file_loses_its_chunks_with_sync_only(tmp_path, embedder):
    kb = _write_kb(tmp_path / "kb")
    ingest([kb], tmp_path / "index", embedder, chunk_tokens=64, overlap_tokens=8)
    (kb / "account.txt").unlink()
    kept = ingest([kb], tmp_path / "index", embedder, chunk_tokens=64, overlap_tokens=8)
    assert not kept.published and "account.txt" in _chunk_ids_by_doc(tmp_path / "index")
    synced = ingest([kb], tmp_path / "index", embedder, chunk_tokens=64, overlap_tokens=8, sync=True)
    assert synced.published and synced.removed == ["account.txt"]
    by_doc = _chunk_ids_by_doc(tmp_path / "index")
    assert set(by_doc) == {"returns.md", "shipping.md"}
    assert len(load_version(tmp_path / "index").index) == sum(len(s) for s in by_doc.values())


def test_sync_leaves_other_roots_alone(tmp_path, embedder):
    a = _write_kb(tmp_path / "a")
    b = tmp_path / "b"
    b.mkdir()
    (b / "faq.md").write_text("# FAQ\n\nWe are open on weekends.\n")
    ingest([a], tmp_path / "index", embedder, 64, 8)
    ingest([b], tmp_path / "index", embedder, 64, 8, sync=True)  # mirrors b only
    assert set(_chunk_ids_by_doc(tmp_path / "index")) == {*DOCS, "faq.md"}


def test_corrupt_pdf_is_skipped_and_reported(tmp_path, embedder):
    kb = _write_kb(tmp_path / "kb")
    (kb / "broken.pdf").write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog")
    make_pdf(kb / "hours.pdf", [["Store hours", "We open at 9 am."]], title="Store hours")
    make_docx(kb / "handbook.docx", title="Handbook")
    report = ingest([kb], tmp_path / "index", embedder, 64, 8)
    assert [(Path(s.path).name, s.reason.split(" (")[0]) for s in report.skipped] == [
        ("broken.pdf", "unreadable PDF file")
    ]
    assert report.published and sorted(report.added) == sorted([*DOCS, "hours.pdf", "handbook.docx"])
    assert "1 files skipped" in report.summary()
    v = load_version(tmp_path / "index")
    hours = [c for c in v.chunks.values() if c.doc_id == "hours.pdf"]
    assert hours[0].title == "Store hours" and hours[0].source.endswith("kb/hours.pdf")
    hb = [c for c in v.chunks.values() if c.doc_id == "handbook.docx"]
    assert {tuple(c.headings) for c in hb} >= {("Returns policy",)}


def test_manifest_records_provenance(tmp_path, embedder):
    kb = _write_kb(tmp_path / "kb")
    report = ingest([kb], tmp_path / "index", embedder, 64, 8)
    path = tmp_path / "index" / "versions" / report.version / "manifest.json"
    m = json.loads(path.read_text())
    assert m["embedder"] == embedder.name and m["dim"] == 384 and m["normalized"] is True
    assert m["chunking"] == {"chunk_tokens": 64, "overlap_tokens": 8, "method": "heading-aware"}
    assert m["document_count"] == 3 and m["chunk_count"] == report.chunks_total
    assert m["documents"]["shipping.md"]["sha256"] == Document(
        "shipping.md", "Shipping", "", DOCS["shipping.md"]).sha256
    assert m["index"]["kind"] == "flat" and m["version"] == report.version and m["created"].endswith("+00:00")
    assert m["parent_version"] is None


def test_new_version_beside_the_old_and_hnsw_above_threshold(tmp_path, embedder):
    kb = _write_kb(tmp_path / "kb")
    opts = IndexOptions(ann_threshold=2, hnsw_m=8, hnsw_ef_search=16)
    v1 = ingest([kb], tmp_path / "index", embedder, 64, 8, index_options=opts).version
    (kb / "new.md").write_text("# Gift cards\n\nGift cards never expire.\n")
    v2 = ingest([kb], tmp_path / "index", embedder, 64, 8, index_options=opts).version
    assert v1 != v2 and (tmp_path / "index" / "versions" / v1).is_dir()  # old version still there
    assert load_version(tmp_path / "index", v1).manifest["chunk_count"] < load_version(tmp_path / "index").manifest[
        "chunk_count"]
    cur = load_version(tmp_path / "index")
    assert cur.index.kind == "hnsw" and cur.manifest["index"]["M"] == 8
    assert cur.manifest["parent_version"] == v1
    assert not list((tmp_path / "index" / "versions").glob(".tmp-*"))
    # every chunk's own vector finds itself first in the HNSW index
    ids, vecs = cur.index.vectors()
    assert (cur.index.search(vecs, 1)[1][:, 0] == ids).all()
    (kb / "new.md").unlink()
    r = ingest([kb], tmp_path / "index", embedder, 64, 8, sync=True, index_options=opts)
    assert r.removed == ["new.md"] and len(load_version(tmp_path / "index").index) == r.chunks_total


def test_incompatible_settings_raise(tmp_path, embedder):
    kb = _write_kb(tmp_path / "kb")
    ingest([kb], tmp_path / "index", embedder, 64, 8)
    with pytest.raises(ValueError, match="used chunking"):
        ingest([kb], tmp_path / "index", embedder, 100, 8)
    with pytest.raises(ValueError, match="chunk_tokens must be <= 254 .* got 300"):
        ingest([kb], tmp_path / "other", embedder, 300, 8)
    with pytest.raises(ValueError, match="doc_id must be unique, got 'a' twice"):
        ingest_documents([Document("a", "A", "s", "x"), Document("a", "A", "s", "y")], tmp_path / "x", embedder)


def test_ingest_documents_sync_mirrors_the_given_set(tmp_path, embedder):
    docs = [Document(f"d{i}", f"Doc {i}", "mem", f"Fact number {i}.", format="text") for i in range(4)]
    r1 = ingest_documents(docs, tmp_path / "index", embedder, 64, 8, sync=True)
    assert r1.chunks_total == 4
    r2 = ingest_documents(docs[:2], tmp_path / "index", embedder, 64, 8, sync=True)
    assert sorted(r2.removed) == ["d2", "d3"] and r2.chunks_total == 2 and r2.chunks_embedded == 0
    r3 = ingest_documents([], tmp_path / "index", embedder, 64, 8, sync=True)
    assert r3.published and r3.chunks_total == 0 and len(load_version(tmp_path / "index").index) == 0


@pytest.mark.slow
def test_cli_ingest_prints_skips_and_summary(tmp_path, monkeypatch, capsys):
    from chatbot.cli import main

    kb = _write_kb(tmp_path / "kb")
    (kb / "broken.pdf").write_bytes(b"%PDF-1.4 junk")
    (kb / "blob.bin").write_bytes(b"\x00\x01")
    monkeypatch.setenv("CHATBOT_DATA_DIR", str(tmp_path / "var"))
    assert main(["ingest", str(kb)]) == 0
    out = capsys.readouterr().out.splitlines()
    skipped = [line for line in out if line.startswith("skipped ")]
    assert len(skipped) == 2 and any("broken.pdf: unreadable PDF file" in s for s in skipped)
    assert any("blob.bin: unsupported file type '.bin'" in s for s in skipped)
    assert re.fullmatch(r"index v\d+ \(new\): 3 added, 0 updated, 0 removed, 0 unchanged documents; "
                        r"(\d+) chunks \(\1 embedded\); 2 files skipped", out[-1]), out[-1]
    assert main(["ingest", str(kb)]) == 0
    assert "(unchanged): 0 added, 0 updated, 0 removed, 3 unchanged" in capsys.readouterr().out


def test_index_cut_by_an_older_chunker_is_rechunked_keeping_unchanged_vectors(tmp_path, embedder):
    """Documents of an index made before chunker version 2 are re-chunked on the next ingest, even unchanged."""
    from retrieval.chunking import CHUNKER_VERSION

    kb = _write_kb(tmp_path / "kb")
    (kb / "zh.md").write_text("# 退货\n\n" + "收到商品后三十天内可以申请退货。" * 40 + "\n", encoding="utf-8")
    first = ingest([kb], tmp_path / "index", embedder, chunk_tokens=64, overlap_tokens=8)
    assert CHUNKER_VERSION == 2 and first.published
    v = load_version(tmp_path / "index")
    assert {e["chunker_version"] for e in v.manifest["documents"].values()} == {2}
    zh_chunks = [c for c in v.chunks.values() if c.doc_id == "zh.md"]
    assert len(zh_chunks) >= 5 and max(embedder.count_tokens(c.text) for c in zh_chunks) <= 64
    # make it look like an index of chunker version 1 (no chunker_version in the document entries)
    mpath = v.path / "manifest.json"
    m = json.loads(mpath.read_text())
    for e in m["documents"].values():
        del e["chunker_version"]
    mpath.write_text(json.dumps(m))
    second = ingest([kb], tmp_path / "index", embedder, chunk_tokens=64, overlap_tokens=8)
    assert second.published and sorted(second.updated) == sorted([*DOCS, "zh.md"]) and second.unchanged == []
    assert second.chunks_embedded == 0  # the same text gives the same chunk ids: vectors are copied
    v2 = load_version(tmp_path / "index")
    assert {e["chunker_version"] for e in v2.manifest["documents"].values()} == {2}
    third = ingest([kb], tmp_path / "index", embedder, chunk_tokens=64, overlap_tokens=8)
    assert not third.published and len(third.unchanged) == 4
