"""The conversation log store (SQLModel): the only package that touches the database.

SQLite by default (WAL journal, busy timeout) and PostgreSQL by URL
(``postgresql+psycopg://...``). An organ: it takes a URL and plain arguments, imports nothing
above it (no settings, service or faces) and raises :mod:`chatbot.errors` types.

Modules, one concern each:

* :mod:`~chatbot.store.schema`: the tables, their allowed values, opening a database at the newest
  Alembic migration (:mod:`chatbot.store.migrations`).
* :mod:`~chatbot.store.base`: sessions, transactions, retries of transient write failures.
* :mod:`~chatbot.store.conversations`: conversations and messages; :func:`change_status`, the one place a
  conversation's status (``bot`` | ``handoff`` | ``human`` | ``closed``) and its handoff rows change.
* :mod:`~chatbot.store.review`: feedback, annotations, the handoff queue, search, transcripts, and the
  chat-SFT JSONL export fine-tuning reads (:meth:`Store.export_sft_jsonl`).
* :mod:`~chatbot.store.analytics`: the operator's figures as SQL aggregates.
* :mod:`~chatbot.store.users`: console users and login sessions.
"""

from __future__ import annotations

from sqlmodel import SQLModel

from chatbot.store.analytics import AnalyticsStore
from chatbot.store.conversations import STATUS_EVENTS, ConversationStore, change_status
from chatbot.store.review import ReviewStore
from chatbot.store.schema import (
    CONVERSATION_STATUSES,
    HANDOFF_STATUSES,
    HUMAN_STATUSES,
    MESSAGE_ROLES,
    PENDING_HANDOFF,
    USER_ROLES,
    Annotation,
    AuthSession,
    Conversation,
    Feedback,
    Handoff,
    Message,
    User,
    as_utc,
    ids_as_str,
)
from chatbot.store.users import UserStore


class Store(ConversationStore, ReviewStore, AnalyticsStore, UserStore):
    """Conversation log store: conversations and messages, handoffs, review, analytics, console users.

    ``Store(url, migrate=True, retries=4)``: see :class:`~chatbot.store.base.StoreBase` (raises
    :class:`~chatbot.errors.StoreError` when the database cannot be opened or migrated).
    """


__all__ = [
    "Annotation", "AuthSession", "Conversation", "Feedback", "Handoff", "Message", "Store", "User", "SQLModel",
    "CONVERSATION_STATUSES", "HANDOFF_STATUSES", "HUMAN_STATUSES", "MESSAGE_ROLES", "PENDING_HANDOFF", "USER_ROLES",
    "STATUS_EVENTS", "as_utc", "change_status", "ids_as_str",
]
