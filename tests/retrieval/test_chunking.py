"""Heading-aware chunking: fences stay whole, `#` in code is not a heading, bounds hold, no text is lost."""

from __future__ import annotations

import re

import pytest

from retrieval.chunking import chunk_document
from retrieval.documents import Document
from tests.retrieval.conftest import words

SHELL_DOC = """# Developer guide

Intro paragraph about the API.

## Install

Run the installer from a terminal:

```bash
# comment: this line is a shell comment, not a heading
pip install acme-client
## also not a heading
acme login --token "$TOKEN"
```

Then restart the app.

## Support

Email support@example.com for help.
"""


def _doc(text: str, fmt: str = "markdown", doc_id: str = "guide.md") -> Document:
    return Document(doc_id=doc_id, title="Guide", source=doc_id, text=text, format=fmt)


def _assert_covers(doc_text: str, chunks) -> None:
    """Every word of the document appears in the chunks, in document order (overlap allowed)."""
    doc_words = doc_text.split()
    pos = 0
    for c in chunks:
        cw = c.text.split()
        # each chunk is a contiguous run of document words, starting at or before where the last one ended
        start = next(i for i in range(max(0, pos - len(cw)), len(doc_words)) if doc_words[i : i + len(cw)] == cw)
        assert start <= pos, f"words {doc_words[pos:start]} are in no chunk"
        pos = max(pos, start + len(cw))
    assert pos == len(doc_words)


@pytest.mark.parametrize("size", [16, 40])
def test_shell_snippet_with_hash_comment_stays_whole_under_its_heading(size):
    chunks = chunk_document(_doc(SHELL_DOC), words, chunk_tokens=size, overlap_tokens=4)
    fence = SHELL_DOC[SHELL_DOC.index("```bash") : SHELL_DOC.index("```\n\nThen") + 3]
    holding = [c for c in chunks if "pip install acme-client" in c.text]
    assert len(holding) == 1 and fence in holding[0].text  # the whole block, fences included
    assert holding[0].headings == ["Developer guide", "Install"]
    if size == 40:
        assert holding[0].text.startswith("## Install\n\nRun the installer")
    assert all("comment" not in h and "also not a heading" not in h for c in chunks for h in c.headings)
    support = [c for c in chunks if "support@example.com" in c.text]
    assert len(support) == 1 and "## Support" in support[0].text
    assert support[0].headings in (["Developer guide", "Support"], ["Developer guide"])  # own, or shared when packed
    _assert_covers(SHELL_DOC, chunks)


def test_packed_sections_keep_the_shared_heading_path():
    text = "# Guide\n\n## Install\n\nRun it.\n\n## Support\n\nEmail us.\n"
    chunks = chunk_document(_doc(text), words, chunk_tokens=200, overlap_tokens=0)
    assert len(chunks) == 1 and chunks[0].headings == ["Guide"]
    two = chunk_document(_doc("## Install\n\nRun it.\n\n## Support\n\nEmail us.\n"), words, 200, 0)
    assert two[0].headings == []


def test_code_block_longer_than_the_bound_is_not_cut():
    code = "```python\n" + "\n".join(f"x{i} = {i}  # step {i}" for i in range(60)) + "\n```"
    text = f"# Title\n\nBefore.\n\n{code}\n\nAfter the code.\n"
    chunks = chunk_document(_doc(text), words, chunk_tokens=20, overlap_tokens=5)
    assert [c.text for c in chunks if "x0 = 0" in c.text] == [code]
    _assert_covers(text, chunks)


def test_info_string_line_does_not_close_a_fence():
    body = " ".join(["body"] * 14)
    text = f"# A\n\n```\n# inside\n```bash\n# still inside\n```\n\n# B\n\n{body}\n"
    chunks = chunk_document(_doc(text), words, chunk_tokens=16, overlap_tokens=0)
    assert [c.headings for c in chunks] == [["A"], ["B"]]
    assert chunks[0].text.endswith("# still inside\n```")


