"""Heading-aware chunking bounded in embedder tokens.

A Markdown document is cut into sections at ATX headings (``#`` .. ``######``)
that are outside fenced code blocks; a section is cut into blocks (paragraphs,
lists, whole fenced code blocks); blocks are packed into chunks of at most
``chunk_tokens`` tokens; short neighbouring sections share a chunk when
they fit whole, and a section that does not fit starts a new chunk at its heading.
A chunk's ``headings`` is the heading path of its section, or for a chunk that
packs several sections the path they share (``["Guide"]`` for ``Guide > Install``
and ``Guide > Support``); the heading lines themselves stay in the chunk text.
A paragraph longer than the bound is split on sentence, then word boundaries with
``overlap_tokens`` of overlap. A fenced code block is never cut, and a ``#`` line
inside it is never a heading (it may exceed the bound; the embedder then sees its
head); a single word longer than the bound stays whole too. Every
non-blank line of the document's text belongs to at least one chunk.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from retrieval.documents import Chunk, Document, content_id

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_FENCE_CLOSE = re.compile(r"^\s{0,3}(`{3,}|~{3,})\s*$")  # a closing fence has no info string
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class _Section:
    headings: list[str]
    blocks: list[str]


def _sections(text: str, markdown: bool) -> list[_Section]:
    sections: list[_Section] = [_Section([], [])]
    path: list[tuple[int, str]] = []
    fence: str | None = None
    buf: list[str] = []

    def flush() -> None:
        if buf and any(line.strip() for line in buf):
            sections[-1].blocks.append("\n".join(buf).strip("\n"))
        buf.clear()

    for line in text.splitlines():
        m_fence = _FENCE.match(line)
        if fence is not None:
            buf.append(line)
            m_close = _FENCE_CLOSE.match(line)
            if m_close and m_close.group(1)[0] == fence[0] and len(m_close.group(1)) >= len(fence):
                fence = None
                flush()
            continue
        if m_fence:
            flush()
            fence = m_fence.group(1)
            buf.append(line)
            continue
        m_head = _HEADING.match(line) if markdown else None
        if m_head:
            flush()
            level, title = len(m_head.group(1)), m_head.group(2)
            while path and path[-1][0] >= level:
                path.pop()
            path.append((level, title))
            sections.append(_Section([t for _, t in path], [line]))
            continue
        if not line.strip():
            flush()
        else:
            buf.append(line)
    flush()  # an unclosed fence keeps the rest of the document as one block
    return [s for s in sections if s.blocks]


def _split_long(block: str, size: int, overlap: int, count: Callable[[str], int]) -> list[str]:
    """Split a prose block into pieces of <= size tokens with ~overlap tokens of overlap."""
    units = [u for u in _SENTENCE_END.split(block) if u]
    if any(count(u) > size for u in units):
        units = [w for u in units for w in u.split(" ") if w]
    pieces: list[str] = []
    cur: list[str] = []
    for unit in units:
        if cur and count(" ".join([*cur, unit])) > size:
            pieces.append(" ".join(cur))
            tail: list[str] = []
            while cur and count(" ".join([cur[-1], *tail])) <= overlap:
                tail.insert(0, cur.pop())
            cur = tail
        cur.append(unit)
    if cur:
        pieces.append(" ".join(cur))
    return pieces


def _common_prefix(a: list[str], b: list[str]) -> list[str]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def chunk_document(
    doc: Document,
    count_tokens: Callable[[str], int],
    chunk_tokens: int = 200,
    overlap_tokens: int = 32,
) -> list[Chunk]:
    """Cut ``doc`` into chunks.

    Args:
        doc: the document.
        count_tokens: tokens of a string under the embedder's tokenizer.
        chunk_tokens: most tokens per chunk (>= 16).
        overlap_tokens: overlap between pieces of one over-long paragraph (< chunk_tokens).

    Returns:
        Chunks in document order; ``chunk_id`` derives from the doc id, position-free
        content and heading path, so unchanged text keeps its id across re-ingests.

    Raises:
        ValueError: ``chunk_tokens < 16`` or ``overlap_tokens >= chunk_tokens``.
    """
    if chunk_tokens < 16:
        raise ValueError(f"chunk_tokens must be >= 16, got {chunk_tokens}")
    if not 0 <= overlap_tokens < chunk_tokens:
        raise ValueError(f"overlap_tokens must be in [0, chunk_tokens), got {overlap_tokens}")
    texts: list[tuple[list[str], str]] = []
    cur: list[str] = []
    cur_headings: list[str] = []
    for sec in _sections(doc.text, doc.format == "markdown"):
        # A section starts a new chunk unless it fits whole into the current one
        # (short sections of one document are packed together).
        if cur and count_tokens("\n\n".join([*cur, *sec.blocks])) > chunk_tokens:
            texts.append((cur_headings, "\n\n".join(cur)))
            cur = []
        if not cur:
            cur_headings = sec.headings
        else:  # packed with the previous section(s): keep the heading path they all share
            cur_headings = _common_prefix(cur_headings, sec.headings)
        for block in sec.blocks:
            is_code = bool(_FENCE.match(block))
            pieces = [block] if is_code or count_tokens(block) <= chunk_tokens else _split_long(
                block, chunk_tokens, overlap_tokens, count_tokens
            )
            for piece in pieces:
                if cur and count_tokens("\n\n".join([*cur, piece])) > chunk_tokens:
                    texts.append((cur_headings, "\n\n".join(cur)))
                    cur = []
                if not cur:
                    cur_headings = sec.headings
                cur.append(piece)
    if cur:
        texts.append((cur_headings, "\n\n".join(cur)))
    chunks = []
    seen: set[int] = set()
    for pos, (headings, text) in enumerate(texts):
        cid = content_id(doc.doc_id, " > ".join(headings), text)
        n = 1
        while cid in seen:  # the same text twice under one heading
            cid = content_id(doc.doc_id, " > ".join(headings), text, str(n))
            n += 1
        seen.add(cid)
        chunks.append(
            Chunk(
                chunk_id=cid,
                doc_id=doc.doc_id,
                title=doc.title,
                source=doc.source,
                url=doc.url,
                headings=list(headings),
                text=text,
                position=pos,
            )
        )
    return chunks
