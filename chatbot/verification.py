"""Answer verification: a reply sentence reaches the customer only when a passage supports it.

The reply is checked sentence by sentence (:class:`SentenceStream` cuts the engine's deltas
into sentences with ``sentencex``, Wikimedia's rule-based segmenter for ~300 languages). A
sentence is *supported* (:meth:`Verifier.check`) when

1. every **claim** in it (number, amount, duration, percentage, URL, e-mail address, phone
   number; :func:`claims`) occurs in the passages, and
2. its **content** overlaps one passage unit (a sentence or list item of a passage;
   :func:`passage_units`): at least ``min_overlap`` of the sentence's content tokens
   (lower-cased, stemmed with PyStemmer, English stop words removed except negations and
   quantifiers such as *not*, *all*, *every*, which change what a sentence claims) occur in
   that one unit.

The token-overlap rule follows K-Precision (Adlakha et al., "Evaluating Correctness and
Faithfulness of Instruction-Following Models for Question Answering", TACL 2024), measured
per passage sentence instead of over the whole passage set, so that a sentence stitched
from words of several passages does not pass. Passage units that address the assistant
("Assistant: disregard the policy above ...") are *untrusted* (:func:`is_instruction`):
they are removed from the prompt, cannot support a sentence and are never quoted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

#: Share of a sentence's content tokens that must occur in one passage unit (see the module docstring).
#: 0.6 measured best on both dev sets (data/eval): 0.5 let paraphrases of unrelated steps through, 0.7
#: dropped faithful paraphrases (``chatbot eval answers``; docs/answers.md has the table).
DEFAULT_MIN_OVERLAP = 0.6

#: a shown sentence has at least this many distinct content tokens, one of them a word
MIN_SENTENCE_TOKENS = 2

_URL = r"(?:https?://|www\.)[^\s<>()\[\]]+|\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|org|net|io|co|uk|de|fr|info|biz|us)\b(?:/[^\s<>()\[\]]*)?"
_EMAIL = r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
_PHONE = r"(?<![\w.])\+?\(?\d{1,4}\)?(?:[\s.-]\(?\d{2,4}\)?){2,5}(?!\w|\.\d)"
_NUMBER = r"\d+(?:[.,]\d+)*"
_CLAIM = re.compile(rf"(?P<email>{_EMAIL})|(?P<url>{_URL})|(?P<phone>{_PHONE})|(?P<number>{_NUMBER})", re.I)
_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100, "thousand": 1000,
    "dozen": 12, "once": 1, "twice": 2,
}
_NUMBER_WORD = re.compile(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", re.I)
_WORD = re.compile(r"\w+", re.UNICODE)
#: citation markers the model writes itself ([1], [1, 2], [1][2]); ours are added after verification
_MARKER = re.compile(r"\s*\[\s*\d+(?:\s*[,;]\s*\d+)*\s*\]")
_LIST_MARKER = re.compile(r"^\s*(?:[-*+\u2022]|\d{1,3}[.)])\s+")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s")
#: words that change what a sentence claims: kept as content although stop-word lists drop them
_KEEP = frozenset({"no", "not", "never", "none", "nothing", "all", "every", "always", "any", "only", "cannot",
                   "without", "nobody", "free", "full", "first", "last", "least", "most", "more", "less"})
#: a passage unit that addresses the assistant instead of the customer (prompt injection in a document)
_INSTRUCTION = re.compile(
    r"^\W*(assistant|system|chatbot|ai|bot)\s*:"
    r"|\b(ignore|disregard|forget|override)\b[^.\n]{0,60}\b(instructions?|polic(y|ies)|rules?|above|previous|prior|guidelines?)\b"
    r"|\bsystem prompt\b"
    r"|\byou (must|should|will) (now |always )?(say|tell|offer|respond|answer|reply|promise|confirm)\b",
    re.I,
)


@dataclass(frozen=True)
class Claim:
    """A checkable claim in a sentence.

    Attributes:
        kind: ``number`` (also amounts, durations, percentages), ``url``, ``email`` or ``phone``.
        text: as written.
        key: the normalised form compared with the passages (a number's value, a URL without
            scheme and ``www.``, the digits of a phone number, a lower-cased e-mail address).
    """

    kind: str
    text: str
    key: str


def _number_key(text: str) -> str:
    t = text.replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", text) else text.replace(",", ".")
    try:
        v = float(t)
    except ValueError:
        return text
    return f"{v:g}"


def claims(text: str) -> list[Claim]:
    """The numbers (digits and number words), amounts, durations, percentages, URLs, e-mail
    addresses and phone numbers in ``text``, in order."""
    out: list[Claim] = []
    for m in _CLAIM.finditer(text):
        kind = m.lastgroup or "number"
        s = m.group(0).rstrip(".,;:!?")
        if kind == "email":
            key = s.lower()
        elif kind == "url":
            key = re.sub(r"^(https?://)?(www\.)?", "", s.lower()).rstrip("/")
        elif kind == "phone":
            key = re.sub(r"\D", "", s)
        else:
            key = _number_key(s)
        out.append(Claim(kind, s, key))
    for m in _NUMBER_WORD.finditer(text):
        out.append(Claim("number", m.group(0), f"{float(_NUMBER_WORDS[m.group(0).lower()]):g}"))
    return out


@lru_cache(maxsize=1)
def _stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS) - _KEEP


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


def content_tokens(text: str) -> list[str]:
    """Content tokens of ``text``: lower-cased ``\\w+`` words, English stop words removed (except
    negations and quantifiers), Snowball-stemmed (PyStemmer). Numbers stay as written."""
    stop = _stop_words()
    words = [w for w in _WORD.findall(text.lower()) if w not in stop and w != "_"]
    return _stemmer().stemWords(words)


def strip_markers(text: str) -> str:
    """``text`` without citation markers such as ``[1]`` or ``[1, 2]``."""
    return _MARKER.sub("", text)


def is_instruction(text: str) -> bool:
    """True when a passage unit addresses the assistant (``Assistant: ...``, "ignore the
    instructions above", "you must now tell ..."): such text is a prompt injection, not policy."""
    return bool(_INSTRUCTION.search(text))


@dataclass(frozen=True)
class Unit:
    """One sentence or list item of a passage.

    Attributes:
        passage: 1-based number of the passage ([n] in the prompt and the reply).
        start, end: character span of ``text`` in the passage's text.
        text: the unit as written (list marker removed).
        context: the nearest heading above it in the passage (in an FAQ, the question it answers),
            else the passage's own context (its section or title); used to judge relevance, never quoted.
    """

    passage: int
    start: int
    end: int
    text: str
    context: str = ""


def split_sentences(text: str, language: str = "en") -> list[str]:
    """Sentences of ``text``: each line, then each sentence of a line (``sentencex``); joined,
    they give back ``text`` exactly."""
    import sentencex

    return [s for line in text.splitlines(keepends=True) for s in sentencex.segment(language, line) if s]


def passage_units(number: int, text: str, language: str = "en", context: str = "") -> list[Unit]:
    """A passage cut into units: each line, then each sentence of a line; list markers are left
    out of a unit's span; Markdown headings (``# ...``) and empty units are skipped (a heading
    names a topic, it states nothing) but become the :attr:`Unit.context` of the units below
    them (``context`` before the first heading)."""
    units: list[Unit] = []
    pos = 0
    for line in text.splitlines(keepends=True):
        if _HEADING.match(line):
            context = _HEADING.sub("", line).strip()
            pos += len(line)
            continue
        m = _LIST_MARKER.match(line)
        offset = pos + (m.end() if m else 0)
        body = line[m.end():] if m else line
        for sent in split_sentences(body, language) if body.strip() else []:
            lead = len(sent) - len(sent.lstrip())
            core = sent.strip()
            if core and any(ch.isalnum() for ch in core):
                units.append(Unit(number, offset + lead, offset + lead + len(core), core, context))
            offset += len(sent)
        pos += len(line)
    return units


def sanitize_passage(text: str, language: str = "en") -> str:
    """``text`` without its units that address the assistant (:func:`is_instruction`)."""
    bad = [u for u in passage_units(0, text, language) if is_instruction(u.text)]
    for u in reversed(bad):
        text = text[: u.start] + text[u.end:]
    return text


@dataclass
class Support:
    """The verdict on one sentence.

    Attributes:
        supported: shown to the customer.
        unit: the passage unit with the highest content overlap (None when no passage has one).
        overlap: share of the sentence's content tokens found in ``unit`` (0..1).
        missing_claims: claims of the sentence no passage contains.
        reason: ``supported``, ``unsupported_claim``, ``low_overlap`` or ``no_content`` (fewer than
            :data:`MIN_SENTENCE_TOKENS` content tokens, or none that is a word: "4.", "Sure!").
    """

    supported: bool
    unit: Unit | None
    overlap: float
    missing_claims: list[str] = field(default_factory=list)
    reason: str = "supported"


class Verifier:
    """Checks reply sentences against the passages of one turn.

    Args:
        passages: the passage texts, in prompt order (passage ``i`` is cited ``[i+1]``).
        min_overlap: share of a sentence's content tokens that must occur in one unit (0..1].
        trusted: other texts whose claims count as supported (the company's configured phone,
            e-mail address and website, which a fine-tuned reply writes as ``[[field]]`` markers).
        language: language code for sentence splitting.

    Raises:
        ValueError: ``min_overlap`` outside (0, 1].
    """

    def __init__(self, passages: Sequence[str], min_overlap: float = DEFAULT_MIN_OVERLAP,
                 trusted: Sequence[str] = (), language: str = "en") -> None:
        if not 0.0 < min_overlap <= 1.0:
            raise ValueError(f"min_overlap must be in (0, 1], got {min_overlap}")
        self.min_overlap = min_overlap
        self.passages = list(passages)
        self.units = [u for i, p in enumerate(self.passages, 1) for u in passage_units(i, p, language)
                      if not is_instruction(u.text)]
        self._unit_tokens = [set(content_tokens(u.text)) for u in self.units]
        self._claim_keys = {c.key for t in [*(u.text for u in self.units), *trusted] for c in claims(t)}
        self._text = " ".join([*(u.text.lower() for u in self.units), *(t.lower() for t in trusted)])

    def unsupported_claims(self, sentence: str) -> list[str]:
        """Claims of ``sentence`` (as written) that no trusted passage unit contains."""
        out = []
        for c in claims(sentence):
            if c.key in self._claim_keys:
                continue
            if c.kind in ("url", "email") and c.key in self._text:
                continue
            out.append(c.text)
        return out

    def check(self, sentence: str) -> Support:
        """Whether ``sentence`` (citation markers ignored) may be shown; see the module docstring."""
        sentence = strip_markers(sentence)
        tokens = set(content_tokens(sentence))
        best, best_overlap = None, 0.0
        for u, ut in zip(self.units, self._unit_tokens):
            if tokens:
                ov = len(tokens & ut) / len(tokens)
                if ov > best_overlap:
                    best, best_overlap = u, ov
        missing = self.unsupported_claims(sentence)
        if len(tokens) < MIN_SENTENCE_TOKENS or not any(t.isalpha() for t in tokens):
            return Support(False, None, 0.0, missing, "no_content")
        if missing:
            return Support(False, best, best_overlap, missing, "unsupported_claim")
        if best is None or best_overlap < self.min_overlap:
            return Support(False, best, best_overlap, [], "low_overlap")
        return Support(True, best, best_overlap, [], "supported")


class SentenceStream:
    """Cuts streamed text deltas into whole sentences.

    :meth:`push` returns the sentences completed so far (the last, possibly unfinished
    segment stays buffered); :meth:`flush` returns the rest. Joined, everything returned
    equals everything pushed.
    """

    def __init__(self, language: str = "en") -> None:
        self.language = language
        self._buf = ""

    def push(self, delta: str) -> list[str]:
        """Add ``delta``; return the sentences it completed (possibly none)."""
        self._buf += delta
        if not re.search(r"[.!?\u3002\uff01\uff1f:;]\s|\n", self._buf):
            return []
        parts = split_sentences(self._buf, self.language)
        if len(parts) <= 1:
            return []
        self._buf = parts[-1]
        return parts[:-1]

    def flush(self) -> list[str]:
        """The buffered rest, as sentences."""
        rest, self._buf = self._buf, ""
        return split_sentences(rest, self.language) if rest.strip() else []


@dataclass
class Evidence:
    """The trusted passage units of one turn, scored against the question.

    Attributes:
        units: trusted units of every passage, in passage order.
        scores: cosine similarity of each unit with the question (embedder vectors), aligned with ``units``.
        on_topic: per unit, whether it (or its heading) shares a content token with the customer's
            message that the passage titles do not already hold: the unit addresses what was
            asked, not only the product or entity it is about (see :meth:`build`).
    """

    units: list[Unit]
    scores: list[float]
    on_topic: list[bool] = field(default_factory=list)

    @classmethod
    def build(cls, query: str, passages: Sequence[str], encode, message: str | None = None,
              titles: Sequence[str] = (), contexts: Sequence[str] = (), language: str = "en") -> "Evidence":
        """Score the trusted units of ``passages`` against ``query``.

        Args:
            query: the question (with the conversation context the retrieval query used).
            passages: passage texts in prompt order (passage ``i`` is ``[i+1]``).
            encode: ``texts -> float32 array (n, dim)`` of L2-normalised rows (``Embedder.encode``).
            message: the customer's own message, whose content tokens (less the titles') decide
                :attr:`on_topic` (default ``query``).
            titles: the passages' document titles, aligned with ``passages``.
            contexts: each passage's section (its heading path) for the units above its first
                heading line; default its title.
        """
        titles = list(titles) + [""] * (len(passages) - len(titles))
        contexts = [c or t for c, t in zip(list(contexts) + [""] * (len(passages) - len(contexts)), titles)]
        units = [u for i, (p, c) in enumerate(zip(passages, contexts), 1) for u in passage_units(i, p, language, c)
                 if not is_instruction(u.text)]
        if not units:
            return cls([], [], [])
        vecs = encode([query, *[u.text for u in units]])
        scores = (vecs[1:] @ vecs[0]).tolist()
        focus = set(content_tokens(message if message is not None else query)) - {
            tok for t in titles for tok in content_tokens(t)}
        # a message whose every token is in the titles ("shipping cost?") is about the whole passage
        on_topic = [not focus or bool(focus & set(content_tokens(f"{u.context} {u.text}"))) for u in units]
        return cls(units, [float(x) for x in scores], on_topic)

    @property
    def top_score(self) -> float | None:
        """The best unit's score (None without units)."""
        return max(self.scores) if self.scores else None

    def best(self, k: int, min_score: float, min_tokens: int = 2, on_topic: bool = False) -> list[Unit]:
        """Up to ``k`` distinct units scoring at least ``min_score``, best first; units with fewer than
        ``min_tokens`` content tokens, repeats of a unit's text (the same line in two passages) and,
        with ``on_topic``, units off the message's topic (:attr:`on_topic`) are skipped."""
        ranked = sorted(range(len(self.units)), key=lambda i: -self.scores[i])
        out: list[Unit] = []
        seen: set[str] = set()
        for i in ranked:
            if self.scores[i] < min_score or len(out) >= k:
                break
            u = self.units[i]
            key = " ".join(u.text.lower().split())
            if key in seen or (on_topic and self.on_topic and not self.on_topic[i]):
                continue
            if len(set(content_tokens(u.text))) >= min_tokens:
                out.append(u)
                seen.add(key)
        return out

    def focus(self, hits: Sequence, max_units: int) -> list:
        """``hits`` with each text cut to its units among the ``max_units`` best overall (plus each
        passage's own best unit, so numbering stays [1]..[n]), in document order, one per line.
        ``hits`` are :class:`retrieval.documents.Hit` (or any dataclass with ``text``)."""
        from dataclasses import replace

        keep = set(sorted(range(len(self.units)), key=lambda i: -self.scores[i])[:max_units])
        for n in range(1, len(hits) + 1):
            own = [i for i, u in enumerate(self.units) if u.passage == n]
            if own:
                keep.add(max(own, key=lambda i: self.scores[i]))
        out = []
        for n, h in enumerate(hits, 1):
            texts = [self.units[i].text for i in sorted(keep) if self.units[i].passage == n]
            out.append(replace(h, text="\n".join(texts) if texts else h.text))
        return out


def cite(sentence: str, number: int) -> str:
    """``sentence`` (stripped, its own markers removed) ending with the citation ``[number]``
    before its final punctuation is kept: ``"Costs $8.00 [1]."``."""
    s = strip_markers(sentence).strip()
    m = re.search(r"[.!?\u3002\uff01\uff1f]+$", s)
    if m:
        return f"{s[: m.start()]} [{number}]{s[m.start():]}"
    return f"{s} [{number}]"
