"""Building a retrieval-format SFT set (``chatbot build-sft --grounded``): cases from DSTC11 Track 5 or from an
operator's own question/answer pairs over their documents, the collection indexed for distractors, and the
service's own prompt and token budget (:mod:`chatbot.grounded`)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from chatbot.engines.base import ChatMessage
from chatbot.errors import DataError, InvalidInputError
from chatbot.grounded import Exclusions, GroundedBuilder, GroundedCase, GroundedOptions, build_grounded_set
from chatbot.jsonl import iter_jsonl
from retrieval.documents import Document, Hit

log = logging.getLogger(__name__)


def _passage(doc: Document) -> Hit:
    """A whole short document as a passage (what the retriever returns for a one-chunk document)."""
    return Hit(-1, doc.doc_id, doc.title, doc.source, doc.text, 1.0, 0)


def dstc11_cases(root: Path | None = None, history_turns: int = 0) -> tuple[list[GroundedCase], list[Document], dict]:
    """The DSTC11 Track 5 knowledge-seeking turns as cases: the last user turn, the human reply written from the
    gold FAQ / review snippets, those snippets as gold passages (``knowledge.json``), and up to ``history_turns``
    earlier turns (``S`` as the assistant; the history starts with a user turn).

    Returns:
        ``(cases, documents, source)``: the snippets as documents (to index for distractors) and the source record
        (path, counts, the files' SHA-256).

    Raises:
        DocumentNotFoundError: a file is missing. RetrievalError: logs and labels differ in length.
    """
    from chatbot.hashing import sha256_file
    from retrieval.evaluate import DEFAULT_DATA_ROOT, load_dstc11_track5

    root = Path(root) if root else DEFAULT_DATA_ROOT / "dstc11_track5"
    ev = load_dstc11_track5(root)
    docs = {d.doc_id: d for d in ev.documents or []}
    logs = json.loads((root / "val" / "logs.json").read_text(encoding="utf-8"))
    labels = json.loads((root / "val" / "labels.json").read_text(encoding="utf-8"))
    cases = []
    for q in ev.queries:
        i = int(q.qid)
        turns, label = logs[i], labels[i]
        reply = (label.get("response") or "").strip()
        gold = tuple(_passage(docs[g]) for g in sorted(q.gold) if g in docs)
        if not reply or not gold:
            continue
        # an FAQ snippet is "question\nanswer": the reply is written from the answer
        evidence = tuple(h.text.split("\n", 1)[-1] if "/faq/" in h.doc_id else h.text for h in gold)
        history = [ChatMessage("user" if t["speaker"] == "U" else "assistant", t["text"])
                   for t in turns[:-1]][-history_turns:] if history_turns else []
        while history and history[0].role != "user":
            history.pop(0)
        cases.append(GroundedCase(f"dstc11:{i}", turns[-1]["text"], reply, gold, tuple(history), "dstc11_track5",
                                  evidence))
    source = {"name": "dstc11_track5", "path": str(root), "cases": len(cases), "documents": len(docs),
              "sha256": {f: sha256_file(root / f) for f in ("knowledge.json", "val/logs.json", "val/labels.json")}}
    return cases, list(docs.values()), source


def dstc11_documents(root: Path | None = None, exclusions: Exclusions | None = None) -> tuple[list[Document], int]:
    """DSTC11 Track 5's ``knowledge.json`` as a help centre: one Markdown document per hotel or restaurant
    (``doc_id`` ``hotel/20``), its FAQs as ``## question`` sections with the answer below, then a
    ``## Guest reviews`` section with one paragraph per review. Chunked by the service's chunker, these are the
    passages a company's own documents give (several answers per passage), not one snippet each.

    FAQ answers and review sentences that occur in a dev-set document (``exclusions``) are left out, so no prompt
    shows what the dev sets were built from.

    Returns:
        ``(documents, left_out)``: the documents, and how many snippets were left out.

    Raises:
        DocumentNotFoundError: ``knowledge.json`` is missing.
    """
    from chatbot.errors import DocumentNotFoundError
    from retrieval.evaluate import DEFAULT_DATA_ROOT

    root = Path(root) if root else DEFAULT_DATA_ROOT / "dstc11_track5"
    path = root / "knowledge.json"
    if not path.is_file():
        raise DocumentNotFoundError(f"{path} not found")
    knowledge = json.loads(path.read_text(encoding="utf-8"))

    def keep(text: str) -> bool:
        return exclusions is None or not exclusions.in_documents(text)

    docs, left_out = [], 0
    for domain, entities in knowledge.items():
        for entity_id, ent in entities.items():
            name = str(ent.get("name") or f"{domain} {entity_id}")
            parts = [f"# {name}"]
            for faq in (ent.get("faqs") or {}).values():
                if keep(faq["answer"]):
                    parts += [f"## {faq['question'].strip()}", faq["answer"].strip()]
                else:
                    left_out += 1
            reviews = []
            for rev in (ent.get("reviews") or {}).values():
                sents = [t.strip() for t in rev.get("sentences", {}).values()]
                left_out += sum(not keep(t) for t in sents)
                if kept := [t for t in sents if keep(t)]:
                    reviews.append(" ".join(kept))
            if reviews:
                parts += ["## Guest reviews", *reviews]
            did = f"{domain}/{entity_id}"
            docs.append(Document(did, name, f"dstc11_track5 knowledge.json {did}", "\n\n".join(parts) + "\n"))
    return docs, left_out


def gold_chunks(cases: Sequence[GroundedCase], chunks: Sequence[Hit]) -> tuple[list[GroundedCase], int]:
    """``cases`` (gold: DSTC11 snippets, with :attr:`GroundedCase.evidence`) with the chunks of
    :func:`dstc11_documents` that hold their evidence as gold, in evidence order; a case none of whose evidence
    is in a chunk (left out as dev-set text) is dropped.

    Returns:
        ``(cases, dropped)``.
    """
    from chatbot.grounded import normalize

    by_doc: dict[str, list[tuple[Hit, str]]] = {}
    for h in chunks:
        by_doc.setdefault(h.doc_id, []).append((h, normalize(h.text)))
    out, dropped = [], 0
    for case in cases:
        gold: dict[int, Hit] = {}
        for snippet, ev in zip(case.gold, case.evidence):
            entity = "/".join(snippet.doc_id.split("/")[:2])
            t = normalize(ev)
            for h, text in by_doc.get(entity, []):
                if t and t in text:
                    gold.setdefault(h.chunk_id, h)
                    break
        if gold:
            out.append(replace(case, gold=tuple(gold.values())))
        else:
            dropped += 1
    return out, dropped


def qa_cases(path: Path, search, candidates: int = 50) -> tuple[list[GroundedCase], dict]:
    """Question/answer pairs over the operator's documents as cases: a JSONL file of
    ``{"id", "question", "reply", "gold": [doc ids], "history"?: [{"role", "content"}]}``. Each gold document's
    passage is its best chunk for the question among the retriever's top ``candidates``.

    Returns:
        ``(cases, source)``; a pair whose gold documents have no chunk among the candidates is skipped (counted).

    Raises:
        DataError: a line misses a field (line named).
    """
    from chatbot.hashing import sha256_file

    cases, missed = [], 0
    for n, row in iter_jsonl(path):
        where = f"{path}:{n}"
        q, reply, gold = row.get("question"), row.get("reply"), row.get("gold")
        if not isinstance(q, str) or not q.strip() or not isinstance(reply, str) or not reply.strip():
            raise DataError(f"{where}: 'question' and 'reply' must be non-empty strings")
        if isinstance(gold, str):
            gold = [gold]
        if not isinstance(gold, list) or not gold:
            raise DataError(f"{where}: 'gold' must be a non-empty list of document ids, got {gold!r}")
        history = tuple(ChatMessage(m["role"], m["content"]) for m in row.get("history") or [])
        wanted, passages = set(map(str, gold)), {}
        for h in search(q, candidates):
            if h.doc_id in wanted and h.doc_id not in passages:
                passages[h.doc_id] = h
        if not passages:
            missed += 1
            continue
        cases.append(GroundedCase(str(row.get("id") or f"{path.name}:{n}"), q, reply,
                                  tuple(passages.values()), history, path.name))
    source = {"name": path.name, "path": str(path), "cases": len(cases), "gold_not_retrieved": missed,
              "sha256": sha256_file(path)}
    return cases, source


_MARKER = re.compile(r"\s*\[(\d+)\]")


def transcript_cases(rows: Sequence[dict]) -> tuple[list[GroundedCase], dict]:
    """Reviewer-approved replies (:meth:`chatbot.store.Store.approved_replies`) as cases: the customer's question,
    the approved (or corrected) reply without its ``[n]`` markers, and as gold the passages the reply cited (the
    numbers in the reply, or in the reply as sent when the correction has none), with the text they were shown
    with. A reply that cites nothing is skipped (counted): there is no passage to ground it in.

    Returns:
        ``(cases, source)``.
    """
    cases, uncited = [], 0
    for r in rows:
        cited = {int(n) for n in _MARKER.findall(r["reply"])} or {int(n) for n in _MARKER.findall(r["original"])}
        gold = tuple(Hit(-1, c["doc_id"], c.get("title") or c["doc_id"], c.get("source") or "", c["passage"],
                         float(c.get("score") or 0.0), 0)
                     for c in r["citations"] if c.get("number") in cited and c.get("passage"))
        reply = _MARKER.sub("", r["reply"]).strip()
        if not gold or not reply:
            uncited += 1
            continue
        cases.append(GroundedCase(f"store:{r['conversation_id']}:{r['message_id']}", r["question"], reply, gold,
                                  source="store:approved"))
    return cases, {"name": "store:approved", "cases": len(cases), "uncited": uncited}


def _count_tokens(settings):
    """Tokens of a message list under the chat model's template (the engines' own count)."""
    from transformers import AutoTokenizer

    from chatbot.assets import resolve_chat_model
    from chatbot.engines.base import render_chat

    tok = AutoTokenizer.from_pretrained(resolve_chat_model(settings))
    return lambda messages: len(render_chat(tok, messages))


def build_grounded(settings, out: str | Path, dataset: str | None = None, qa: Path | None = None,
                   docs: Sequence[str | Path] | None = None, from_store: bool = False,
                   exclude: Sequence[str | Path] = (),
                   options: GroundedOptions | None = None, history_turns: int = 0, limit: int | None = None,
                   index_dir: Path | None = None, layout: str = "documents") -> dict:
    """Build a retrieval-format SFT set into ``out`` (:func:`chatbot.grounded.build_grounded_set`).

    One source of cases:

    * ``dataset="dstc11_track5"``: with ``layout="snippets"`` each snippet is a passage, indexed under
      ``data_dir/eval/dstc11_track5``; with ``layout="documents"`` (default) its knowledge as one document per
      entity (:func:`dstc11_documents`), chunked and indexed as the service does under
      ``data_dir/grounded/dstc11_track5``, the chunks holding the gold snippets as gold (:func:`gold_chunks`);
    * ``qa`` pairs over ``docs``, indexed under ``index_dir`` (default ``data_dir/grounded/<qa file stem>``);
    * ``from_store``: the conversation log's reviewer-approved replies with the passages they cited
      (:func:`transcript_cases`); distractors come from the published index.

    The prompt uses the configured system prompt, ``top_k`` passages unless ``options`` says otherwise, and the
    service's token budget (``max_model_len - max_new_tokens``). ``exclude``: dev sets (questions and documents)
    whose questions and answers must not be trained on.

    Raises:
        InvalidInputError: no source or more than one, ``qa`` without ``docs``, or an unknown ``layout``.
    """
    from chatbot.operations.knowledge import ingest_paths
    from chatbot.options import build_embedder, search_options
    from retrieval.ingest import ingest_documents
    from retrieval.retriever import Retriever

    if sum([dataset is not None, qa is not None, bool(from_store)]) != 1:
        raise InvalidInputError("give one source: --dataset dstc11_track5, --qa FILE with --docs, or --from-store")
    if qa is not None and not docs:
        raise InvalidInputError("--qa needs --docs: the documents its answers come from")
    if layout not in ("documents", "snippets"):
        raise InvalidInputError(f"layout must be documents or snippets, got {layout!r}")
    options = options or GroundedOptions(passages=settings.top_k)
    exclusions = Exclusions.from_paths(exclude) if exclude else None
    embedder = build_embedder(settings)
    opts = search_options(settings)
    if dataset is not None:
        if dataset != "dstc11_track5":
            raise InvalidInputError(f"--dataset must be dstc11_track5, got {dataset!r}")
        cases, documents, source = dstc11_cases(history_turns=history_turns)
        if layout == "documents":
            from retrieval.chunking import chunk_document

            documents, source["snippets_left_out"] = dstc11_documents(Path(source["path"]), exclusions)
            index_dir = Path(index_dir or settings.data_dir / "grounded" / "dstc11_track5")
            chunks = [Hit(c.chunk_id, c.doc_id, c.title, c.source, c.text, 1.0, 0, headings=c.headings)
                      for d in documents
                      for c in chunk_document(d, embedder.count_tokens, settings.chunk_tokens, settings.chunk_overlap)]
            # dev-set cases stay as they are, for build_grounded_set to count and leave out
            dev = {c.id for c in cases if exclusions is not None and exclusions.reason(c)}
            mapped, source["no_gold_chunk"] = gold_chunks([c for c in cases if c.id not in dev], chunks)
            by_id = {c.id: c for c in mapped}
            cases = [c if c.id in dev else by_id[c.id] for c in cases if c.id in dev or c.id in by_id]
            source.update(layout="documents", documents=len(documents), chunks=len(chunks))
        else:
            index_dir = Path(index_dir or settings.data_dir / "eval" / "dstc11_track5")
            source["layout"] = "snippets"
        ingest_documents(documents, index_dir, embedder, settings.chunk_tokens, settings.chunk_overlap, sync=True,
                         show_progress=True, index_options=opts.index)
    elif qa is not None:
        index_dir = Path(index_dir or settings.data_dir / "grounded" / Path(qa).stem)
        ingest_paths(settings, docs, embedder=embedder, index_dir=index_dir, sync=True)
    else:
        from chatbot.store import Store

        store = Store(settings.resolved_database_url)
        try:
            cases, source = transcript_cases(store.approved_replies())
        finally:
            store.close()
        index_dir = Path(index_dir or settings.index_dir)
    retriever = Retriever(index_dir, embedder, opts)

    def search(query: str, k: int) -> list[Hit]:
        return retriever.search(query, top_k=k)

    if qa is not None:
        cases, source = qa_cases(Path(qa), search)
    if limit:
        cases = cases[:limit]
    builder = GroundedBuilder(search, settings.system_prompt, settings.abstain_message, _count_tokens(settings),
                              settings.max_model_len - settings.max_new_tokens, options, embedder.encode,
                              settings.prompt_max_units)
    return build_grounded_set(cases, builder, out, exclusions, [source])
