"""Loaders: Markdown, text, HTML, PDF, DOCX keep title/source/headings; bad files are skipped with a reason."""

from __future__ import annotations

import zipfile

import pytest

from retrieval.chunking import chunk_document
from retrieval.loaders import load_docx, load_html, load_markdown, load_paths, load_pdf
from tests.retrieval.conftest import HTML_PAGE, make_docx, make_pdf, words


def test_markdown_front_matter_gives_title_and_source(tmp_path):
    p = tmp_path / "size.md"
    p.write_text('---\ntitle: "Return by size"\nsource: https://help.example.com/size\nflow: returns\n---\n'
                 "# Ignored heading\n\nBody.\n")
    doc = load_markdown(p, "size.md")
    assert (doc.title, doc.source, doc.metadata) == ("Return by size", "https://help.example.com/size",
                                                     {"flow": "returns"})
    assert doc.text.startswith("# Ignored heading")
    p.write_text("Intro\n\n## Sub\n\n# Main title\n\nx\n")
    assert load_markdown(p, "size.md").title == "Main title"  # first level-1 heading


def test_markdown_front_matter_url_is_the_public_address(tmp_path, caplog):
    p = tmp_path / "gift_cards.md"
    p.write_text("---\ntitle: Gift cards\nurl: https://help.example.com/gift-cards\n---\nNever expire.\n")
    doc = load_markdown(p, "gift_cards.md")
    assert (doc.title, doc.url, doc.source, doc.metadata) == ("Gift cards", "https://help.example.com/gift-cards",
                                                              p.as_posix(), {})
    assert {c.url for c in chunk_document(doc, words, chunk_tokens=16, overlap_tokens=0)} == {doc.url}
    p.write_text("---\nsource: https://help.example.com/size\n---\nBody.\n")
    assert load_markdown(p, "size.md").url == "https://help.example.com/size"  # an http(s) source is the URL
    p.write_text("Body without front matter.\n")
    assert load_markdown(p, "gift_cards.md").url == ""
    for bad in ("javascript:alert(1)", "/srv/docs/gift_cards.md", "file:///etc/passwd", "https://"):
        p.write_text(f"---\nurl: {bad}\n---\nBody.\n")
        assert load_markdown(p, "gift_cards.md").url == "", bad
    assert "front matter url must be an http(s) URL, got 'javascript:alert(1)'" in caplog.text


def test_html_becomes_markdown_with_headings(tmp_path):
    p = tmp_path / "shipping.html"
    p.write_text(HTML_PAGE, encoding="utf-8")
    doc = load_html(p, "shipping.html")
    assert doc.title == "Shipping help"
    assert doc.source == doc.url == "https://help.example.com/shipping"
    assert doc.format == "markdown"
    lines = doc.text.splitlines()
    assert "# Shipping" in lines and "## Tracking" in lines and "### International" in lines
    assert "SECRET_SCRIPT" not in doc.text and "color: red" not in doc.text and "Home | Menu" not in doc.text
    assert "- Customs fees are paid by the buyer." in lines
    assert "map of zones" in doc.text and "base64" not in doc.text  # images become their alt text
    chunks = chunk_document(doc, words, chunk_tokens=16, overlap_tokens=0)
    code = [c for c in chunks if "curl https://api.example.com/track/123" in c.text]
    assert len(code) == 1 and "```\n# comment: run this to check" in code[0].text
    assert code[0].headings == ["Shipping", "Tracking"]
    assert all(not h.startswith("comment") for c in chunks for h in c.headings)


def test_html_charset_and_fallback_title(tmp_path):
    p = tmp_path / "café-page.htm"
    p.write_bytes('<html><head><meta charset="latin-1"></head><body><p>Caf\xe9 opens at 9.</p></body></html>'
                  .encode("latin-1"))
    doc = load_html(p, "café-page.htm")
    assert doc.title == "café page" and "Café opens at 9." in doc.text
    assert doc.source == p.as_posix() and doc.url == ""


