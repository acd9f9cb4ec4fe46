"""Heading-aware chunking bounded in embedder tokens.

A Markdown document is cut into sections at ATX headings (``#`` .. ``######``)
that are outside fenced code blocks; a section is cut into blocks (paragraphs,
lists, whole fenced code blocks); blocks are packed into chunks of at most
``chunk_tokens`` tokens; short neighbouring sections share a chunk when
they fit whole, and a section that does not fit starts a new chunk at its heading.
A chunk's ``headings`` is the heading path of its section, or for a chunk that
packs several sections the path they share (``["Guide"]`` for ``Guide > Install``
and ``Guide > Support``); the heading lines themselves stay in the chunk text.
A paragraph longer than the bound is split on sentence boundaries (``.!?`` before
whitespace; the CJK full stops ``。！？；｡`` with any closing quote or bracket after them,
no whitespace needed), a sentence still too long on whitespace, and a run still too
long (Chinese or Japanese without punctuation, a long URL) by token count: the longest
prefix within the bound, ending after the last CJK comma (``，、``) or space in its second
half when there is one. Pieces overlap by about ``overlap_tokens`` and are exact
substrings of the document, so CJK text gains no spaces. A fenced code block is never
cut, and a ``#`` line inside it is never a heading (it may exceed the bound; the
embedder then sees its head). Every other chunk is within ``chunk_tokens``, and every
non-blank line of the document's text belongs to at least one chunk.

``CHUNKER_VERSION`` changes whenever the same text may be cut differently; ingest
re-chunks documents of an index made by an older version (see :mod:`retrieval.ingest`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from chatbot.errors import RetrievalError
from retrieval.documents import Chunk, Document, content_id

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_FENCE_CLOSE = re.compile(r"^\s{0,3}(`{3,}|~{3,})\s*$")  # a closing fence has no info string
# Sentence ends: Latin .!? before whitespace; CJK full stops (ideographic, full-width and half-width forms), with the
# closing quotes/brackets that follow them, need no whitespace after them.
_SENTENCE_END = re.compile(
    r"[.!?]\s+"  # Latin: only before whitespace ("3.5", "e.g.x" stay whole)
    r"|[\u3002\uff01\uff1f\uff1b\uff61]+"  # 。！？；｡
    r"[\u300d\u300f\uff09\u3011\u3015\u3009\u300b\u201d\u2019\"')]*\s*"  # closing 」』）】〕〉》”’"')
)
_WORD = re.compile(r"\S+\s*")
# Where a token-bounded cut may end: after a CJK or Latin comma/colon/semicolon, or whitespace.
_SOFT_BREAK = re.compile(r"[\uff0c\u3001,;:\uff1a\s]")

CHUNKER_VERSION = 2
"""Version of the cutting rules: 1 split only on ``.!?`` + whitespace and on spaces; 2 adds CJK sentence ends and
the token-bounded fallback."""


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


def _spans(pattern: re.Pattern, text: str, start: int, end: int) -> list[tuple[int, int]]:
    """``text[start:end]`` cut after each match of ``pattern`` (the match stays with the span before it)."""
    out: list[tuple[int, int]] = []
    pos = start
    for m in pattern.finditer(text, start, end):
        if m.end() > pos and m.start() >= pos:
            out.append((pos, m.end()))
            pos = m.end()
    if pos < end:
        out.append((pos, end))
    return out


def _hard_cut(text: str, start: int, end: int, size: int, overlap: int,
              count: Callable[[str], int]) -> list[tuple[int, int]]:
    """Cut ``text[start:end]`` (no usable boundary) into spans of <= size tokens overlapping by <= overlap tokens.

    Each span is the longest prefix within ``size`` (galloping, then binary search over character offsets; a span
    is only accepted when its count is within ``size``, so the bound holds even where counts are not monotone),
    shortened to end after the last soft break in its second half when there is one.
    """
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        # gallop: double the window from 4 characters per token until it no longer fits (or reaches the end), so
        # each span costs O(its own length), not O(the rest of the run)
        lo, hi = pos + 1, min(end, pos + 4 * size)  # lo: known (or forced) to fit
        while count(text[pos:hi]) <= size:
            if hi == end:
                break
            lo, hi = hi, min(end, pos + 2 * (hi - pos))
        if hi == end and count(text[pos:end]) <= size:
            out.append((pos, end))
            break
        while hi - lo > 1:  # hi: known not to fit
            mid = (lo + hi) // 2
            if count(text[pos:mid]) <= size:
                lo = mid
            else:
                hi = mid
        cut = lo
        half = pos + (lo - pos) // 2
        soft = [m.end() for m in _SOFT_BREAK.finditer(text, half, lo)]
        if soft and soft[-1] > pos:
            cut = soft[-1]
        out.append((pos, cut))
        # next span starts as early as keeps <= overlap tokens shared with this one, always after pos
        nxt = cut
        if overlap > 0:
            lo2, hi2 = pos + 1, cut  # find the smallest start in (pos, cut] whose tail to cut fits in overlap
            while lo2 < hi2:
                mid = (lo2 + hi2) // 2
                if count(text[mid:cut]) <= overlap:
                    hi2 = mid
                else:
                    lo2 = mid + 1
            nxt = lo2
        pos = nxt
    return out


def _split_long(block: str, size: int, overlap: int, count: Callable[[str], int]) -> list[str]:
    """Split a prose block into pieces of <= size tokens with ~overlap tokens of overlap.

    Units are sentences; a sentence over ``size`` is cut at whitespace, and a word over ``size`` by
    :func:`_hard_cut`. Units are packed greedily; each piece is the exact (stripped) text between the start of
    its first unit and the end of its last.
    """
    units: list[tuple[int, int]] = []
    for s0, e0 in _spans(_SENTENCE_END, block, 0, len(block)):
        if count(block[s0:e0]) <= size:
            units.append((s0, e0))
            continue
        for s1, e1 in _spans(_WORD, block, s0, e0):
            if count(block[s1:e1]) <= size:
                units.append((s1, e1))
            else:
                units.extend(_hard_cut(block, s1, e1, size, overlap, count))

    def text(span: list[tuple[int, int]]) -> str:
        return block[span[0][0]:span[-1][1]].strip()

    pieces: list[str] = []
    cur: list[tuple[int, int]] = []
    for unit in units:
        if cur and count(text([*cur, unit])) > size:
            pieces.append(text(cur))
            tail: list[tuple[int, int]] = []
            while cur and count(text([cur[-1], *tail])) <= overlap:
                tail.insert(0, cur.pop())
            while tail and count(text([*tail, unit])) > size:  # the overlap never pushes a piece over the bound
                tail.pop(0)
            cur = tail
        cur.append(unit)
    if cur:
        pieces.append(text(cur))
    return [p for p in pieces if p]


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
        RetrievalError: ``chunk_tokens < 16`` or ``overlap_tokens >= chunk_tokens``.
    """
    if chunk_tokens < 16:
        raise RetrievalError(f"chunk_tokens must be >= 16, got {chunk_tokens}")
    if not 0 <= overlap_tokens < chunk_tokens:
        raise RetrievalError(f"overlap_tokens must be in [0, chunk_tokens), got {overlap_tokens}")
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
