"""Heading-aware chunking: fences stay whole, `#` in code is not a heading, bounds hold, no text is lost."""

from __future__ import annotations

import hashlib
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


# --- Chinese and Japanese (issue 13, item 3)


def _assert_covers_chars(doc_text: str, chunks) -> None:
    """Chunks are exact substrings that tile the document in order: each starts after the previous one's start and
    no later than where the covered prefix ends (plus whitespace), and the last reaches the end (the document must
    not repeat itself, so the alignment is unique)."""

    def skip_ws(p: int) -> int:
        while p < len(doc_text) and doc_text[p].isspace():
            p += 1
        return p

    covered, prev = 0, -1
    for c in chunks:
        starts = [q for q in range(prev + 1, skip_ws(covered) + 1) if doc_text.startswith(c.text, q)]
        assert starts, f"chunk {c.position} does not continue the text at offset {covered}: {c.text[:30]!r}"
        prev = starts[-1]
        covered = max(covered, prev + len(c.text))
    assert skip_ws(covered) == len(doc_text), f"text after offset {covered} is in no chunk"


@pytest.mark.parametrize("punctuated", [True, False], ids=["with-full-stops", "no-boundary"])
def test_3000_char_chinese_paragraph_is_cut_within_the_embedder_limit(embedder, punctuated):
    from tests.retrieval.cjk_data import long_chinese_paragraph

    text = long_chinese_paragraph(punctuated)
    assert len(text) == 3000 and " " not in text and embedder.count_tokens(text) > 2800  # the input
    chunks = chunk_document(_doc(text, doc_id="zh.md"), embedder.count_tokens, chunk_tokens=200, overlap_tokens=32)
    counts = [embedder.count_tokens(c.text) for c in chunks]
    assert len(chunks) >= 15  # ~2,870 tokens / 200 per chunk
    assert max(counts) <= 200 <= embedder.max_seq_length - 2
    _assert_covers_chars(text, chunks)
    assert all(" " not in c.text for c in chunks)  # no spaces invented between CJK sentences
    if punctuated:  # cut at 。, never inside a sentence
        assert all(c.text.endswith("。") for c in chunks[:-1])
    else:  # token-bounded cuts overlap by at most overlap_tokens
        for a, b in zip(chunks, chunks[1:]):
            shared = next(n for n in range(min(len(a.text), len(b.text)), -1, -1) if a.text.endswith(b.text[:n]))
            assert shared > 0 and embedder.count_tokens(b.text[:shared]) <= 32


def test_cjk_sentence_ends_need_no_space_and_keep_their_closing_quote():
    text = "返品は30日以内です。到着後にご連絡ください！彼は「はい。」と言いました。送料は無料ですか？はい；無料です。"
    chunks = chunk_document(_doc(text, fmt="text"), len, chunk_tokens=16, overlap_tokens=0)
    # sentences: 返品は30日以内です。| 到着後にご連絡ください！| 彼は「はい。」| と言いました。| 送料は無料ですか？| はい；| 無料です。
    # packed greedily into pieces of <= 16 characters
    assert [c.text for c in chunks] == [
        "返品は30日以内です。", "到着後にご連絡ください！", "彼は「はい。」と言いました。", "送料は無料ですか？はい；", "無料です。",
    ]


def test_mixed_latin_and_cjk_document_is_bounded_and_keeps_latin_sentences(embedder):
    from tests.retrieval.cjk_data import long_chinese_paragraph

    english = " ".join(f"Customers may return item {i} within thirty days." for i in range(60))
    japanese = "".join(f"返品は{i}日以内です。" for i in range(80))
    text = f"# Returns\n\n{english}\n\n## 退货\n\n{long_chinese_paragraph(False, 1200)}\n\n## 返品\n\n{japanese}\n"
    chunks = chunk_document(_doc(text), embedder.count_tokens, chunk_tokens=64, overlap_tokens=16)
    assert max(embedder.count_tokens(c.text) for c in chunks) <= 64
    _assert_covers_chars(text, chunks)
    latin = [c.text for c in chunks if c.headings == ["Returns"]]
    assert len(latin) >= 6 and all(t.endswith("days.") for t in latin[1:]), latin  # still cut at sentence ends
    assert {tuple(c.headings) for c in chunks} == {("Returns",), ("Returns", "退货"), ("Returns", "返品")}


def test_a_word_longer_than_the_bound_is_cut_by_tokens():
    url = "https://example.com/" + "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(5))  # no space
    text = f"See {url} for details."
    chunks = chunk_document(_doc(text, fmt="text"), len, chunk_tokens=40, overlap_tokens=8)
    assert len(chunks) >= 8 and max(len(c.text) for c in chunks) <= 40
    _assert_covers_chars(text, chunks)
