"""BM25 on Chinese and Japanese: which terms for CJK text, baseline beside ours.

The labelled set is ``data/eval/cjk`` (hand-written: no Chinese or Japanese customer-service data exists in
``../shared/data``; see its SOURCE.md): 19 documents (9 zh, 8 ja, 2 en), 47 queries (24 zh, 21 ja, 2 en).
Documents are chunked as ingest does (real MiniLM tokenizer, 200 tokens), each chunk indexed with
:class:`retrieval.bm25.BM25Index` under one analyzer per row, and the chunk ranking folded into documents as
``chatbot eval retrieval`` does. Rows:

- ``baseline``: the tokenizer before issue 13 (``bm25s.tokenize``: ``\\w\\w+`` words, English stop words,
  Snowball), which keeps a whole CJK line as one term;
- ``unigram``: words as baseline, each CJK character a term;
- ``bigram``: overlapping CJK bigrams, a lone CJK character a unigram (Lucene's CJKBigramFilter);
- ``uni+bigram`` (ours, :func:`retrieval.bm25.bm25_terms`): each CJK character and each bigram (the same filter
  with ``outputUnigrams``);
- ``jieba`` / ``jieba-search``: jieba 0.42.1 word segmentation of each CJK run (``lcut`` / ``lcut_for_search``),
  when jieba is installed (it is not a dependency: ``pip install jieba``).

Two units: ``documents`` (19; chunks folded into documents, as ``chatbot eval retrieval``) and ``sections``
(46 ``#`` sections, each its own unit, gold = the section that answers: harder, since sections of one document
share words). Results on 2026-12-03, MRR@10 / recall@1 / recall@5 over all 47 queries::

                  documents                 sections
    baseline      0.128 / 0.128 / 0.128     0.128 / 0.128 / 0.128   (zh MRR 0.000)
    unigram       1.000 / 1.000 / 1.000     0.963 / 0.936 / 1.000
    bigram        0.989 / 0.979 / 1.000     0.979 / 0.957 / 1.000
    uni+bigram    1.000 / 1.000 / 1.000     0.989 / 0.979 / 1.000   <- ours
    jieba         0.968 / 0.957 / 0.979     0.941 / 0.915 / 0.979
    jieba-search  0.989 / 0.979 / 1.000     0.963 / 0.936 / 1.000

The set is small: one query is 0.021 of MRR, so the n-gram rows differ by one or two queries. jieba is a
Chinese segmenter (on the Japanese queries its section MRR is 0.940 against 1.000) and has had no release since
January 2020; the n-grams need no dictionary and no new dependency.

Usage: ``python bench/cjk_bm25.py [--json var/bench/cjk_bm25.json]``. Prints the table (per language too)
and writes JSON with the dataset hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402  (after the path insert)

DATA = ROOT / "data" / "eval" / "cjk"


def _analyzers() -> dict[str, Callable]:
    import bm25s
    import Stemmer

    from retrieval.bm25 import bm25_terms, cjk_bigrams

    stem = Stemmer.Stemmer("english")

    def baseline(texts):
        return bm25s.tokenize(list(texts), stopwords="en", stemmer=stem, return_ids=False, show_progress=False)

    out = {
        "baseline": baseline,
        "unigram": lambda texts: bm25_terms(texts, cjk=list),
        "bigram": lambda texts: bm25_terms(texts, cjk=cjk_bigrams),
        "uni+bigram": bm25_terms,
    }
    try:
        import jieba

        jieba.setLogLevel(60)
        out["jieba"] = lambda texts: bm25_terms(texts, cjk=lambda run: [w for w in jieba.lcut(run) if w.strip()])
        out["jieba-search"] = lambda texts: bm25_terms(
            texts, cjk=lambda run: [w for w in jieba.lcut_for_search(run) if w.strip()])
    except ImportError:
        print("jieba not installed: its rows are skipped (pip install jieba)", file=sys.stderr)
    return out


def _sections(docs) -> list[tuple[str, str]]:
    """``(doc_id#heading, title + heading + body)`` for each non-empty Markdown section of ``docs``."""
    out = []
    for d in docs:
        for m in re.finditer(r"^#{1,6} +(.+)\n((?:(?!#{1,6} ).*\n?)*)", d.text, re.M):
            if m.group(2).strip():
                out.append((f"{d.doc_id}#{m.group(1).strip()}", f"{d.title}\n{m.group(1)}\n{m.group(2)}"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=ROOT / "var" / "bench" / "cjk_bm25.json")
    args = ap.parse_args(argv)

    from chatbot.assets import resolve_embedder
    from chatbot.config import Settings
    from retrieval.bm25 import BM25Index
    from retrieval.chunking import chunk_document
    from retrieval.embedder import Embedder
    from retrieval.evaluate import load_jsonl, score_rankings
    from retrieval.loaders import load_paths

    s = Settings()
    emb = Embedder(resolve_embedder(s), name=s.embedder)
    docs, _ = load_paths([DATA / "docs"])
    chunks = [c for d in docs for c in chunk_document(d, emb.count_tokens, 200, 32)]
    evalset = load_jsonl(DATA / "questions.jsonl")
    h = hashlib.sha256()
    for p in sorted((DATA / "docs").glob("*.md")) + [DATA / "questions.jsonl"]:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    rows = [json.loads(line) for line in (DATA / "questions.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    langs = {r["id"]: r.get("lang", "?") for r in rows}
    # documents (as ingest chunks them, folded to doc ids) and sections (each "#" section its own unit)
    units = {
        "documents": ([(c.doc_id, c.embedding_text()) for c in chunks], [q.gold for q in evalset.queries]),
        "sections": (_sections(docs), [frozenset({f"{r['gold'][0]}#{r['section']}"}) for r in rows]),
    }
    results: dict[str, dict] = {}
    for level, (items, golds) in units.items():
        for name, analyzer in _analyzers().items():
            idx = BM25Index(list(range(len(items))), [t for _, t in items], analyzer=analyzer)
            rankings = []
            for hits in idx.search_batch([q.text for q in evalset.queries], k=30):
                ranked: list[str] = []
                for i, _ in hits:
                    if items[i][0] not in ranked:
                        ranked.append(items[i][0])
                rankings.append(ranked[:10])
            res = {"all": score_rankings(rankings, golds)}
            for lang in sorted(set(langs.values())):
                sel = [i for i, q in enumerate(evalset.queries) if langs.get(q.qid) == lang]
                res[lang] = score_rankings([rankings[i] for i in sel], [golds[i] for i in sel])
            results.setdefault(level, {})[name] = res
    print(f"BM25 on {DATA.relative_to(ROOT)}: {len(evalset.queries)} queries, {len(docs)} documents "
          f"({len(chunks)} chunks), {len(units['sections'][0])} sections")
    for level, by_name in results.items():
        base = by_name["baseline"]["all"]["mrr"]
        print(f"\nunit: {level}")
        print(f"{'analyzer':<13} {'MRR':>6} {'R@1':>6} {'R@5':>6} {'R@10':>6}  {'MRR zh':>6} {'MRR ja':>6} "
              f"{'MRR en':>6}  MRR vs baseline")
        for name, res in by_name.items():
            a = res["all"]
            per = " ".join(f"{res.get(lang, {}).get('mrr', float('nan')):6.3f}" for lang in ("zh", "ja", "en"))
            ratio = f"x{a['mrr'] / base:.1f}" if base else "-"
            print(f"{name:<13} {a['mrr']:6.3f} {a['recall@1']:6.3f} {a['recall@5']:6.3f} {a['recall@10']:6.3f}  "
                  f"{per}  {ratio}")
    write_result(args.json, {"dataset": str(DATA.relative_to(ROOT)), "dataset_sha256": h.hexdigest(),
                             "chunk_tokens": 200, "overlap_tokens": 32, "embedder": s.embedder, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
