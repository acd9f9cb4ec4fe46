"""The review service: what customers, staff and operators do with the conversation log, for the faces.

The faces (the console HTTP API in :mod:`chatbot.http`, the Gradio pages in :mod:`ui`) call
:class:`Review` (``assistant.review``) instead of reaching into the store: the customer's feedback and
polling for staff replies; transcript search, transcripts, annotations (redacted like every stored
text), the handoff queue (take, reply, hand back, close), exports (chat-SFT JSONL, CSV); the operator's
analytics. Inputs arrive as the faces get them (dates as ``YYYY-MM-DD`` text, ids as a comma separated
list) and are parsed here, once, by :func:`parse_day` and :func:`parse_ids`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
from collections.abc import Sequence
from dataclasses import dataclass

from chatbot.conversation_log import ConversationLog
from chatbot.errors import InvalidInputError
from chatbot.store import MESSAGE_ROLES, Annotation, Conversation, Feedback, Handoff, Message, Store, as_utc

# ---------------------------------------------------------------------------------------- parsers


def parse_ids(ids: str | list[str] | None) -> list[str]:
    """Conversation ids from a comma / whitespace separated string (or a list), de-duplicated, in order.

    Raises:
        InvalidInputError: an id longer than 64 characters.
    """
    if ids is None:
        return []
    parts = ids if isinstance(ids, list) else ids.replace(",", " ").split()
    out = list(dict.fromkeys(p.strip() for p in parts if p and p.strip()))
    for p in out:
        if len(p) > 64:
            raise InvalidInputError(f"conversation id must be at most 64 characters, got {p[:80]!r}")
    return out


def parse_day(value: str | None, field: str, end: bool = False) -> _dt.datetime | None:
    """``YYYY-MM-DD`` (or an ISO time) as an aware UTC datetime; ``end`` moves a bare date to the next day.

    Raises:
        InvalidInputError: not a date; the message names ``field`` and the value.
    """
    if value is None or not str(value).strip():
        return None
    v = str(value).strip()
    try:
        if len(v) == 10:
            d = _dt.datetime.strptime(v, "%Y-%m-%d").replace(tzinfo=_dt.timezone.utc)
            return d + _dt.timedelta(days=1) if end else d
        d = _dt.datetime.fromisoformat(v)
        return as_utc(d)
    except ValueError as exc:
        raise InvalidInputError(f"{field} must be a date YYYY-MM-DD, got {v!r}") from exc


# ---------------------------------------------------------------------------------------- exports


CSV_FIELDS = ("conversation_id", "message_id", "created_at", "role", "text", "corrected_text", "approved", "intent",
              "confidence", "rating", "comment", "cited_docs")

#: First characters that make a spreadsheet read a cell as a formula (OWASP "CSV Injection").
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe_cell(value):
    """A CSV cell that a spreadsheet shows as text: a string starting with ``=``, ``+``, ``-``, ``@``,
    tab or carriage return gets a leading ``'`` (the OWASP "CSV Injection" advice, as dify PR #29462 did
    in its export); other values are returned unchanged. ``'=SUM(1+1)`` shows as ``=SUM(1+1)`` in
    Excel, LibreOffice and Google Sheets instead of being evaluated."""
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS):
        return "'" + value
    return value


def export_jsonl(store: Store, conversation_ids: list[str] | None, approved_only: bool = False,
                 system_prompt: str | None = None) -> str:
    """Chat-SFT JSONL: one ``{"id", "messages": [{"role", "content"}, ...]}`` line per conversation
    (the store's one export, :meth:`chatbot.store.Store.export_sft_jsonl`)."""
    buf = io.StringIO()
    store.export_sft_jsonl(buf, conversation_ids, approved_only=approved_only, system_prompt=system_prompt)
    return buf.getvalue()


def export_csv(store: Store, conversation_ids: list[str]) -> str:
    """CSV with a header and one row per message (columns :data:`CSV_FIELDS`), for a spreadsheet: text
    cells that a spreadsheet would take for a formula are neutralised (:func:`csv_safe_cell`); the
    JSONL export keeps the exact text."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in store.export_rows(conversation_ids):
        w.writerow({k: csv_safe_cell(v) for k, v in row.items()})
    return buf.getvalue()


@dataclass(frozen=True)
class Export:
    """A download: its text, media type, file name, and how many conversations were asked for."""

    body: str
    media_type: str
    filename: str
    conversations: int


# ---------------------------------------------------------------------------------------- the service


class Review:
    """The review service over the conversation log.

    Args:
        store: the conversation log store.
        log: the redacting writer of the conversation (staff replies, corrected texts and handoffs go
            through its redactor and spool like every other stored text).
    """

    def __init__(self, store: Store, log: ConversationLog) -> None:
        self.store = store
        self.log = log

    # ------------------------------------------------------------------ customers

    def feedback(self, conversation_id: str, message_id: int, rating: int | None,
                 comment: str | None = None) -> Feedback | None:
        """Record (or replace, or with ``rating=None`` remove) a customer's rating of a reply
        (:meth:`chatbot.store.Store.add_feedback`).

        Raises:
            InvalidInputError: a rating other than +1, -1 or None; a customer message.
            NotFoundError: no such message in that conversation.
        """
        return self.store.add_feedback(conversation_id, message_id, rating, comment)

    def conversation(self, conversation_id: str) -> Conversation:
        """The conversation (its status, channel, start).

        Raises:
            NotFoundError: unknown conversation.
        """
        return self.store.get_conversation(conversation_id)

    def messages_after(self, conversation_id: str, after_id: int = 0,
                       roles: Sequence[str] = MESSAGE_ROLES) -> list[Message]:
        """Messages with ``id > after_id`` and a role in ``roles``, in order (polling for staff replies)."""
        return self.store.messages_after(conversation_id, after_id, roles=roles)

    # ------------------------------------------------------------------ staff: transcripts

    def search(self, text: str | None = None, since: str | None = None, until: str | None = None,
               intent: str | None = None, status: str | None = None, feedback: str | None = None,
               approved: bool | None = None, limit: int = 100, offset: int = 0) -> list[dict]:
        """Transcript search (:meth:`chatbot.store.Store.search_conversations`); empty filters are no filters.

        Args:
            since, until: ``YYYY-MM-DD`` days (``until`` inclusive) or ISO times.

        Raises:
            InvalidInputError: a bad date, status or feedback value, or limit < 1.
        """
        return self.store.search_conversations(text or None, parse_day(since, "since"),
                                               parse_day(until, "until", end=True), intent or None, status or None,
                                               feedback or None, limit, offset, approved)

    def transcript(self, conversation_id: str) -> dict:
        """A conversation for review (:meth:`chatbot.store.Store.transcript`).

        Raises:
            NotFoundError: unknown conversation.
        """
        return self.store.transcript(conversation_id)

    def annotate(self, message_id: int, user_id: int, corrected_text: str | None = None,
                 approved: bool | None = None) -> Annotation:
        """Store a reply's correction (redacted) and/or its approval for training.

        Raises:
            NotFoundError: no such message.
            InvalidInputError: a customer message.
        """
        if corrected_text is not None:
            corrected_text = self.log.redactor.redact(corrected_text).text
        return self.store.annotate(message_id, user_id, corrected_text, approved)

    # ------------------------------------------------------------------ staff: handoffs

    def handoff_queue(self) -> list[dict]:
        """Handoffs waiting for, or handled by, a person, oldest first (:meth:`chatbot.store.Store.handoff_queue`)."""
        return self.store.handoff_queue()

    def take(self, conversation_id: str, user_id: int) -> Handoff:
        """The staff member takes the conversation; the bot stays silent on it.

        Raises:
            NotFoundError: unknown conversation or user.
        """
        return self.store.take_handoff(conversation_id, user_id)

    def reply(self, conversation_id: str, user_id: int, text: str) -> Message:
        """Store a staff member's reply (redacted; takes the conversation when nobody has).

        Raises:
            InvalidInputError: empty text.
            NotFoundError: unknown conversation.
            StoreError: the write failed.
        """
        return self.log.staff_reply(conversation_id, user_id, text)

    def release(self, conversation_id: str, close: bool = False) -> Conversation:
        """Hand the conversation back to the bot, or (``close``) close it.

        Raises:
            NotFoundError: unknown conversation.
        """
        return self.store.release_handoff(conversation_id, close=close)

    # ------------------------------------------------------------------ exports and analytics

    def export(self, ids: str | list[str] | None, format: str = "jsonl", approved_only: bool = False,
               system_prompt: str | None = None) -> Export:
        """Conversations as a download: ``jsonl`` (chat SFT) or ``csv`` (one row per message).

        Args:
            ids: the conversations (comma / space separated, or a list); with ``approved_only`` and no ids,
                every conversation with an approved reply (JSONL cut after the last approved reply, CSV with
                all their messages); with ids, those of them with one.
            format: ``jsonl`` or ``csv``.

        Raises:
            InvalidInputError: no ids without ``approved_only``; an id too long; an unknown format.
        """
        if format not in ("jsonl", "csv"):
            raise InvalidInputError(f"format must be jsonl or csv, got {format!r}")
        id_list = parse_ids(ids)
        if not id_list and not approved_only:
            raise InvalidInputError("ids must name at least one conversation (or set approved_only=true)")
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        prefix = "approved" if approved_only else "conversations"
        if format == "csv":
            if approved_only:  # every message of the conversations with an approved reply (of ids, when given)
                approved_ids = self.store.approved_conversation_ids()
                id_list = [i for i in id_list if i in set(approved_ids)] if id_list else approved_ids
            return Export(export_csv(self.store, id_list), "text/csv; charset=utf-8", f"{prefix}-{stamp}.csv",
                          len(id_list))
        return Export(export_jsonl(self.store, id_list or None, approved_only, system_prompt),
                      "application/x-ndjson; charset=utf-8", f"{prefix}-{stamp}.jsonl", len(id_list))

    def analytics(self, since: str | None = None, until: str | None = None) -> dict:
        """The operator's figures over conversations started in the days [since, until]
        (:meth:`chatbot.store.Store.analytics`).

        Raises:
            InvalidInputError: a bad date.
        """
        return self.store.analytics(parse_day(since, "since"), parse_day(until, "until", end=True))


# as_utc is the store's: faces format timestamps through the service layer, never by importing the store.
__all__ = ["CSV_FIELDS", "Export", "Review", "as_utc", "csv_safe_cell", "export_csv", "export_jsonl", "parse_day",
           "parse_ids"]
