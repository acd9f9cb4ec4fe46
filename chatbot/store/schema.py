"""The store's schema: the tables, their allowed values, and opening a database at the newest migration.

Tables:

* ``conversation``: channel, customer reference, status (``bot`` | ``handoff`` |
  ``human`` | ``closed``), started / updated / ended times.
* ``message``: role (``user`` | ``assistant`` | ``staff``), text as stored
  (redacted), the routing result of a customer message (intent, confidence,
  slots, action), and for a reply the retrieved chunk ids and scores, citations,
  model, engine, adapter and index versions, latency (ms), token counts.
* ``feedback``: a customer's thumbs up (+1) or down (-1) on a reply, comment.
* ``annotation``: a staff member's corrected reply and whether the turn is
  approved for training, by whom.
* ``handoff``: reason, queue, status (``open`` | ``assigned`` | ``returned`` |
  ``closed``), assigned staff member.
* ``app_user``: staff and operators (argon2 password hashes, role).
* ``auth_session``: console sessions (SHA-256 of the cookie token, expiry).

The schema is created and upgraded by the Alembic migrations in :mod:`chatbot.store.migrations`
(:func:`open_engine` runs them; a database made by the pre-migration skeleton is stamped at
its first revision and upgraded). Times are stored in UTC.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import JSON, Column, Index, Text, UniqueConstraint, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Field, SQLModel, create_engine

from chatbot.errors import StoreError
from chatbot.store.migrations import upgrade

#: Conversation statuses: the bot answers only in ``bot``.
CONVERSATION_STATUSES = ("bot", "handoff", "human", "closed")
#: Statuses in which the bot stays silent (a person has, or will take, the conversation).
HUMAN_STATUSES = ("handoff", "human")
MESSAGE_ROLES = ("user", "assistant", "staff")
HANDOFF_STATUSES = ("open", "assigned", "returned", "closed")
#: Handoff statuses of a handoff still waiting for, or being handled by, a person.
PENDING_HANDOFF = ("open", "assigned")
USER_ROLES = ("staff", "operator")


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def as_utc(value: _dt.datetime | None) -> _dt.datetime | None:
    """A stored time as an aware UTC datetime (SQLite returns naive UTC, PostgreSQL aware)."""
    if value is None:
        return None
    return value.replace(tzinfo=_dt.timezone.utc) if value.tzinfo is None else value.astimezone(_dt.timezone.utc)


def ids_as_str(ids: Sequence[int]) -> list[str]:
    """Chunk ids as strings (int64 does not survive JSON in browsers)."""
    return [str(i) for i in ids]


# --------------------------------------------------------------------------------------------- tables


class Conversation(SQLModel, table=True):
    """One customer conversation."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, primary_key=True, max_length=64)
    channel: str = Field(default="api", max_length=32)
    customer_ref: str | None = Field(default=None, max_length=128, index=True,
                                     description="the customer's reference in the embedding site, if given")
    status: str = Field(default="bot", max_length=16, description="bot | handoff | human | closed")
    started_at: _dt.datetime = Field(default_factory=_now, index=True)
    updated_at: _dt.datetime = Field(default_factory=_now)
    ended_at: _dt.datetime | None = Field(default=None)


class Message(SQLModel, table=True):
    """One message of a conversation, with what produced it (for assistant messages)."""

    __table_args__ = (Index("uq_message_request_role", "request_id", "role", unique=True),)

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: str = Field(foreign_key="conversation.id", index=True, max_length=64)
    role: str = Field(max_length=16, description="user | assistant | staff")
    text: str
    created_at: _dt.datetime = Field(default_factory=_now, index=True)
    chunk_ids: list | None = Field(default=None, sa_column=Column(JSON), description="retrieved chunk ids (str)")
    chunk_scores: list | None = Field(default=None, sa_column=Column(JSON))
    citations: list | None = Field(default=None, sa_column=Column(JSON))
    model: str | None = Field(default=None, max_length=256)
    engine: str | None = Field(default=None, max_length=32)
    adapter_version: str | None = Field(default=None, max_length=128)
    index_version: str | None = Field(default=None, max_length=64)
    finish_reason: str | None = Field(default=None, max_length=16)
    latency_ms: float | None = None
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # added by migration 0002
    request_id: str | None = Field(default=None, max_length=64, description="the turn; a retried write is stored once")
    intent: str | None = Field(default=None, max_length=64, index=True, description="routed intent (user messages)")
    confidence: float | None = Field(default=None, description="calibrated intent confidence in [0, 1]")
    slots: list | None = Field(default=None, sa_column=Column(JSON), description="[{type, value, start, end, score}]")
    action: str | None = Field(default=None, max_length=16, description="answer | ask_slot | handoff | clarify | held")
    redactions: dict | None = Field(default=None, sa_column=Column(JSON), description="{kind: count} redacted")
    author_id: int | None = Field(default=None, description="app_user.id of the staff member (staff messages)")
    # added by migration 0003 (verified answers)
    answer_kind: str | None = Field(default=None, max_length=16,
                                    description="generated | verified | extractive | abstained | fixed")
    withheld: list | None = Field(default=None, sa_column=Column(JSON),
                                  description="generated sentences not shown: [{text, reason, claims, overlap}]")


