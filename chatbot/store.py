"""The conversation log store (SQLModel): the only module that touches the database.

SQLite by default (WAL journal, busy timeout) and PostgreSQL by URL
(``CHATBOT_DATABASE_URL=postgresql+psycopg://...``). A turn (the customer's
message and the assistant's reply) is written in one transaction, so a failed
turn leaves nothing half-written.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import JSON, Column, event
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, create_engine, select

from chatbot.errors import NotFoundError, StoreError


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


class Conversation(SQLModel, table=True):
    """One customer conversation."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, primary_key=True, max_length=64)
    channel: str = Field(default="api", max_length=32)
    status: str = Field(default="bot", max_length=16, description="bot | handoff | human | closed")
    started_at: _dt.datetime = Field(default_factory=_now, index=True)
    updated_at: _dt.datetime = Field(default_factory=_now)


class Message(SQLModel, table=True):
    """One message of a conversation, with what produced it (for assistant messages)."""

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


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Store:
    """Conversation log store.

    Args:
        url: SQLAlchemy URL (``sqlite:///path.db`` or ``postgresql+psycopg://...``).

    Raises:
        StoreError: the database cannot be opened or its tables created.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict = {}
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
        try:
            self.engine = create_engine(url, pool_pre_ping=True, **kwargs)
            if url.startswith("sqlite"):
                event.listen(self.engine, "connect", _sqlite_pragmas)
            SQLModel.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the store at {url!r}: {exc}") from exc

    def session(self) -> Session:
        """A new session (objects stay readable after commit)."""
        return Session(self.engine, expire_on_commit=False)

    def get_conversation(self, conversation_id: str) -> Conversation:
        """Return the conversation.

        Raises:
            NotFoundError: no conversation has this id.
        """
        with self.session() as s:
            conv = s.get(Conversation, conversation_id)
        if conv is None:
            raise NotFoundError(f"conversation_id {conversation_id!r} does not exist")
        return conv

    def history(self, conversation_id: str, limit: int) -> list[Message]:
        """The last ``limit`` user/assistant messages of a conversation, oldest first."""
        if limit <= 0:
            return []
        with self.session() as s:
            rows = s.exec(
                select(Message)
                .where(Message.conversation_id == conversation_id, Message.role.in_(["user", "assistant"]))
                .order_by(Message.id.desc())
                .limit(limit)
            ).all()
        return list(reversed(rows))

    def messages(self, conversation_id: str) -> list[Message]:
        """All messages of a conversation in order."""
        with self.session() as s:
            return list(
                s.exec(select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id)).all()
            )

    def record_turn(
        self,
        conversation_id: str,
        user_text: str,
        reply: Message,
        channel: str = "api",
        new: bool = False,
    ) -> tuple[Conversation, Message, Message]:
        """Store the customer's message and the reply in one transaction.

        Args:
            conversation_id: the conversation (created here when ``new``).
            user_text: the customer's message as stored.
            reply: the assistant message (``conversation_id`` is filled in here).
            channel: channel of a new conversation (``api``, ``web``, ``cli``).
            new: create the conversation with this id.

        Returns:
            (conversation, user message, assistant message) as committed.

        Raises:
            NotFoundError: ``conversation_id`` does not exist.
            StoreError: the write failed (nothing was written).
        """
        try:
            with self.session() as s:
                if new:
                    conv = Conversation(id=conversation_id, channel=channel)
                    s.add(conv)
                else:
                    conv = s.get(Conversation, conversation_id)
                    if conv is None:
                        raise NotFoundError(f"conversation_id {conversation_id!r} does not exist")
                    conv.updated_at = _now()
                    s.add(conv)
                s.flush()
                user = Message(conversation_id=conv.id, role="user", text=user_text)
                reply.conversation_id = conv.id
                s.add(user)
                s.flush()
                s.add(reply)
                s.commit()
                return conv, user, reply
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot store the turn: {exc}") from exc

    def count(self, model: type[SQLModel]) -> int:
        """Rows in the table of ``model``."""
        from sqlalchemy import func

        with self.session() as s:
            return int(s.exec(select(func.count()).select_from(model)).one())

    def close(self) -> None:
        """Dispose of the connection pool."""
        self.engine.dispose()


def ids_as_str(ids: Sequence[int]) -> list[str]:
    """Chunk ids as strings (int64 does not survive JSON in browsers)."""
    return [str(i) for i in ids]
