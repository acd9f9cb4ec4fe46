"""Helpers for the retrieval tests: tiny PDF / DOCX / HTML files built in the test, a word-count tokenizer.

The real MiniLM embedder comes from the session fixture ``embedder`` in ``tests/conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def make_pdf(path: Path, pages: list[list[str]], title: str | None = None) -> Path:
    """Write a minimal valid PDF: one text line per string, Helvetica 12 pt, optional ``/Title``.

    Hand-assembled objects with a correct xref table, so pypdf reads it strictly.
    """

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    n_pages = len(pages)
    font_obj = 3 + 2 * n_pages
    info_obj = font_obj + 1
    objs: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        ("<< /Type /Pages /Kids [" + " ".join(f"{3 + 2 * i} 0 R" for i in range(n_pages))
         + f"] /Count {n_pages} >>").encode(),
    ]
    for i, lines in enumerate(pages):
        content = "BT /F1 12 Tf 14 TL 72 720 Td " + " ".join(f"({esc(line)}) Tj T*" for line in lines) + " ET"
        data = content.encode("latin-1")
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
            f"/Resources << /Font << /F1 {font_obj} 0 R >> >> >>".encode()
        )
        objs.append(b"<< /Length %d >>\nstream\n" % len(data) + data + b"\nendstream")
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    objs.append(f"<< /Title ({esc(title or '')}) /Producer (tests) >>".encode())
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    trailer = f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R"
    trailer += f" /Info {info_obj} 0 R" if title else ""
    out += (trailer + f" >>\nstartxref\n{xref}\n%%EOF\n").encode()
    path.write_bytes(bytes(out))
    return path


def make_docx(path: Path, title: str | None = None) -> Path:
    """A Word file with a title property, Heading 1/2 paragraphs, a bulleted list and a 2x2 table."""
    import docx

    d = docx.Document()
    if title:
        d.core_properties.title = title
    d.add_heading("Returns policy", level=1)
    d.add_paragraph("Items can be returned within 30 days of delivery.")
    d.add_heading("Damaged items", level=2)
    d.add_paragraph("Send a photo of the damage to support.", style="List Bullet")
    d.add_paragraph("We ship a replacement at no cost.", style="List Bullet")
    table = d.add_table(rows=2, cols=2)
    for (r, c), text in {(0, 0): "Tier", (0, 1): "Window", (1, 0): "Gold", (1, 1): "60 days"}.items():
        table.cell(r, c).text = text
    d.add_paragraph("Refunds reach the card in 5 business days.")
    d.save(str(path))
    return path


HTML_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Shipping help</title>
<link rel="canonical" href="https://help.example.com/shipping">
<style>body { color: red }</style><script>var tracking = "SECRET_SCRIPT";</script></head>
<body><nav>Home | Menu</nav>
<h1>Shipping</h1>
<p>Orders ship within <b>two</b> business days.</p>
<h2>Tracking</h2>
<p>Use the tracking link in your email.</p>
<pre><code># comment: run this to check
curl https://api.example.com/track/123
</code></pre>
<h3>International</h3>
<ul><li>Customs fees are paid by the buyer.</li><li>Delivery takes 7 to 14 days.</li></ul>
<img src="data:image/png;base64,AAAA" alt="map of zones">
</body></html>
"""


def words(text: str) -> int:
    """A deterministic stand-in tokenizer: whitespace-separated words."""
    return len(text.split())


@pytest.fixture
def pdf_factory(tmp_path):
    return lambda name, pages, title=None: make_pdf(tmp_path / name, pages, title)
