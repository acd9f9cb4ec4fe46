"""Documents, chunks and search hits: the records retrieval passes around."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field


def content_id(*parts: str) -> int:
    """A stable non-negative int64 id from text parts (first 8 bytes of SHA-256, top bit cleared).

    FAISS id maps take int64; clearing the sign bit keeps ids >= 0 so -1 (FAISS's
    "no result") can never be a real id.
    """
    h = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def text_hash(text: str) -> str:
    """SHA-256 hex digest of ``text`` (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Document:
    """One source document.

    Attributes:
        doc_id: stable id (the path relative to the ingested root, or a URL).
        title: human title (first heading, front matter, or file name).
        source: where it came from (a note, a URL, or the file's path on the ingesting machine: for
            staff and the index manifest; customers are shown the title and ``url`` instead).
        text: the full text (Markdown for Markdown/HTML/DOCX input).
        format: ``"markdown"`` or ``"text"``; decides how headings are found.
        metadata: anything else the loader knows (license note, flow, ...).
        url: the document's public ``http(s)`` address for customers (front matter ``url:``, an HTML
            page's canonical URL), or ``""`` when it has none.
    """

    doc_id: str
    title: str
    source: str
    text: str
    format: str = "markdown"
    metadata: dict = field(default_factory=dict)
    url: str = ""

    @property
    def sha256(self) -> str:
        """Hash of the title, text and public URL; a changed hash means re-chunk."""
        return text_hash(self.title + "\n" + self.text + (f"\n{self.url}" if self.url else ""))


@dataclass
class Chunk:
    """A piece of a document that is embedded and retrieved.

    Attributes:
        chunk_id: int64 id derived from the doc id and the chunk text (content hash).
        doc_id, title, source: of the parent document.
        headings: the section heading path, outermost first.
        text: the chunk's text as it appears in the document.
        position: index of the chunk within its document.
        url: the parent document's public URL (``""`` when none; chunks of older indexes lack it).
    """

    chunk_id: int
    doc_id: str
    title: str
    source: str
    headings: list[str]
    text: str
    position: int
    url: str = ""

    def embedding_text(self) -> str:
        """Text given to the embedder: title and heading path, then the chunk text."""
        path = " > ".join([self.title, *[h for h in self.headings if h != self.title]])
        return f"{path}\n{self.text}"

    def to_dict(self) -> dict:
        """JSON-serialisable dict (``chunks.jsonl`` row)."""
        return asdict(self)


@dataclass
class Hit:
    """One search result.

    Attributes:
        chunk_id, doc_id, title, source, text: of the matched chunk.
        score: cosine similarity of query and chunk in [-1, 1], in every search mode
            (so one ``min_score`` threshold means the same thing in each mode).
        rank: 1-based rank in the result list (the order of the mode used).
        mode: the search mode that ranked it: ``"dense"``, ``"bm25"`` or ``"hybrid"``.
        bm25_score: the chunk's BM25 score when BM25 found it (bm25 and hybrid modes), else None.
        fused_score: reciprocal-rank-fusion score in hybrid mode, else None.
        headings: the chunk's section heading path, outermost first.
        url: the document's public URL (``""`` when none).
    """

    chunk_id: int
    doc_id: str
    title: str
    source: str
    text: str
    score: float
    rank: int
    mode: str = "dense"
    bm25_score: float | None = None
    fused_score: float | None = None
    headings: list[str] = field(default_factory=list)
    url: str = ""
