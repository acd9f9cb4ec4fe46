"""Building a retrieval-format SFT set (``chatbot build-sft --grounded``): cases from DSTC11 Track 5 or from an
operator's own question/answer pairs over their documents, the collection indexed for distractors, and the
service's own prompt and token budget (:mod:`chatbot.grounded`)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
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
        history = [ChatMessage("user" if t["speaker"] == "U" else "assistant", t["text"])
                   for t in turns[:-1]][-history_turns:] if history_turns else []
        while history and history[0].role != "user":
            history.pop(0)
        cases.append(GroundedCase(f"dstc11:{i}", turns[-1]["text"], reply, gold, tuple(history), "dstc11_track5"))
    source = {"name": "dstc11_track5", "path": str(root), "cases": len(cases), "documents": len(docs),
              "sha256": {f: sha256_file(root / f) for f in ("knowledge.json", "val/logs.json", "val/labels.json")}}
    return cases, list(docs.values()), source


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
                   index_dir: Path | None = None) -> dict:
    """Build a retrieval-format SFT set into ``out`` (:func:`chatbot.grounded.build_grounded_set`).

    One source of cases:

    * ``dataset="dstc11_track5"``: its knowledge snippets are indexed for distractors under
      ``data_dir/eval/dstc11_track5``;
    * ``qa`` pairs over ``docs``, indexed under ``index_dir`` (default ``data_dir/grounded/<qa file stem>``);
    * ``from_store``: the conversation log's reviewer-approved replies with the passages they cited
      (:func:`transcript_cases`); distractors come from the published index.

    The prompt uses the configured system prompt, ``top_k`` passages unless ``options`` says otherwise, and the
    service's token budget (``max_model_len - max_new_tokens``). ``exclude``: dev sets (questions and documents)
    whose questions and answers must not be trained on.

    Raises:
        InvalidInputError: no source or more than one, or ``qa`` without ``docs``.
    """
    from chatbot.operations.knowledge import ingest_paths
    from chatbot.options import build_embedder, search_options
    from retrieval.ingest import ingest_documents
    from retrieval.retriever import Retriever

    if sum([dataset is not None, qa is not None, bool(from_store)]) != 1:
        raise InvalidInputError("give one source: --dataset dstc11_track5, --qa FILE with --docs, or --from-store")
    if qa is not None and not docs:
        raise InvalidInputError("--qa needs --docs: the documents its answers come from")
    options = options or GroundedOptions(passages=settings.top_k)
    embedder = build_embedder(settings)
    opts = search_options(settings)
    if dataset is not None:
        if dataset != "dstc11_track5":
            raise InvalidInputError(f"--dataset must be dstc11_track5, got {dataset!r}")
        cases, documents, source = dstc11_cases(history_turns=history_turns)
        index_dir = Path(index_dir or settings.data_dir / "eval" / "dstc11_track5")
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
                              settings.max_model_len - settings.max_new_tokens, options)
    exclusions = Exclusions.from_paths(exclude) if exclude else None
    return build_grounded_set(cases, builder, out, exclusions, [source])