def test_chunks_are_bounded_and_cover_all_text():
    sentences = " ".join(f"Sentence number {i} explains refund rule {i} in detail." for i in range(80))
    text = "# Refunds\n\n" + sentences + "\n\n## Exchanges\n\n" + "Short note.\n\n- item one\n- item two\n"
    chunks = chunk_document(_doc(text), words, chunk_tokens=40, overlap_tokens=8)
    assert len(chunks) > 10
    assert max(words(c.text) for c in chunks) <= 40
    _assert_covers(text, chunks)
    # the long paragraph was split with overlap: consecutive pieces share words
    pieces = [c for c in chunks if c.headings == ["Refunds"]]
    shared = [set(a.text.split()[-8:]) & set(b.text.split()[:8]) for a, b in zip(pieces, pieces[1:])]
    assert all(shared)
    assert [c.position for c in chunks] == list(range(len(chunks)))


def test_real_tokenizer_bound(embedder):
    text = "# Policy\n\n" + " ".join(f"Customers may return item {i} within thirty days." for i in range(120))
    chunks = chunk_document(_doc(text), embedder.count_tokens, chunk_tokens=64, overlap_tokens=16)
    assert len(chunks) >= 8
    assert max(embedder.count_tokens(c.text) for c in chunks) <= 64
    _assert_covers(text, chunks)


def test_plain_text_hash_lines_are_not_headings():
    text = "# not a heading in a .txt file\n\nbody text\n"
    chunks = chunk_document(_doc(text, fmt="text", doc_id="a.txt"), words, chunk_tokens=16, overlap_tokens=0)
    assert len(chunks) == 1 and chunks[0].headings == [] and chunks[0].text == text.strip()


def test_short_sections_are_packed_and_each_big_one_starts_at_its_heading():
    text = "# T\n\n## a\n\none two\n\n## b\n\nthree four\n\n## c\n\n" + " ".join(["word"] * 30) + "\n"
    chunks = chunk_document(_doc(text), words, chunk_tokens=32, overlap_tokens=0)
    assert chunks[0].text.startswith("# T") and "## b" in chunks[0].text  # a and b share a chunk
    assert chunks[1].text.startswith("## c") and chunks[1].headings == ["T", "c"]


def test_ids_derive_from_content():
    a = chunk_document(_doc(SHELL_DOC), words, 16, 4)
    b = chunk_document(_doc(SHELL_DOC), words, 16, 4)
    assert [c.chunk_id for c in a] == [c.chunk_id for c in b]
    changed = chunk_document(_doc(SHELL_DOC.replace("Email support", "Write to support")), words, 16, 4)
    diff = {c.chunk_id for c in a} ^ {c.chunk_id for c in changed}
    assert len(diff) == 2  # only the Support chunk changed (old id out, new id in)
    other = chunk_document(_doc(SHELL_DOC, doc_id="copy.md"), words, 16, 4)
    assert not {c.chunk_id for c in a} & {c.chunk_id for c in other}
    assert all(0 <= c.chunk_id < 2**63 for c in a)


def test_repeated_text_gets_distinct_ids():
    chunks = chunk_document(_doc("# A\n\n" + "same " * 20 + "\n\n" + "same " * 20), words, 20, 0)
    assert len({c.chunk_id for c in chunks}) == len(chunks) == 3


@pytest.mark.parametrize(
    ("size", "overlap", "message"),
    [(8, 0, "chunk_tokens must be >= 16, got 8"), (32, 32, r"overlap_tokens must be in \[0, chunk_tokens\), got 32")],
)
def test_bad_bounds_name_the_value(size, overlap, message):
    with pytest.raises(ValueError, match=message):
        chunk_document(_doc("x"), words, size, overlap)


def test_heading_lines_stay_in_the_text():
    chunks = chunk_document(_doc(SHELL_DOC), words, 200, 32)
    joined = "\n".join(c.text for c in chunks)
    assert re.search(r"^## Install$", joined, re.M) and re.search(r"^## Support$", joined, re.M)
