"""Company fields: the site-specific details a fine-tuned reply refers to, filled at serving time.

Training data such as the Bitext set writes company details as ``{{Website Name}}``
or ``{{Customer Support Phone Number}}`` (333 different spellings in that file).
The importer (:func:`finetune.data.normalize_bitext_reply`) maps the spellings of
each company detail onto one canonical field and writes it as a *field marker*,
``[[website_name]]``; every other placeholder (button and page names such as
``{{Cancel Order}}``) becomes plain text. A model fine-tuned on that data says
``[[phone]]`` where the company's phone number belongs, and the service replaces
the marker with the configured value (``Settings.company_fields``) before the
customer sees it, so an adapter never bakes in one company's details and the
customer never sees braces.

Public API: :data:`COMPANY_FIELDS` (the canonical fields and their default
values), :func:`canonical_field` (a placeholder spelling -> field name or None),
:func:`fill_placeholders` (a whole text) and :class:`PlaceholderStream` (text
deltas of a streamed reply).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: The canonical company fields with neutral default values (override them with
#: ``CHATBOT_COMPANY_FIELDS='{"phone": "+44 20 7946 0000"}'`` or the TOML file).
COMPANY_FIELDS: dict[str, str] = {
    "company_name": "our company",
    "website_name": "our website",
    "website_url": "our website",
    "phone": "our customer support phone line",
    "email": "our customer support email address",
    "support_hours": "during our opening hours",
    "live_chat": "Live Chat",
}

#: Placeholder spellings (lower-cased, without braces) of each canonical field,
#: taken from the Bitext customer-support data (``{{Customer Support Phone Number}}`` ...).
_ALIASES: dict[str, tuple[str, ...]] = {
    "company_name": ("company name", "company"),
    "website_name": (
        "website name", "website", "website or app", "website/app name", "website name anonymized",
        "company website", "service website", "mobile app name", "app name",
    ),
    "website_url": ("website url", "company url", "url"),
    "phone": (
        "customer support phone number", "support phone number", "customer service phone number",
        "phone number", "customer support phone number anonymized", "customer assistance phone number",
        "complaint phone number", "phone support", "customer support number", "support number",
    ),
    "email": (
        "customer support email", "customer support email address", "support email", "customer service email",
        "customer service email address", "support email address", "complaint email address",
        "feedback email address", "email support",
    ),
    "support_hours": (
        "customer support availability", "customer support hours", "customer service hours", "operating hours",
        "support team availability", "customer assistance hours", "customer support availability anonymized",
        "business hours", "support hours",
    ),
    "live_chat": ("live chat", "live chat anonymized", "chat", "live chat support"),
}
_ALIAS_TO_FIELD = {alias: name for name, aliases in _ALIASES.items() for alias in aliases}

#: A field marker in model output: ``[[website_name]]``.
MARKER_RE = re.compile(r"\[\[([a-z][a-z0-9_]{0,40})\]\]")
#: A raw dataset placeholder: ``{{Website Name}}`` (what a base model may copy from its pre-training).
RAW_PLACEHOLDER_RE = re.compile(r"\{\{([^{}\n]{1,80})\}\}")
# The longest text a marker can span; a streamed delta holds back at most this much.
_MAX_MARKER_CHARS = 2 + 80 + 2


def marker(field: str) -> str:
    """The marker a model writes for ``field``: ``marker("phone") == "[[phone]]"``."""
    return f"[[{field}]]"


def canonical_field(placeholder: str) -> str | None:
    """The canonical field of a placeholder spelling, or None when it is not a company detail.

    Args:
        placeholder: the text inside ``{{...}}``, e.g. ``"Customer Support Phone Number"``
            (case and surrounding spaces are ignored).

    Returns:
        A key of :data:`COMPANY_FIELDS`, e.g. ``"phone"``, or None.
    """
    return _ALIAS_TO_FIELD.get(" ".join(placeholder.lower().split()))


def _value(name: str, fields: Mapping[str, str]) -> str:
    if name in fields:
        return str(fields[name])
    if name in COMPANY_FIELDS:
        return COMPANY_FIELDS[name]
    return name.replace("_", " ")


def fill_placeholders(text: str, fields: Mapping[str, str] | None = None) -> str:
    """Replace company field markers (and raw dataset placeholders) with configured values.

    ``[[phone]]`` becomes ``fields["phone"]`` (else the default of
    :data:`COMPANY_FIELDS`; an unknown field name is written out in words, so no
    marker reaches the customer). A raw ``{{Customer Support Phone Number}}`` is
    mapped through :func:`canonical_field`; a raw placeholder that is no company
    detail (``{{Cancel Order}}``) loses its braces.

    Args:
        text: a generated reply.
        fields: field name -> value, normally ``Settings.company_fields``.

    Returns:
        The text with every marker replaced.
    """
    fields = fields or {}
    text = MARKER_RE.sub(lambda m: _value(m.group(1), fields), text)

    def _raw(m: re.Match) -> str:
        name = canonical_field(m.group(1))
        return _value(name, fields) if name else m.group(1).strip()

    return RAW_PLACEHOLDER_RE.sub(_raw, text)


class PlaceholderStream:
    """Fill markers in a streamed reply whose deltas may cut a marker in two.

    ``push(delta)`` returns the text that is safe to show now (a possible marker
    start, ``[`` or ``{`` with no closing pair yet, is held back, at most 84
    characters); ``flush()`` returns the rest at the end of the stream.

    Args:
        fields: field name -> value, normally ``Settings.company_fields``.
    """

    def __init__(self, fields: Mapping[str, str] | None = None) -> None:
        self.fields = dict(fields or {})
        self._buf = ""

    def push(self, delta: str) -> str:
        """Add a delta; return the filled text that can be emitted now."""
        self._buf += delta
        cut = self._hold_from(self._buf)
        ready, self._buf = self._buf[:cut], self._buf[cut:]
        return fill_placeholders(ready, self.fields)

    def flush(self) -> str:
        """Return whatever is held back, filled (call once at the end of the stream)."""
        ready, self._buf = self._buf, ""
        return fill_placeholders(ready, self.fields)

    @staticmethod
    def _hold_from(buf: str) -> int:
        # Hold back from the last "[[" / "{{" (or a lone trailing "[" / "{") that is not closed yet.
        start = len(buf)
        for opener, closer in (("[[", "]]"), ("{{", "}}")):
            i = buf.rfind(opener)
            if i >= 0 and buf.find(closer, i) < 0 and len(buf) - i <= _MAX_MARKER_CHARS:
                start = min(start, i)
        if buf.endswith(("[", "{")) and start == len(buf):
            start = len(buf) - 1
        return start