def test_pdf_text_and_metadata_title(tmp_path):
    p = make_pdf(tmp_path / "refunds.pdf", [["Refund policy", "Refunds take (5) business days."], ["Page two."]],
                 title="Refunds FAQ")
    doc = load_pdf(p, "refunds.pdf")
    assert doc.title == "Refunds FAQ" and doc.format == "text" and doc.metadata["pages"] == 2
    assert doc.text == "Refund policy\nRefunds take (5) business days.\n\nPage two.\n"
    untitled = load_pdf(make_pdf(tmp_path / "store_hours.pdf", [["Open 9 to 5."]]), "store_hours.pdf")
    assert untitled.title == "store hours"


def test_docx_headings_lists_tables(tmp_path):
    doc = load_docx(make_docx(tmp_path / "returns.docx", title="Returns handbook"), "returns.docx")
    assert doc.title == "Returns handbook" and doc.format == "markdown"
    assert doc.text.splitlines()[0] == "# Returns policy"
    assert "\n## Damaged items\n" in doc.text
    assert "- Send a photo of the damage to support.\n- We ship a replacement at no cost." in doc.text
    assert "| Tier | Window |\n| --- | --- |\n| Gold | 60 days |" in doc.text
    chunks = chunk_document(doc, words, chunk_tokens=20, overlap_tokens=0)
    assert any(c.headings == ["Returns policy", "Damaged items"] and "photo" in c.text for c in chunks)
    no_title = load_docx(make_docx(tmp_path / "r2.docx"), "r2.docx")
    assert no_title.title == "Returns policy"  # first Heading 1


def test_bad_files_are_skipped_with_one_line_each(tmp_path, caplog):
    good = tmp_path / "kb"
    good.mkdir()
    (good / "ok.md").write_text("# Fine\n\nText.\n")
    make_pdf(good / "ok.pdf", [["PDF text."]])
    (good / "corrupt.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage without xref")
    (good / "scan.pdf").write_bytes(make_pdf(tmp_path / "blank.pdf", [[]]).read_bytes())
    (good / "corrupt.docx").write_bytes(b"PK\x03\x04 not really a zip")
    with zipfile.ZipFile(good / "nodoc.docx", "w") as z:  # a zip, but not a Word package
        z.writestr("hello.txt", "hi")
    (good / "empty.md").write_text("   \n\n")
    (good / "binary.txt").write_bytes(b"\x00\x01\x02\x03")
    (good / "latin1.txt").write_bytes("na\xefve".encode("latin-1"))
    (good / "tool.exe").write_bytes(b"MZ\x90\x00")
    (good / ".hidden.md").write_text("# hidden\n")
    docs, skipped = load_paths([good])
    assert sorted(d.doc_id for d in docs) == ["ok.md", "ok.pdf"]
    reasons = {s.path.rsplit("/", 1)[-1]: s.reason for s in skipped}
    assert set(reasons) == {"corrupt.pdf", "scan.pdf", "corrupt.docx", "nodoc.docx", "empty.md", "binary.txt",
                            "latin1.txt", "tool.exe"}
    assert reasons["corrupt.pdf"].startswith("unreadable PDF file (")
    assert "no extractable text" in reasons["scan.pdf"]
    assert reasons["corrupt.docx"].startswith("unreadable DOCX file (")
    assert reasons["nodoc.docx"].startswith("unreadable DOCX file (")
    assert reasons["empty.md"] == "empty document"
    assert reasons["binary.txt"] == "binary file (NUL bytes)"
    assert reasons["latin1.txt"].startswith("not UTF-8 text")
    assert reasons["tool.exe"] == "unsupported file type '.exe'"
    assert all("\n" not in r for r in reasons.values())
    assert sum("skipped" in r.message for r in caplog.records if r.name == "retrieval.loaders") == 8


def test_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="path does not exist"):
        load_paths([tmp_path / "nope"])


def test_doc_ids_are_relative_to_the_named_root(tmp_path):
    (tmp_path / "returns").mkdir()
    (tmp_path / "returns" / "size.md").write_text("# Size\n\nx\n")
    docs, _ = load_paths([tmp_path])
    assert [d.doc_id for d in docs] == ["returns/size.md"]
    docs, _ = load_paths([tmp_path / "returns" / "size.md"])
    assert [d.doc_id for d in docs] == ["size.md"]
