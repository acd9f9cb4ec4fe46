"""PII redaction of text before it is stored: emails, phone numbers, payment card numbers, person names.

Patterns find emails, phone numbers (formatted numbers, ``+`` international
numbers, or 7-15 digits right after a word like "phone" / "call me"), and payment
card numbers (13-19 digits, spaces or dashes allowed, that pass the Luhn check).
Person names come from the entity head when one is given (spans whose type names a
person, e.g. ``name``, ``person``, ``customer_name``) and from "my name is ..." phrases.

Each finding is replaced by a placeholder (``[EMAIL]``, ``[PHONE]``, ``[CARD]``,
``[NAME]``); :meth:`Redactor.redact` returns the redacted text and the count per kind,
never the removed values.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

KINDS = ("email", "phone", "card", "name")
PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "name": "[NAME]"}
#: Entity-head span types treated as person names (lower-case; matched exactly or as a suffix ``_name``).
PERSON_TYPES = ("name", "person", "per", "person_name", "customer_name", "full_name", "first_name", "last_name")

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# 13-19 digits, optionally grouped by single spaces or dashes
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# formatted: +CC, (area), and at least two groups separated by space/dot/dash
_PHONE_FORMATTED = re.compile(
    r"(?<![\w+-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])\d{2,4}[\s.-]\d{2,5}(?![\w-])"
)
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d{7,15}(?!\w)")
_PHONE_CONTEXT = re.compile(
    r"\b(?:phone|mobile|cell|tel|telephone|call\s+me|text\s+me|whatsapp|reach\s+me)\b[^\d\n]{0,20}(\+?\d[\d\s.()-]{5,18}\d)",
    re.IGNORECASE,
)
_NAME_PHRASE = re.compile(
    r"\b(?i:my\s+name\s+is|my\s+name's|i\s+am|i'm)\s+((?:[A-Z][a-z'\-]+)(?:\s+[A-Z][a-z'\-]+){0,2})\b"
)
_NAME_PHRASE_STRICT = re.compile(
    r"\b(?i:my\s+name\s+is|my\s+name's|name\s*:)\s*([A-Za-z][A-Za-z'\-]+(?:\s+[A-Z][a-z'\-]+){0,2})"
)
_DATE = re.compile(r"^(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4})$")
#: Capitalised words after "I am" that are not names.
_NOT_NAMES = {"Happy", "Sorry", "Not", "Very", "So", "Still", "Looking", "Trying", "Unable", "Able", "Going", "Here",
              "Writing", "Calling", "Waiting", "Interested", "Angry", "Upset", "Confused", "A", "An", "The", "Just",
              "Done", "Fine", "Good", "Back", "Currently", "Also", "Really", "Sure", "New", "Asking", "Having"}


def luhn_ok(digits: str) -> bool:
    """True when the digit string passes the Luhn checksum (payment card numbers do)."""
    total, alt = 0, False
    for ch in reversed(digits):
        d = ord(ch) - 48
        if alt:
            d *= 2
            if d > 9:
                d -= 9
        total += d
        alt = not alt
    return total % 10 == 0


@dataclass
class Redaction:
    """A redacted text: ``text`` with placeholders and ``counts`` per kind (no removed values)."""

    text: str
    counts: dict[str, int] = field(default_factory=dict)


class Redactor:
    """Finds and replaces PII in text.

    Args:
        kinds: which kinds to redact (subset of :data:`KINDS`).
        entity_head: optional object with ``predict(texts) -> [[Slot(type, value, start, end, score)]]``
            (e.g. :class:`finetune.heads.EntityHead`), or a no-argument callable returning one or None
            (resolved on first use; a failure is logged once and the head is then left out); its
            person-name spans are redacted.
        person_types: entity types that are person names.

    Raises:
        ValueError: an unknown kind.
    """

    def __init__(self, kinds: Iterable[str] = KINDS, entity_head=None,
                 person_types: Sequence[str] = PERSON_TYPES) -> None:
        self.kinds = tuple(kinds)
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise ValueError(f"redaction kinds must be among {KINDS}, got {bad}")
        self._entity_head = entity_head
        self._head_resolved = entity_head is None or hasattr(entity_head, "predict")
        self.person_types = tuple(t.lower() for t in person_types)

    def _is_person(self, type_: str) -> bool:
        t = type_.lower()
        return t in self.person_types or t.endswith("_name") and not t.startswith(("product", "item", "brand",
                                                                                   "company", "store"))

    @property
    def entity_head(self):
        """The entity head, or None (resolved from the provider on first use)."""
        if not self._head_resolved:
            self._head_resolved = True
            try:
                self._entity_head = self._entity_head()
            except Exception as exc:  # optional: names then come from patterns only
                log.warning("redaction: no entity head (%s); person names from patterns only", exc)
                self._entity_head = None
        return self._entity_head

    def spans(self, text: str, slots: Sequence | None = None) -> list[tuple[int, int, str]]:
        """Non-overlapping ``(start, end, kind)`` spans to redact, in text order.

        Args:
            slots: entity spans of ``text`` already found (e.g. by routing); when given, the
                entity head is not run again.
        """
        found: list[tuple[int, int, str]] = []
        if "email" in self.kinds:
            found += [(m.start(), m.end(), "email") for m in _EMAIL.finditer(text)]
        if "card" in self.kinds:
            for m in _CARD.finditer(text):
                digits = re.sub(r"\D", "", m.group())
                grouped = re.fullmatch(r"\d{4}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{1,3})?|\d{4}([ -])\d{6}\2\d{5}",
                                       m.group())
                if 13 <= len(digits) <= 19 and (luhn_ok(digits) or grouped):
                    found.append((m.start(), m.end(), "card"))
        if "phone" in self.kinds:
            for rx in (_PHONE_FORMATTED, _PHONE_INTL):
                for m in rx.finditer(text):
                    if 7 <= len(re.sub(r"\D", "", m.group())) <= 15 and not _DATE.match(m.group()):
                        found.append((m.start(), m.end(), "phone"))
            found += [(m.start(1), m.end(1), "phone") for m in _PHONE_CONTEXT.finditer(text)
                      if 7 <= len(re.sub(r"\D", "", m.group(1))) <= 15]
        if "name" in self.kinds:
            for m in _NAME_PHRASE_STRICT.finditer(text):
                found.append((m.start(1), m.end(1), "name"))
            for m in _NAME_PHRASE.finditer(text):
                if m.group(1).split()[0] not in _NOT_NAMES:
                    found.append((m.start(1), m.end(1), "name"))
            if slots is None and self.entity_head is not None:
                try:
                    slots = self.entity_head.predict([text])[0]
                except Exception:  # the head is optional: patterns still apply
                    log.exception("redaction: the entity head failed; person names from patterns only")
                    slots = []
            for s in slots or []:
                d = s if isinstance(s, dict) else vars(s)
                start, end = d.get("start"), d.get("end")
                if (self._is_person(str(d.get("type", ""))) and isinstance(start, int) and isinstance(end, int)
                        and 0 <= start < end <= len(text)):
                    found.append((start, end, "name"))
        # merge overlaps: the earliest start wins, cards before phones (longer first)
        priority = {"email": 0, "card": 1, "phone": 2, "name": 3}
        found.sort(key=lambda x: (x[0], -(x[1] - x[0]), priority[x[2]]))
        out: list[tuple[int, int, str]] = []
        for start, end, kind in found:
            if out and start < out[-1][1]:
                if end > out[-1][1]:
                    out[-1] = (out[-1][0], end, out[-1][2])
                continue
            out.append((start, end, kind))
        return out

    def redact(self, text: str, slots: Sequence | None = None) -> Redaction:
        """Replace every PII span with its placeholder (``slots``: see :meth:`spans`).

        Returns:
            The redacted text and ``{kind: count}`` (empty when nothing was found).
        """
        if not text:
            return Redaction(text or "")
        parts, counts, pos = [], {}, 0
        for start, end, kind in self.spans(text, slots):
            parts.append(text[pos:start])
            parts.append(PLACEHOLDERS[kind])
            counts[kind] = counts.get(kind, 0) + 1
            pos = end
        parts.append(text[pos:])
        return Redaction("".join(parts), counts)

    def redact_slots(self, slots: Sequence) -> list[dict]:
        """Slots as plain dicts with PII values replaced (person-typed values always)."""
        out = []
        for s in slots or []:
            d = dict(s) if isinstance(s, dict) else (s.to_dict() if hasattr(s, "to_dict") else dict(vars(s)))
            value = str(d.get("value", ""))
            if self._is_person(str(d.get("type", ""))) and "name" in self.kinds:
                d["value"] = PLACEHOLDERS["name"]
            else:
                d["value"] = self.redact(value).text
            out.append(d)
        return out


class NoRedaction(Redactor):
    """Stores text as given (``redact_pii = false``)."""

    def __init__(self) -> None:
        super().__init__(kinds=())

    def redact(self, text: str, slots: Sequence | None = None) -> Redaction:
        return Redaction(text or "")

    def redact_slots(self, slots: Sequence) -> list[dict]:
        return [dict(s) if isinstance(s, dict) else (s.to_dict() if hasattr(s, "to_dict") else dict(vars(s)))
                for s in slots or []]


def build_redactor(settings, entity_head=None) -> Redactor:
    """The redactor the settings ask for: :class:`NoRedaction` when ``redact_pii`` is off."""
    if not getattr(settings, "redact_pii", True):
        return NoRedaction()
    kinds = getattr(settings, "redact_kinds", None) or KINDS
    return Redactor(kinds, entity_head=entity_head)