class Feedback(SQLModel, table=True):
    """A customer's rating of one reply (the latest rating of a message wins)."""

    __table_args__ = (UniqueConstraint("message_id", name="uq_feedback_message"),)

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: str = Field(foreign_key="conversation.id", index=True, max_length=64)
    message_id: int = Field(foreign_key="message.id")
    rating: int = Field(description="+1 thumbs up, -1 thumbs down")
    comment: str | None = Field(default=None, sa_column=Column(Text))
    created_at: _dt.datetime = Field(default_factory=_now, index=True)


class Annotation(SQLModel, table=True):
    """Staff review of one reply: a corrected text and approval for training."""

    __table_args__ = (UniqueConstraint("message_id", name="uq_annotation_message"),)

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: str = Field(foreign_key="conversation.id", index=True, max_length=64)
    message_id: int = Field(foreign_key="message.id")
    corrected_text: str | None = Field(default=None, sa_column=Column(Text))
    approved: bool = Field(default=False, index=True)
    author_id: int | None = Field(default=None, foreign_key="app_user.id", description="last editor")
    approved_by_id: int | None = Field(default=None, foreign_key="app_user.id")
    approved_at: _dt.datetime | None = None
    created_at: _dt.datetime = Field(default_factory=_now)
    updated_at: _dt.datetime = Field(default_factory=_now)


class Handoff(SQLModel, table=True):
    """A conversation handed to people: queued, taken by a staff member, handed back or closed."""

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: str = Field(foreign_key="conversation.id", index=True, max_length=64)
    reason: str = Field(max_length=64, description="customer_request | human_request | handoff_intent | ...")
    queue: str = Field(default="default", max_length=32)
    intent: str | None = Field(default=None, max_length=64, description="last routed intent at handoff time")
    status: str = Field(default="open", max_length=16, index=True, description="open | assigned | returned | closed")
    assigned_to_id: int | None = Field(default=None, foreign_key="app_user.id")
    created_at: _dt.datetime = Field(default_factory=_now, index=True)
    assigned_at: _dt.datetime | None = None
    closed_at: _dt.datetime | None = None


class User(SQLModel, table=True):
    """A console user: ``staff`` (review, handoffs) or ``operator`` (also re-index, train, promote)."""

    __tablename__ = "app_user"
    __table_args__ = (UniqueConstraint("username", name="uq_app_user_username"),)

    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(max_length=64)
    password_hash: str = Field(max_length=255)
    role: str = Field(default="staff", max_length=16, description="staff | operator")
    active: bool = True
    created_at: _dt.datetime = Field(default_factory=_now)
    last_login_at: _dt.datetime | None = None


class AuthSession(SQLModel, table=True):
    """A console login session; the cookie holds the token, the table only its SHA-256."""

    __tablename__ = "auth_session"

    token_hash: str = Field(primary_key=True, max_length=64)
    user_id: int = Field(foreign_key="app_user.id", index=True)
    created_at: _dt.datetime = Field(default_factory=_now)
    expires_at: _dt.datetime = Field(index=True)


# --------------------------------------------------------------------------------------------- opening


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill, fast commits
    cur.close()


def open_engine(url: str, migrate: bool = True) -> Engine:
    """An engine on ``url``, the schema brought to the newest migration (``migrate``).

    SQLite: the folder is created; WAL journal, a 10 s busy timeout, foreign keys on. PostgreSQL:
    sessions in UTC, a pool of 10 (+20 overflow).

    Raises:
        StoreError: the database cannot be opened or migrated.
    """
    kwargs: dict = {}
    is_sqlite = url.startswith("sqlite")
    if is_sqlite:
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot open the store at {url!r}: {exc}") from exc
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
    elif url.startswith("postgresql"):
        kwargs["connect_args"] = {"options": "-c timezone=UTC"}
        kwargs.update(pool_size=10, max_overflow=20)
    try:
        engine = create_engine(url, pool_pre_ping=True, **kwargs)
        if is_sqlite:
            event.listen(engine, "connect", _sqlite_pragmas)
        if migrate:
            upgrade(engine)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot open the store at {url!r}: {exc}") from exc
    return engine


__all__ = [
    "Annotation", "AuthSession", "Conversation", "Feedback", "Handoff", "Message", "User", "SQLModel",
    "CONVERSATION_STATUSES", "HANDOFF_STATUSES", "HUMAN_STATUSES", "MESSAGE_ROLES", "PENDING_HANDOFF", "USER_ROLES",
    "as_utc", "ids_as_str", "open_engine",
]
