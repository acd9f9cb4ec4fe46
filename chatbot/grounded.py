"""Retrieval-format SFT examples: the prompt the service sends, and a reply that uses only the passages and cites
them as ``[n]`` (issue 15).

Each example is a chat dialogue ``{"id", "messages": [system, *history, user, assistant], "meta"}``:

* the system message is what :func:`chatbot.prompts.build_prompt` builds for the service (the same function,
  the configured system prompt, numbered fenced passages, the same token budget);
* the passages are the case's gold passages placed among the retriever's own top-k distractors, in a shuffled
  order (so the model learns to find the answer, not a position);
* the reply (``GroundedOptions.reply``):

  - ``supported`` (default; the shipped adapter was trained on it): the reply a verified answer would show. Each
    sentence of the reference reply that the service's :class:`~chatbot.verification.Verifier` supports is kept;
    one it would withhold (a paraphrase, a follow-up question) is replaced by the gold passage sentences it was
    written from (those sharing the most content tokens with it), quoted. Every sentence carries its citation
    ``[n]`` as the verified mode writes it (:func:`chatbot.verification.cite`), and every one is checked again by
    the ``Verifier`` at build time, so the model is never taught a sentence the service would withhold. Human
    replies in DSTC11 paraphrase their snippets: 2 of 323 held-out reply sentences pass the verifier as written;
  - ``reference`` (the first shipped adapter was trained on it, see ``docs/finetuning.md``): the reference reply
    with the gold passages' numbers as citation markers at the end of its first sentence (:func:`with_citations`);
* an *unanswerable* example is the same question with the gold passages (and every chunk of their documents)
  removed; its reply is the service's abstention (``Settings.abstain_message``), which offers a person.

Cases whose question is in a dev set, or whose gold passage text appears in a dev set's documents, are left out
(:class:`Exclusions`), so a model trained on the set is never evaluated on what it saw.

The recipe follows retrieval-augmented fine-tuning with distractor documents (Zhang et al., "RAFT: Adapting
Language Model to Domain Specific RAG", 2024): gold passages among retrieved distractors, and a share of
examples where the gold passage is absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from chatbot.config import DEFAULT_MIN_OVERLAP
from chatbot.engines.base import ChatMessage
from chatbot.errors import InvalidInputError
from chatbot.jsonl import iter_jsonl
from chatbot.prompts import build_prompt
from chatbot.verification import (
    Evidence,
    Verifier,
    cite,
    content_tokens,
    sanitize_passage,
    split_sentences,
    strip_markers,
)
from retrieval.documents import Hit

log = logging.getLogger(__name__)

#: Search: ``(query, top_k) -> hits, best first`` (the retriever's ``search``).
Search = Callable[[str, int], list[Hit]]

#: what an answerable example's reply is made of (:attr:`GroundedOptions.reply`)
REPLY_KINDS = ("supported", "reference")


@dataclass(frozen=True)
class GroundedCase:
    """One question answered from passages.

    Attributes:
        id: unique within its source.
        question: the customer's message.
        reply: the reference reply, written from the gold passages (no citation markers).
        gold: the passages that answer it (``doc_id`` identifies each; the text is what the model is shown).
        history: earlier messages of the conversation, oldest first (user first).
        source: where the case comes from (``dstc11_track5``, a file name).
        evidence: the texts within the gold passages that the reply was written from, when they are finer than
            the passages (an FAQ answer or a review sentence inside a chunk of a longer document); empty: the
            whole gold passages. A ``supported`` reply quotes only sentences of the evidence, and the dev-set
            exclusion checks it.
    """

    id: str
    question: str
    reply: str
    gold: tuple[Hit, ...]
    history: tuple[ChatMessage, ...] = ()
    source: str = ""
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class GroundedOptions:
    """How examples are made.

    Attributes:
        passages: passages in each prompt (the service's ``top_k``), >= 1.
        unanswerable: share of cases that also give an unanswerable example, in [0, 1].
        validation: share of cases held out (by case id), in [0, 1).
        seed: for the passage order and the unanswerable draw (each case's draw depends only on it and its id).
        candidates: hits searched per case to find distractors outside the gold documents (>= ``passages``).
        reply: ``supported`` (sentences the verifier supports, see the module docstring) or ``reference`` (the
            reference reply, cited).
        min_overlap: the verifier's ``min_overlap`` for ``supported`` replies (``Settings.verify_min_overlap``).
        max_quotes: passage sentences a ``supported`` reply quotes at most, >= 1.
        verified_prompts: share of cases (drawn by case id) whose examples carry the prompt of the ``verified``
            answer mode, in [0, 1]: each passage cut to its sentences among the question's most relevant ones
            (:meth:`chatbot.verification.Evidence.focus`, ``Settings.prompt_max_units``), which is what the service
            sends the model in that mode; the others carry whole passages (the ``generate`` mode's prompt). The cut
            ranks sentences against the case's question over its ``passages``; the service ranks against its
            retrieval query (a short follow-up joined to the earlier message) over ``top_k`` hits, so cases with
            history, or ``passages`` != ``top_k``, may be cut differently. Needs ``reply="supported"``.
    """

    passages: int = 3
    unanswerable: float = 0.1
    validation: float = 0.1
    seed: int = 13
    candidates: int = 20
    reply: str = "supported"
    min_overlap: float = DEFAULT_MIN_OVERLAP
    max_quotes: int = 3
    verified_prompts: float = 0.0

    def __post_init__(self) -> None:
        if self.passages < 1:
            raise InvalidInputError(f"passages must be >= 1, got {self.passages}")
        if not 0.0 <= self.unanswerable <= 1.0:
            raise InvalidInputError(f"unanswerable must be in [0, 1], got {self.unanswerable}")
        if not 0.0 <= self.validation < 1.0:
            raise InvalidInputError(f"validation must be in [0, 1), got {self.validation}")
        if self.candidates < self.passages:
            raise InvalidInputError(f"candidates must be >= passages ({self.passages}), got {self.candidates}")
        if self.reply not in REPLY_KINDS:
            raise InvalidInputError(f"reply must be one of {', '.join(REPLY_KINDS)}, got {self.reply!r}")
        if not 0.0 < self.min_overlap <= 1.0:
            raise InvalidInputError(f"min_overlap must be in (0, 1], got {self.min_overlap}")
        if self.max_quotes < 1:
            raise InvalidInputError(f"max_quotes must be >= 1, got {self.max_quotes}")
        if not 0.0 <= self.verified_prompts <= 1.0:
            raise InvalidInputError(f"verified_prompts must be in [0, 1], got {self.verified_prompts}")
        if self.verified_prompts > 0 and self.reply != "supported":
            # a reference reply is cited whole: the cut could hide what it says, with nothing to fall back on
            raise InvalidInputError(f"verified_prompts needs reply='supported', got reply={self.reply!r}")


def normalize(text: str) -> str:
    """Lower case, NFKC, runs of whitespace and punctuation as one space: for matching dev-set text."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


@dataclass
class Exclusions:
    """What must not be trained on: dev-set questions and the documents built from their answers.

    Attributes:
        questions: normalized dev-set questions.
        documents: normalized dev-set document texts.
        min_passage_chars: a gold passage shorter than this (normalized) is not matched against documents
            (a short sentence such as "yes" would match anything).
    """

    questions: set[str] = field(default_factory=set)
    documents: list[str] = field(default_factory=list)
    min_passage_chars: int = 20

    @classmethod
    def from_paths(cls, paths: Iterable[str | Path]) -> Exclusions:
        """Every ``*.jsonl`` file under ``paths`` gives questions (its ``query`` or ``question`` field), every
        ``*.md`` / ``*.txt`` / ``*.html`` file gives a document.

        Raises:
            InvalidInputError: a path does not exist. DataError: a JSONL line is malformed.
        """
        ex = cls()
        for p in map(Path, paths):
            if not p.exists():
                raise InvalidInputError(f"exclusion path {str(p)!r} does not exist")
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
            for f in files:
                if f.suffix == ".jsonl":
                    for _, row in iter_jsonl(f):
                        q = row.get("query") or row.get("question")
                        if isinstance(q, str) and q.strip():
                            ex.questions.add(normalize(q))
                elif f.suffix in (".md", ".txt", ".html"):
                    ex.documents.append(normalize(f.read_text(encoding="utf-8", errors="replace")))
        return ex

    def in_documents(self, text: str) -> bool:
        """Whether ``text`` (normalized, at least ``min_passage_chars`` long) occurs in a dev-set document."""
        t = normalize(text)
        return len(t) >= self.min_passage_chars and any(t in d for d in self.documents)

    def reason(self, case: GroundedCase) -> str | None:
        """Why ``case`` must be left out (``"dev question"``, ``"dev document"``: a gold passage, or the case's
        :attr:`GroundedCase.evidence` when it has some, is in a dev document), or None."""
        if normalize(case.question) in self.questions:
            return "dev question"
        if any(self.in_documents(t) for t in case.evidence or [h.text for h in case.gold]):
            return "dev document"
        return None


def with_citations(reply: str, numbers: Sequence[int]) -> str:
    """``reply`` with ``[n]`` markers for ``numbers`` at the end of its first sentence, before the punctuation, as
    the service's verified replies carry them: ``"It costs $8.00 per order. Anything else?"``, ``[2]`` ->
    ``"It costs $8.00 per order [2]. Anything else?"``. (Reference replies state the answer first and often end
    with a follow-up question, which the passages do not support.)"""
    reply = reply.strip()
    if not numbers:
        return reply
    marks = "".join(f"[{n}]" for n in sorted(set(numbers)))
    m = re.search(r"[.!?…]+[\"')\]]*(?=\s|$)", reply)
    if m:
        return f"{reply[:m.start()].rstrip()} {marks}{reply[m.start():]}"
    return f"{reply} {marks}"


def supported_reply(reply: str, passages: Sequence[str], gold_numbers: Sequence[int], question: str,
                    min_overlap: float = DEFAULT_MIN_OVERLAP, max_quotes: int = 3,
                    evidence: Sequence[str] = ()) -> tuple[str, dict]:
    """The reply a verified answer would show, made from a reference ``reply`` written from the gold passages.

    Each sentence of ``reply`` (in order) is

    * kept, with its citation, when the service's :class:`~chatbot.verification.Verifier` over ``passages``
      supports it;
    * else replaced by the gold passage sentences (units of the passages numbered ``gold_numbers``, 1-based) that
      share at least two content tokens with it, most shared first, quoted whole with their citation. Questions
      ("Would you like ...?") among them are never quoted; a passage sentence is quoted once;
    * else dropped (nothing in the gold passages says it).

    At most ``max_quotes`` quoted sentences; a quote is checked by the ``Verifier`` too (one that fails, such as
    an ``echo`` of the question, is dropped and counted as ``rejected``), so every sentence of the result passes.

    Args:
        reply: the reference reply (citation markers ignored).
        passages: the prompt's passage texts, in prompt order (passage ``i`` is ``[i+1]``).
        gold_numbers: the numbers of the passages the reply was written from.
        question: the customer's message (a sentence that only repeats it is not supported).
        min_overlap: the verifier's threshold (``Settings.verify_min_overlap``).
        max_quotes: quoted passage sentences at most.
        evidence: when given, only gold passage sentences inside one of these texts are quoted (a chunk of a
            longer document holds other answers too: "Acorn Guest House has no gym" shares the entity's name with
            every sentence about it).

    Returns:
        ``(text, counts)``: the reply (``""`` when no sentence is left) and the sentence counts ``kept``,
        ``quoted``, ``dropped`` and ``rejected`` (failed the final check).
    """
    verifier = Verifier(passages, min_overlap, question=question)
    gold = set(gold_numbers)
    within = [normalize(t) for t in evidence]
    units = [(u, set(content_tokens(u.text))) for u in verifier.units
             if u.passage in gold and not u.text.rstrip().endswith("?")
             and (not within or any(normalize(u.text) in t for t in within))]
    counts = {"kept": 0, "quoted": 0, "dropped": 0, "rejected": 0}
    parts: list[str] = []
    used: set[tuple[int, int]] = set()
    for sent in split_sentences(strip_markers(reply)):
        if not sent.strip():
            continue
        v = verifier.check(sent)
        if v.supported and v.unit is not None:
            used.add((v.unit.passage, v.unit.start))
            parts.append(cite(sent, v.unit.passage))
            counts["kept"] += 1
            continue
        tokens = set(content_tokens(sent))
        ranked = sorted(((len(tokens & ut), i) for i, (u, ut) in enumerate(units)
                         if (u.passage, u.start) not in used), key=lambda x: (-x[0], x[1]))
        quotes = [units[i][0] for shared, i in ranked if shared >= 2]
        if not quotes:
            counts["dropped"] += 1
            continue
        for u in quotes:
            if counts["quoted"] >= max_quotes:
                break
            used.add((u.passage, u.start))
            counts["quoted"] += 1
            quote = cite(u.text, u.passage)
            if verifier.check(quote).supported:  # a kept sentence was checked above; a quote is checked here
                parts.append(quote)
            else:
                counts["rejected"] += 1
    return " ".join(parts), counts


def _case_rng(seed: int, case_id: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}\0{case_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def held_out(case_id: str, share: float, seed: int) -> bool:
    """Whether a case belongs to the held-out split: a stable function of its id (``share`` of ids)."""
    return _drawn("split", case_id, share, seed)


def _drawn(purpose: str, case_id: str, share: float, seed: int) -> bool:
    # a stable draw per (purpose, seed, case id), independent of the case's passage-order generator
    if share <= 0:
        return False
    digest = hashlib.sha256(f"{purpose}\0{seed}\0{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


class GroundedBuilder:
    """Makes retrieval-format examples from :class:`GroundedCase` s.

    Args:
        search: the retriever's search over the same collection as the gold passages, for distractors.
        system_prompt: the service's system prompt (``Settings.system_prompt``).
        abstain_message: the service's abstention (``Settings.abstain_message``).
        count_tokens: tokens of a message list under the chat model's template (``Engine.count_prompt_tokens``).
        budget_tokens: ``max_model_len - max_new_tokens``, as the service passes to :func:`build_prompt`.
        options: see :class:`GroundedOptions`.
        encode: the service's embedder (``texts -> (n, dim)`` L2-normalised rows), for verified-mode prompts.
        prompt_max_units: ``Settings.prompt_max_units``, for verified-mode prompts.

    Raises:
        InvalidInputError: ``options.verified_prompts`` > 0 without ``encode`` or with ``prompt_max_units`` < 1.
    """

    def __init__(self, search: Search, system_prompt: str, abstain_message: str,
                 count_tokens: Callable[[list[ChatMessage]], int], budget_tokens: int,
                 options: GroundedOptions | None = None, encode: Callable | None = None,
                 prompt_max_units: int = 0) -> None:
        options = options or GroundedOptions()
        if options.verified_prompts > 0 and (encode is None or prompt_max_units < 1):
            raise InvalidInputError("verified-mode prompts need the embedder and prompt_max_units >= 1, got "
                                    f"encode={encode!r}, prompt_max_units={prompt_max_units}")
        self.search = search
        self.system_prompt = system_prompt
        self.abstain_message = abstain_message
        self.count_tokens = count_tokens
        self.budget_tokens = budget_tokens
        self.options = options
        self.encode = encode
        self.prompt_max_units = prompt_max_units
        #: cases that gave no answerable example, by reason (``no_fit``, ``no_supported_reply``)
        self.skipped: Counter[str] = Counter()

    def _distractors(self, case: GroundedCase) -> list[Hit]:
        gold_docs = {h.doc_id for h in case.gold}
        return [h for h in self.search(case.question, self.options.candidates) if h.doc_id not in gold_docs]

    def _example(self, case: GroundedCase, passages: list[Hit], answerable: bool,
                 verified_prompt: bool = False) -> dict | None:
        # as the service prompts them: sentences addressed to the assistant are an injection, never prompted
        passages = [replace(h, text=sanitize_passage(h.text)) for h in passages]
        if verified_prompt:  # as the verified mode prompts them: the sentences that matter (the same function)
            evidence = Evidence.for_hits(case.question, passages, self.encode, case.question)
            passages = evidence.focus(passages, self.prompt_max_units)
        prompt = build_prompt(self.system_prompt, case.question, passages, list(case.history), self.count_tokens,
                              self.budget_tokens)
        gold_docs = {h.doc_id for h in case.gold}
        numbers = [i for i, h in enumerate(prompt.hits, 1) if h.doc_id in gold_docs]
        if answerable and not numbers:
            self.skipped["no_fit"] += 1  # the gold passages did not fit the budget
            return None
        meta = {"source": case.source, "case": case.id, "kind": "answerable" if answerable else "unanswerable",
                "gold_numbers": numbers, "passages": [h.doc_id for h in prompt.hits],
                "history_kept": prompt.history_kept}
        if verified_prompt:
            meta["prompt"] = "verified"
        if not answerable:
            reply = self.abstain_message
        elif self.options.reply == "reference":
            reply = with_citations(case.reply, numbers)
        else:
            reply, meta["sentences"] = supported_reply(case.reply, [h.text for h in prompt.hits], numbers,
                                                       case.question, self.options.min_overlap,
                                                       self.options.max_quotes, case.evidence)
            if not reply:
                self.skipped["no_supported_reply"] += 1  # nothing of the reference reply is in the gold passages
                return None
        return {
            "id": f"{case.id}:{meta['kind'][0]}{'v' if verified_prompt else ''}",
            "messages": [m.as_dict() for m in prompt.messages] + [{"role": "assistant", "content": reply}],
            "meta": meta,
        }

    def examples(self, case: GroundedCase) -> list[dict]:
        """The case's answerable example (gold among distractors, shuffled) and, for a share of cases, its
        unanswerable one (distractors only, the abstention). Empty when the gold passages cannot fit or, for
        ``supported`` replies, when no sentence of the reference reply is in them (counted in :attr:`skipped`).
        For a share of cases (:attr:`GroundedOptions.verified_prompts`) both carry the verified mode's prompt; an
        answerable one whose cut passages lost every sentence its reply needs carries whole passages instead
        (counted as ``verified_prompt_lost``).

        Raises:
            InvalidInputError: the case has no gold passage.
        """
        if not case.gold:
            raise InvalidInputError(f"case {case.id!r} has no gold passage")
        o = self.options
        rng = _case_rng(o.seed, case.id)
        distractors = self._distractors(case)
        gold = list(case.gold[: o.passages])
        passages = gold + distractors[: o.passages - len(gold)]
        rng.shuffle(passages)
        verified = _drawn("verified", case.id, o.verified_prompts, o.seed)
        ex = None
        if verified:
            before = Counter(self.skipped)  # a failed cut is retried with whole passages: its skip is not the case's
            ex = self._example(case, passages, answerable=True, verified_prompt=True)
            self.skipped = before
        if ex is None:
            ex = self._example(case, passages, answerable=True)
            if ex is not None and verified:
                self.skipped["verified_prompt_lost"] += 1
                verified = False
        if ex is None:
            return []
        out = [ex]
        if rng.random() < o.unanswerable and distractors:
            ex = self._example(case, distractors[: o.passages], answerable=False, verified_prompt=verified)
            if ex is not None:
                out.append(ex)
        return out


def build_grounded_set(cases: Iterable[GroundedCase], builder: GroundedBuilder, out_dir: str | Path,
                       exclusions: Exclusions | None = None, sources: Sequence[dict] = ()) -> dict:
    """Write ``train.jsonl`` and ``heldout.jsonl`` (chat JSONL, the format ``chatbot train`` reads) and
    ``manifest.json`` (sources, options, counts, what was excluded and why, the files' SHA-256) into ``out_dir``.

    A case's examples all go to one split (held out by case id, :func:`held_out`).

    Returns:
        The manifest.

    Raises:
        InvalidInputError: no example could be made.
    """
    from chatbot.hashing import sha256_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    o = builder.options
    counts = {"cases": 0, "excluded": {}, "no_fit": 0, "no_supported_reply": 0, "verified_prompt_lost": 0,
              "train": {"answerable": 0, "unanswerable": 0}, "heldout": {"answerable": 0, "unanswerable": 0},
              "reply_sentences": Counter()}
    skipped_before = Counter(builder.skipped)
    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    for case in cases:
        counts["cases"] += 1
        why = exclusions.reason(case) if exclusions is not None else None
        if why:
            counts["excluded"][why] = counts["excluded"].get(why, 0) + 1
            continue
        exs = builder.examples(case)
        split = "heldout" if held_out(case.id, o.validation, o.seed) else "train"
        for ex in exs:
            counts[split][ex["meta"]["kind"]] += 1
            counts["reply_sentences"].update(ex["meta"].get("sentences", {}))
        splits[split].extend(exs)
    for why, n in (builder.skipped - skipped_before).items():
        counts[why] += n
    counts["reply_sentences"] = dict(counts["reply_sentences"])
    if not splits["train"]:
        raise InvalidInputError(f"no training example could be made from {counts['cases']} case(s): {counts}")
    files = {}
    for name, rows in splits.items():
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        files[name] = {"path": path.name, "examples": len(rows), "sha256": sha256_file(path)}
    manifest = {
        "kind": "grounded-sft",
        "sources": list(sources),
        "options": {"passages": o.passages, "unanswerable": o.unanswerable, "validation": o.validation,
                    "seed": o.seed, "candidates": o.candidates, "budget_tokens": builder.budget_tokens,
                    "reply": o.reply, "min_overlap": o.min_overlap, "max_quotes": o.max_quotes,
                    "verified_prompts": o.verified_prompts, "prompt_max_units": builder.prompt_max_units},
        "system_prompt_sha256": hashlib.sha256(builder.system_prompt.encode()).hexdigest(),
        "abstain_message": builder.abstain_message,
        "counts": counts,
        "files": files,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    log.info("grounded set: %s", counts)
    return manifest
