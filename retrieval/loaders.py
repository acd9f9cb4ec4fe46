"""Read files into :class:`~retrieval.documents.Document` records.

Formats and parsers:

* Markdown (``.md``, ``.markdown``): read here; front matter (``---`` YAML block)
  gives ``title``, ``source`` and the public ``url`` (an ``http(s)`` ``source`` is the URL too).
* Plain text (``.txt``, ``.text``): read here; no headings.
* HTML (``.html``, ``.htm``): BeautifulSoup (``beautifulsoup4``) parses and decodes
  the page (charset from ``<meta>``), drops non-text elements (script, style,
  nav, svg, ...), and ``markdownify`` turns the rest into Markdown with ATX
  headings (``<h2>`` -> ``##``), lists, tables and fenced ``<pre>`` blocks, so the
  chunker stays heading-aware. We chose these two over ``trafilatura``: trafilatura
  extracts the "main content" heuristically and may drop sections of a help-centre
  page, while we want every visible paragraph of the document kept, with its headings.
  Title: ``<title>``, else the first ``<h1>``; source (and public URL when ``http(s)``):
  ``<link rel=canonical>`` or ``og:url``, else the path.
* PDF (``.pdf``): ``pypdf`` (pure Python, maintained) extracts the text layer page by
  page; title from the PDF metadata, else the file name. PDFs carry no reliable
  heading structure, so they are chunked as plain text. Encrypted PDFs (unless
  the empty password opens them) and PDFs without a text layer (scans) are skipped.
* DOCX (``.docx``): ``python-docx`` reads paragraphs and tables in body order;
  paragraph styles ``Title``/``Heading 1..9`` become Markdown headings, list styles
  become ``-``/``1.`` items, tables become Markdown tables. Title: the document
  properties' title, else the first Title/Heading 1, else the file name.

Files that are empty, binary, not UTF-8 (text formats), corrupt, encrypted or of
an unsupported type are reported as :class:`Skipped` with a one-line reason,
never raised, so one bad file never breaks an ingest.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from chatbot.errors import DocumentNotFoundError, RetrievalError
from retrieval.documents import Document

log = logging.getLogger(__name__)

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.S)
_H1 = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.M)


@dataclass
class Skipped:
    """A file that was not ingested, and why (one line)."""

    path: str
    reason: str


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise RetrievalError("binary file (NUL bytes)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RetrievalError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _split_front_matter(text: str) -> tuple[dict, str]:
    m = _FRONT_MATTER.match(text)
    if not m:
        return {}, text
    import yaml

    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return {}, text
    if not isinstance(meta, dict):
        return {}, text
    return meta, text[m.end() :]


def public_url(value: object) -> str:
    """``value`` when it is an absolute ``http``/``https`` URL with a host (what a customer's browser may
    open), else ``""``: a path, ``javascript:``, ``file:`` or ``data:`` address is never a public URL."""
    from urllib.parse import urlsplit

    text = str(value or "").strip()
    try:
        parts = urlsplit(text)
    except ValueError:
        return ""
    ok = parts.scheme.lower() in ("http", "https") and bool(parts.netloc) and not any(c.isspace() for c in text)
    return text if ok else ""


def load_markdown(path: Path, doc_id: str) -> Document:
    """Read a Markdown file; title from front matter, else the first ``# `` heading, else the file name.

    Front matter ``url:`` is the document's public address (an ``http(s)`` URL; anything else is
    ignored with a warning); without it an ``http(s)`` ``source:`` is.
    """
    meta, body = _split_front_matter(_read_text(path))
    title = str(meta.pop("title", "") or "")
    if not title:
        m = _H1.search(body)
        title = m.group(1).strip() if m else path.stem.replace("_", " ").replace("-", " ")
    source = str(meta.pop("source", "") or path.as_posix())
    raw_url = meta.pop("url", None)
    url = public_url(raw_url)
    if raw_url and not url:
        log.warning("%s: front matter url must be an http(s) URL, got %r; the document has no public URL",
                    path, raw_url)
    return Document(doc_id=doc_id, title=title, source=source, text=body, format="markdown", metadata=meta,
                    url=url or public_url(source))


def load_text(path: Path, doc_id: str) -> Document:
    """Read a plain-text file; the title is the file name."""
    text = _read_text(path)
    return Document(doc_id=doc_id, title=path.stem.replace("_", " "), source=path.as_posix(), text=text, format="text")


@contextmanager
def _parsing(kind: str):
    """Turn any parser failure into ``RetrievalError("unreadable <kind> file: ...")`` (one line)."""
    try:
        yield
    except ValueError:
        raise
    except Exception as exc:  # parsers raise their own types (PdfReadError, BadZipFile, KeyError, ...)
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise RetrievalError(f"unreadable {kind} file ({type(exc).__name__}: {msg[:200]})") from exc


def _tidy_markdown(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\xa0", " ").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


#: HTML elements whose content is not document text.
_HTML_DROP = ("script", "style", "noscript", "template", "svg", "canvas", "iframe", "object", "nav", "head")


def load_html(path: Path, doc_id: str) -> Document:
    """Read an HTML page as Markdown (headings as ``#`` lines); see the module notes.

    Raises:
        RetrievalError: binary content or a page that cannot be parsed.
    """
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise RetrievalError("binary file (NUL bytes)")
    with _parsing("HTML"):
        from bs4 import BeautifulSoup

        soup = BeautifulSoup(raw, "html.parser")
        title = soup.title.get_text(" ", strip=True) if soup.title else ""
        canonical = soup.find("link", rel="canonical")
        og_url = soup.find("meta", attrs={"property": "og:url"})
        source = (canonical.get("href") if canonical else None) or (og_url.get("content") if og_url else None)
        for tag in soup(list(_HTML_DROP)):
            tag.decompose()
        if not title:
            h1 = soup.find("h1")
            title = h1.get_text(" ", strip=True) if h1 else ""
        body = soup.body or soup
        text = _image_alt_converter()(heading_style="ATX", bullets="-", code_language="").convert_soup(body)
    return Document(
        doc_id=doc_id,
        title=title or path.stem.replace("_", " ").replace("-", " "),
        source=str(source or path.as_posix()),
        text=_tidy_markdown(text),
        format="markdown",
        metadata={"format": "html"},
        url=public_url(source),
    )


@functools.cache
def _image_alt_converter():
    """The markdownify converter class (built on first use, so importing this module stays light)."""
    from markdownify import MarkdownConverter

    class ImageAltConverter(MarkdownConverter):
        """Images become their alt text (no data URIs or image paths in the chunks)."""

        def convert_img(self, el, text, parent_tags):
            return el.attrs.get("alt", "") or ""

    return ImageAltConverter


def load_pdf(path: Path, doc_id: str) -> Document:
    """Read the text layer of a PDF (pages joined by blank lines); title from its metadata.

    Raises:
        RetrievalError: corrupt or encrypted PDF, or one without extractable text.
    """
    with _parsing("PDF"):
        from pypdf import PdfReader

        reader = PdfReader(str(path))
        if reader.is_encrypted and not reader.decrypt(""):
            raise RetrievalError("encrypted PDF (password needed)")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
        meta = reader.metadata
        title = str(meta.title).strip() if meta is not None and meta.title else ""
    text = "\n\n".join(p for p in pages if p)
    if not text.strip():
        raise RetrievalError(f"PDF has no extractable text ({len(pages)} pages; scanned images?)")
    return Document(
        doc_id=doc_id,
        title=title or path.stem.replace("_", " ").replace("-", " "),
        source=path.as_posix(),
        text=text + "\n",
        format="text",
        metadata={"format": "pdf", "pages": len(pages)},
    )


_DOCX_HEADING = re.compile(r"^Heading\s*(\d+)$", re.I)


def _docx_paragraph(par) -> tuple[str, int | None]:
    """Markdown line of a python-docx paragraph and its heading level (None for body text)."""
    text = " ".join(par.text.split())
    style = (par.style.name if par.style is not None else "") or ""
    if not text:
        return "", None
    if style.lower() == "title":
        return f"# {text}", 0
    m = _DOCX_HEADING.match(style)
    if m:
        level = min(max(int(m.group(1)), 1), 6)
        return f"{'#' * level} {text}", level
    if style.lower().startswith("list bullet"):
        return f"- {text}", None
    if style.lower().startswith("list number"):
        return f"1. {text}", None
    return text, None


def _is_list_item(line: str) -> bool:
    return line.startswith(("- ", "1. "))


def _docx_table(table) -> str:
    rows = []
    for row in table.rows:
        cells = [" ".join(c.text.split()).replace("|", "\\|") for c in row.cells]
        rows.append("| " + " | ".join(cells) + " |")
    if len(rows) >= 1:
        ncols = rows[0].count(" | ") + 1
        rows.insert(1, "|" + " --- |" * ncols)
    return "\n".join(rows)


def load_docx(path: Path, doc_id: str) -> Document:
    """Read a Word ``.docx`` as Markdown: heading styles become ``#`` headings, tables Markdown tables.

    Raises:
        RetrievalError: not a readable DOCX package.
    """
    with _parsing("DOCX"):
        import docx
        from docx.table import Table

        d = docx.Document(str(path))
        blocks: list[str] = []
        first_heading = ""
        for item in d.iter_inner_content():
            if isinstance(item, Table):
                blocks.append(_docx_table(item))
                continue
            line, level = _docx_paragraph(item)
            if line:
                if level is not None and level <= 1 and not first_heading:
                    first_heading = line.lstrip("# ")
                if blocks and _is_list_item(line) and _is_list_item(blocks[-1].rsplit("\n", 1)[-1]):
                    blocks[-1] += "\n" + line  # one list, one block
                else:
                    blocks.append(line)
        title = (d.core_properties.title or "").strip() or first_heading
    return Document(
        doc_id=doc_id,
        title=title or path.stem.replace("_", " ").replace("-", " "),
        source=path.as_posix(),
        text="\n\n".join(blocks) + "\n",
        format="markdown",
        metadata={"format": "docx"},
    )


#: Loader by lower-case file suffix.
LOADERS: dict[str, Callable[[Path, str], Document]] = {
    ".md": load_markdown,
    ".markdown": load_markdown,
    ".txt": load_text,
    ".text": load_text,
    ".html": load_html,
    ".htm": load_html,
    ".pdf": load_pdf,
    ".docx": load_docx,
}


def iter_files(paths: Iterable[Path]) -> Iterator[tuple[Path, Path]]:
    """Yield ``(file, root)`` for each file under ``paths`` (files or folders), sorted, hidden ones left out."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                    yield f, p
        elif p.is_file():
            yield p, p.parent
        else:
            raise DocumentNotFoundError(f"path does not exist: {p}")


def load_paths(paths: Iterable[Path], show_progress: bool = False) -> tuple[list[Document], list[Skipped]]:
    """Load every supported file under ``paths``.

    Document ids are the path relative to the root that was named (``returns/size.md``),
    so the same folder ingested from another working directory keeps its ids.

    Args:
        paths: files or folders.
        show_progress: show a tqdm bar over the files.

    Returns:
        (documents, skipped files with one-line reasons)

    Raises:
        DocumentNotFoundError: a named path does not exist.
    """
    from tqdm.auto import tqdm

    docs: list[Document] = []
    skipped: list[Skipped] = []
    files = list(iter_files(paths))
    for f, root in tqdm(files, desc="reading", unit="file", disable=not show_progress or not files):
        loader = LOADERS.get(f.suffix.lower())
        if loader is None:
            skipped.append(Skipped(str(f), f"unsupported file type {f.suffix or '(none)'!r}"))
            continue
        doc_id = f.relative_to(root).as_posix()
        try:
            doc = loader(f, doc_id)
        except (OSError, ValueError) as exc:
            skipped.append(Skipped(str(f), str(exc)))
            continue
        doc.metadata["path"] = str(f)
        if not doc.text.strip():
            skipped.append(Skipped(str(f), "empty document"))
            continue
        docs.append(doc)
    for s in skipped:
        log.warning("skipped %s: %s", s.path, s.reason)
    return docs, skipped
