"""The conversation log store (SQLModel): the only module that touches the database.

SQLite by default (WAL journal, busy timeout) and PostgreSQL by URL
(``CHATBOT_DATABASE_URL=postgresql+psycopg://...``). The schema is created and
upgraded by the Alembic migrations in :mod:`chatbot.migrations` (``Store`` runs
them on open; a database made by the pre-migration skeleton is stamped at its
first revision and upgraded).

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

Writes: a customer's message is written as soon as the turn is accepted and the
reply only once it is complete, each in its own transaction, so a customer
message is never lost and a reply is never half-written. Message writes carry
the turn's ``request_id``, so a retried write is stored once.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from sqlalchemy import JSON, Column, Index, Text, UniqueConstraint, event, func
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, create_engine, select

from chatbot.errors import InvalidInputError, NotFoundError, StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Conversation statuses: the bot answers only in ``bot``.
CONVERSATION_STATUSES = ("bot", "handoff", "human", "closed")
#: Statuses in which the bot stays silent (a person has, or will take, the conversation).
HUMAN_STATUSES = ("handoff", "human")
MESSAGE_ROLES = ("user", "assistant", "staff")
HANDOFF_STATUSES = ("open", "assigned", "returned", "closed")
USER_ROLES = ("staff", "operator")


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _conversation(s: Session, conversation_id: str, lock: bool = False) -> Conversation:
    """The conversation row in session ``s``; ``lock``: ``SELECT ... FOR UPDATE`` (PostgreSQL), so handoff
    changes of one conversation made by several server processes at once run one after the other.

    Raises:
        NotFoundError: unknown ``conversation_id``.
    """
    conv = s.get(Conversation, conversation_id, with_for_update=lock)
    if conv is None:
        raise NotFoundError(f"conversation_id {conversation_id!r} does not exist")
    return conv


def as_utc(value: _dt.datetime | None) -> _dt.datetime | None:
    """A stored time as an aware UTC datetime (SQLite returns naive UTC, PostgreSQL aware)."""
    if value is None:
        return None
    return value.replace(tzinfo=_dt.timezone.utc) if value.tzinfo is None else value.astimezone(_dt.timezone.utc)


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


# --------------------------------------------------------------------------------------------- engine


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill, fast commits
    cur.close()


def _is_transient(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return isinstance(exc, OperationalError) and any(
        s in msg for s in ("database is locked", "database is busy", "could not serialize", "deadlock detected",
                           "server closed the connection", "connection refused", "terminating connection")
    )


def _approved_ids():
    """Subquery: conversation ids with a reply approved for training."""
    return select(Annotation.conversation_id).where(Annotation.approved == True)  # noqa: E712


def _escape_like(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class Store:
    """Conversation log store.

    Args:
        url: SQLAlchemy URL (``sqlite:///path.db`` or ``postgresql+psycopg://...``).
        migrate: bring the schema to the newest migration on open (default).
        retries: attempts of a write that fails transiently (locked database, dropped connection).

    Raises:
        StoreError: the database cannot be opened or migrated.
    """

    def __init__(self, url: str, migrate: bool = True, retries: int = 4) -> None:
        self.url = url
        self.retries = max(1, retries)
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict = {}
        if self.is_sqlite:
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
            self.engine = create_engine(url, pool_pre_ping=True, **kwargs)
            if self.is_sqlite:
                event.listen(self.engine, "connect", _sqlite_pragmas)
            if migrate:
                from chatbot.migrations import upgrade

                upgrade(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the store at {url!r}: {exc}") from exc

    # ------------------------------------------------------------------ plumbing

    def session(self) -> Session:
        """A new session (objects stay readable after commit)."""
        return Session(self.engine, expire_on_commit=False)

    def _write(self, what: str, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` in a transaction, committing; retry transient failures with backoff.

        Raises:
            StoreError: the write failed (nothing of it was committed).
        """
        delay = 0.05
        for attempt in range(1, self.retries + 1):
            try:
                with self.session() as s:
                    out = fn(s)
                    s.commit()
                    return out
            except (NotFoundError, InvalidInputError):
                raise
            except SQLAlchemyError as exc:
                if attempt < self.retries and _is_transient(exc):
                    log.warning("store: %s failed (%s); retry %d", what, type(exc).__name__, attempt)
                    time.sleep(delay)
                    delay *= 4
                    continue
                raise StoreError(f"cannot {what}: {exc}") from exc
        raise AssertionError("unreachable")

    def _read(self, what: str, fn: Callable[[Session], T]) -> T:
        try:
            with self.session() as s:
                return fn(s)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot {what}: {exc}") from exc

    def count(self, model: type[SQLModel]) -> int:
        """Rows in the table of ``model``."""
        return self._read("count", lambda s: int(s.exec(select(func.count()).select_from(model)).one()))

    def integrity_check(self) -> str:
        """``"ok"`` when the database is consistent (SQLite ``PRAGMA integrity_check``; PostgreSQL: a
        read of every table), else the problems found."""
        with self.engine.connect() as c:
            if self.is_sqlite:
                rows = c.exec_driver_sql("PRAGMA integrity_check").fetchall()
                fk = c.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                out = "; ".join(str(r[0]) for r in rows)
                return out if not fk else f"{out}; foreign key violations: {fk[:5]}"
            for t in SQLModel.metadata.sorted_tables:
                c.execute(select(func.count()).select_from(t))
            return "ok"

    def close(self) -> None:
        """Dispose of the connection pool."""
        self.engine.dispose()

    # ------------------------------------------------------------------ conversations and messages

    def get_conversation(self, conversation_id: str) -> Conversation:
        """Return the conversation.

        Raises:
            NotFoundError: no conversation has this id.
        """
        conv = self._read("read the conversation", lambda s: s.get(Conversation, conversation_id))
        if conv is None:
            raise NotFoundError(f"conversation_id {conversation_id!r} does not exist")
        return conv

    def create_conversation(self, conversation_id: str | None = None, channel: str = "api",
                            customer_ref: str | None = None) -> Conversation:
        """Create a conversation (a new id when ``conversation_id`` is None); an existing one is returned as is."""
        cid = conversation_id or uuid.uuid4().hex

        def fn(s: Session) -> Conversation:
            conv = s.get(Conversation, cid)
            if conv is None:
                conv = Conversation(id=cid, channel=channel, customer_ref=customer_ref)
                s.add(conv)
                s.flush()
            return conv

        return self._write("create the conversation", fn)

    def history(self, conversation_id: str, limit: int) -> list[Message]:
        """The last ``limit`` user/assistant messages of a conversation, oldest first."""
        if limit <= 0:
            return []
        rows = self._read("read the history", lambda s: s.exec(
            select(Message)
            .where(Message.conversation_id == conversation_id, Message.role.in_(["user", "assistant"]))
            .order_by(Message.id.desc())
            .limit(limit)
        ).all())
        return list(reversed(rows))

    def messages(self, conversation_id: str) -> list[Message]:
        """All messages of a conversation in order."""
        return self._read("read the messages", lambda s: list(
            s.exec(select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id)).all()
        ))

    def messages_after(self, conversation_id: str, after_id: int = 0,
                       roles: Sequence[str] = MESSAGE_ROLES) -> list[Message]:
        """Messages of a conversation with ``id > after_id`` and a role in ``roles``, in order (for polling)."""
        return self._read("read new messages", lambda s: list(s.exec(
            select(Message)
            .where(Message.conversation_id == conversation_id, Message.id > after_id, Message.role.in_(list(roles)))
            .order_by(Message.id)
        ).all()))

    def add_message(self, message: Message, create: bool = False, channel: str = "api",
                    customer_ref: str | None = None) -> Message:
        """Store one message (its own transaction).

        A message with a ``request_id`` already stored for the same role is not stored
        again: the stored one is returned (so retried writes are stored exactly once).
        A customer message to a ``closed`` conversation reopens it (status ``bot``).

        Args:
            message: the message (``conversation_id`` set).
            create: create the conversation when it does not exist (``channel``, ``customer_ref``).

        Raises:
            InvalidInputError: unknown role.
            NotFoundError: the conversation does not exist and ``create`` is False.
            StoreError: the write failed.
        """
        if message.role not in MESSAGE_ROLES:
            raise InvalidInputError(f"message role must be one of {MESSAGE_ROLES}, got {message.role!r}")

        def fn(s: Session) -> Message:
            if message.request_id:
                old = s.exec(select(Message).where(Message.request_id == message.request_id,
                                                   Message.role == message.role)).first()
                if old is not None:
                    return old
            conv = s.get(Conversation, message.conversation_id)
            if conv is None:
                if not create:
                    raise NotFoundError(f"conversation_id {message.conversation_id!r} does not exist")
                conv = Conversation(id=message.conversation_id, channel=channel, customer_ref=customer_ref)
                s.add(conv)
                s.flush()
            conv.updated_at = _now()
            if message.role == "user" and conv.status == "closed":
                conv.status, conv.ended_at = "bot", None
            s.add(conv)
            row = Message.model_validate(message.model_dump())
            s.add(row)
            s.flush()
            return row

        try:
            return self._write("store the message", fn)
        except StoreError as exc:
            if isinstance(exc.__cause__, IntegrityError) and message.request_id:
                # a concurrent retry stored it first
                found = self._read("read the message", lambda s: s.exec(select(Message).where(
                    Message.request_id == message.request_id, Message.role == message.role)).first())
                if found is not None:
                    return found
            raise

    def record_turn(
        self,
        conversation_id: str,
        user_text: str,
        reply: Message,
        channel: str = "api",
        new: bool = False,
    ) -> tuple[Conversation, Message, Message]:
        """Store the customer's message and the reply in one transaction (batch imports, tests).

        The service stores the two separately (:meth:`add_message`): the customer's
        message when the turn is accepted, the reply when it is complete.

        Raises:
            NotFoundError: ``conversation_id`` does not exist (and not ``new``).
            StoreError: the write failed (nothing was written).
        """

        def fn(s: Session):
            if new:
                conv = Conversation(id=conversation_id, channel=channel)
            else:
                conv = _conversation(s, conversation_id)
                conv.updated_at = _now()
            s.add(conv)
            s.flush()
            user = Message(conversation_id=conv.id, role="user", text=user_text)
            reply.conversation_id = conv.id
            s.add(user)
            s.flush()
            s.add(reply)
            s.flush()
            return conv, user, reply

        return self._write("store the turn", fn)

    # ------------------------------------------------------------------ feedback and annotations

    def add_feedback(self, conversation_id: str, message_id: int, rating: int | None,
                     comment: str | None = None) -> Feedback | None:
        """Record (or replace) the customer's rating of a reply; ``rating=None`` removes it.

        Args:
            conversation_id: must be the message's conversation (a customer can rate only
                replies of a conversation whose id they hold).
            message_id: an assistant or staff message.
            rating: +1 (thumbs up), -1 (thumbs down) or None.

        Raises:
            InvalidInputError: a rating other than +1, -1 or None; a customer message.
            NotFoundError: no such message in that conversation.
        """
        if rating not in (1, -1, None):
            raise InvalidInputError(f"rating must be 1 (up) or -1 (down), got {rating!r}")
        if comment is not None and len(comment) > 4000:
            raise InvalidInputError(f"comment must be at most 4000 characters, got {len(comment)}")

        def fn(s: Session) -> Feedback | None:
            msg = s.get(Message, message_id, with_for_update=True)  # one reply's ratings take turns: one row
            if msg is None or msg.conversation_id != conversation_id:
                raise NotFoundError(f"message_id {message_id!r} does not exist in conversation {conversation_id!r}")
            if msg.role == "user":
                raise InvalidInputError(f"message_id {message_id} is a customer message; only replies can be rated")
            fb = s.exec(select(Feedback).where(Feedback.message_id == message_id)).first()
            if rating is None:
                if fb is not None:
                    s.delete(fb)
                return None
            if fb is None:
                fb = Feedback(conversation_id=conversation_id, message_id=message_id, rating=rating, comment=comment)
            else:
                fb.rating, fb.created_at = rating, _now()
                if comment is not None:
                    fb.comment = comment
            s.add(fb)
            s.flush()
            return fb

        return self._write("store the feedback", fn)

    def annotate(self, message_id: int, user_id: int | None, corrected_text: str | None = None,
                 approved: bool | None = None) -> Annotation:
        """Set a reply's corrected text and/or its approval for training (one annotation per reply).

        Args:
            message_id: an assistant or staff message.
            user_id: the staff member (recorded as author, and as approver when approving).
            corrected_text: the reply as it should have been (stored as given; ``""`` clears it).
            approved: approve (True) or withdraw (False) the turn for training; None leaves it.

        Raises:
            NotFoundError: no such message.
            InvalidInputError: a customer message.
        """

        def fn(s: Session) -> Annotation:
            msg = s.get(Message, message_id, with_for_update=True)  # one reply's annotations take turns: one row
            if msg is None:
                raise NotFoundError(f"message_id {message_id!r} does not exist")
            if msg.role == "user":
                raise InvalidInputError(f"message_id {message_id} is a customer message; annotate replies only")
            ann = s.exec(select(Annotation).where(Annotation.message_id == message_id)).first()
            if ann is None:
                ann = Annotation(conversation_id=msg.conversation_id, message_id=message_id)
            if corrected_text is not None:
                ann.corrected_text = corrected_text.strip() or None
            if approved is not None:
                ann.approved = approved
                ann.approved_by_id = user_id if approved else None
                ann.approved_at = _now() if approved else None
            ann.author_id = user_id
            ann.updated_at = _now()
            s.add(ann)
            s.flush()
            return ann

        return self._write("store the annotation", fn)

    # ------------------------------------------------------------------ handoff

    def request_handoff(self, conversation_id: str | None, reason: str, queue: str = "default",
                        channel: str = "web", customer_ref: str | None = None, intent: str | None = None) -> Handoff:
        """Move a conversation to the handoff queue (status ``handoff``); idempotent while one is pending.

        Args:
            conversation_id: the conversation, or None to open a new one (a customer asking
                for a person before writing anything).
            reason: why (``customer_request``, ``human_request``, ``handoff_intent``, ...).
            queue: the staff queue.
            intent: the routed intent to show in the queue (default: the last routed customer message's).

        Returns:
            The open (or already pending) handoff.

        Raises:
            NotFoundError: unknown ``conversation_id``.
            InvalidInputError: empty ``reason``.
        """
        if not reason or len(reason) > 64:
            raise InvalidInputError(f"reason must be 1..64 characters, got {reason!r}")

        def fn(s: Session) -> Handoff:
            if conversation_id is None:
                conv = Conversation(channel=channel, customer_ref=customer_ref)
                s.add(conv)
                s.flush()
            else:
                conv = _conversation(s, conversation_id, lock=True)
            pending = s.exec(select(Handoff).where(Handoff.conversation_id == conv.id,
                                                   Handoff.status.in_(["open", "assigned"]))).first()
            if pending is not None:
                return pending
            routed = intent or s.exec(select(Message.intent).where(Message.conversation_id == conv.id, Message.role == "user",
                                                         Message.intent.is_not(None))
                            .order_by(Message.id.desc()).limit(1)).first()
            h = Handoff(conversation_id=conv.id, reason=reason, queue=queue, intent=routed)
            conv.status, conv.updated_at, conv.ended_at = "handoff", _now(), None
            s.add(conv)
            s.add(h)
            s.flush()
            return h

        return self._write("queue the handoff", fn)

    def handoff_queue(self, statuses: Sequence[str] = ("open", "assigned"), limit: int = 200) -> list[dict]:
        """Pending handoffs, oldest first: ``{id, conversation_id, reason, queue, intent, status,
        assigned_to, created_at, preview}`` (``preview``: the customer's last message)."""

        def fn(s: Session) -> list[dict]:
            rows = s.exec(select(Handoff).where(Handoff.status.in_(list(statuses)))
                          .order_by(Handoff.created_at).limit(limit)).all()
            users = {u.id: u.username for u in s.exec(select(User)).all()}
            out = []
            for h in rows:
                last = s.exec(select(Message.text).where(Message.conversation_id == h.conversation_id,
                                                         Message.role == "user")
                              .order_by(Message.id.desc()).limit(1)).first()
                out.append({"id": h.id, "conversation_id": h.conversation_id, "reason": h.reason, "queue": h.queue,
                            "intent": h.intent, "status": h.status,
                            "assigned_to": users.get(h.assigned_to_id) if h.assigned_to_id else None,
                            "created_at": as_utc(h.created_at), "preview": (last or "")[:200]})
            return out

        return self._read("read the handoff queue", fn)

    def _pending_handoff(self, s: Session, conversation_id: str) -> Handoff | None:
        return s.exec(select(Handoff).where(Handoff.conversation_id == conversation_id,
                                            Handoff.status.in_(["open", "assigned"]))
                      .order_by(Handoff.id.desc())).first()

    def take_handoff(self, conversation_id: str, user_id: int) -> Handoff:
        """A staff member takes the conversation (status ``human``; a handoff is opened when none is pending).

        Raises:
            NotFoundError: unknown conversation or user.
        """

        def fn(s: Session) -> Handoff:
            conv = _conversation(s, conversation_id, lock=True)
            if s.get(User, user_id) is None:
                raise NotFoundError(f"user id {user_id!r} does not exist")
            h = self._pending_handoff(s, conversation_id)
            if h is None:
                h = Handoff(conversation_id=conversation_id, reason="staff_takeover")
            h.status, h.assigned_to_id, h.assigned_at = "assigned", user_id, _now()
            conv.status, conv.updated_at, conv.ended_at = "human", _now(), None
            s.add(h)
            s.add(conv)
            s.flush()
            return h

        return self._write("take the handoff", fn)

    def staff_reply(self, conversation_id: str, user_id: int, text: str,
                    redactions: dict | None = None) -> Message:
        """Store a staff member's reply (role ``staff``); takes the conversation if nobody has.

        Args:
            text: the reply as stored (redact it first when redaction is on).

        Raises:
            InvalidInputError: empty text.
            NotFoundError: unknown conversation.
        """
        if not text or not text.strip():
            raise InvalidInputError("staff reply text must not be empty")

        def fn(s: Session) -> Message:
            conv = _conversation(s, conversation_id, lock=True)
            if conv.status != "human":
                h = self._pending_handoff(s, conversation_id) or Handoff(conversation_id=conversation_id,
                                                                         reason="staff_takeover")
                h.status, h.assigned_to_id, h.assigned_at = "assigned", user_id, _now()
                s.add(h)
                conv.status, conv.ended_at = "human", None
            conv.updated_at = _now()
            s.add(conv)
            m = Message(conversation_id=conversation_id, role="staff", text=text.strip(), author_id=user_id,
                        redactions=redactions or None)
            s.add(m)
            s.flush()
            return m

        return self._write("store the staff reply", fn)

    def release_handoff(self, conversation_id: str, close: bool = False) -> Conversation:
        """End the human part: hand the conversation back to the bot (status ``bot``, handoff
        ``returned``) or close it (``closed``, handoff ``closed``).

        Raises:
            NotFoundError: unknown conversation.
        """

        def fn(s: Session) -> Conversation:
            conv = _conversation(s, conversation_id, lock=True)
            for h in s.exec(select(Handoff).where(Handoff.conversation_id == conversation_id,
                                                  Handoff.status.in_(["open", "assigned"]))).all():
                h.status, h.closed_at = ("closed" if close else "returned"), _now()
                s.add(h)
            conv.status = "closed" if close else "bot"
            conv.ended_at = _now() if close else None
            conv.updated_at = _now()
            s.add(conv)
            s.flush()
            return conv

        return self._write("close the handoff" if close else "hand the conversation back", fn)

    # ------------------------------------------------------------------ review (console)

    def search_conversations(
        self,
        text: str | None = None,
        since: _dt.datetime | None = None,
        until: _dt.datetime | None = None,
        intent: str | None = None,
        status: str | None = None,
        feedback: str | None = None,
        limit: int = 100,
        offset: int = 0,
        approved: bool | None = None,
    ) -> list[dict]:
        """Conversations matching every given filter, newest first.

        Args:
            text: a substring of any message (case-insensitive, taken literally: ``%`` and ``_`` are
                no wildcards). A text with a NUL character matches nothing: no stored message holds
                one (PostgreSQL text cannot, and SQLite's LIKE would cut the pattern there and match all).
            since, until: ``started_at`` bounds (inclusive, exclusive).
            intent: a routed intent of one of its customer messages (one with a NUL matches nothing).
            status: ``bot`` | ``handoff`` | ``human`` | ``closed``.
            feedback: ``up`` / ``down`` (has such a rating), ``any`` or ``none``.
            limit, offset: paging.
            approved: True: only conversations with a reply approved for training; False: only those without;
                None: both.

        Returns:
            ``[{id, started_at, status, channel, customer_ref, messages, intents, up, down, approved, preview}]``
            (``approved``: the number of its replies approved for training).

        Raises:
            InvalidInputError: an unknown ``status`` or ``feedback`` value, or limit < 1.
        """
        if status and status not in CONVERSATION_STATUSES:
            raise InvalidInputError(f"status must be one of {CONVERSATION_STATUSES}, got {status!r}")
        if feedback and feedback not in ("up", "down", "any", "none"):
            raise InvalidInputError(f"feedback must be one of up, down, any, none, got {feedback!r}")
        if limit < 1:
            raise InvalidInputError(f"limit must be >= 1, got {limit}")

        if (text and "\x00" in text) or (intent and "\x00" in intent):
            return []

        def fn(s: Session) -> list[dict]:
            q = select(Conversation)
            if since is not None:
                q = q.where(Conversation.started_at >= since)
            if until is not None:
                q = q.where(Conversation.started_at < until)
            if status:
                q = q.where(Conversation.status == status)
            if text:
                sub = select(Message.conversation_id).where(
                    func.lower(Message.text).like(f"%{_escape_like(text.lower())}%", escape="\\"))
                q = q.where(Conversation.id.in_(sub))
            if intent:
                q = q.where(Conversation.id.in_(select(Message.conversation_id).where(Message.intent == intent)))
            if feedback in ("up", "down"):
                q = q.where(Conversation.id.in_(select(Feedback.conversation_id)
                                                .where(Feedback.rating == (1 if feedback == "up" else -1))))
            elif feedback == "any":
                q = q.where(Conversation.id.in_(select(Feedback.conversation_id)))
            elif feedback == "none":
                q = q.where(Conversation.id.not_in(select(Feedback.conversation_id)))
            if approved is not None:
                has = Conversation.id.in_(_approved_ids())
                q = q.where(has if approved else ~has)
            convs = s.exec(q.order_by(Conversation.started_at.desc(), Conversation.id).offset(offset)
                           .limit(limit)).all()
            ids = [c.id for c in convs]
            if not ids:
                return []
            msgs = s.exec(select(Message.conversation_id, Message.role, Message.text, Message.intent)
                          .where(Message.conversation_id.in_(ids)).order_by(Message.id)).all()
            fbs = s.exec(select(Feedback.conversation_id, Feedback.rating)
                         .where(Feedback.conversation_id.in_(ids))).all()
            stats: dict[str, dict] = {i: {"messages": 0, "intents": [], "preview": "", "up": 0, "down": 0,
                                          "approved": 0} for i in ids}
            for cid in s.exec(_approved_ids().where(Annotation.conversation_id.in_(ids))).all():
                stats[cid]["approved"] += 1
            for cid, role, txt, it in msgs:
                st = stats[cid]
                st["messages"] += 1
                if role == "user" and not st["preview"]:
                    st["preview"] = txt[:160]
                if it and it not in st["intents"]:
                    st["intents"].append(it)
            for cid, rating in fbs:
                stats[cid]["up" if rating > 0 else "down"] += 1
            return [{"id": c.id, "started_at": as_utc(c.started_at), "status": c.status, "channel": c.channel,
                     "customer_ref": c.customer_ref, **stats[c.id]} for c in convs]

        return self._read("search the conversations", fn)

    def transcript(self, conversation_id: str) -> dict:
        """A conversation for review: ``{conversation, messages: [{id, role, text, created_at, intent,
        confidence, slots, action, citations, chunk_ids, chunk_scores, adapter_version, index_version,
        latency_ms, prompt_tokens, completion_tokens, author, feedback: {rating, comment} | None,
        annotation: {corrected_text, approved, author, approved_by} | None}], handoffs: [...]}``.

        Raises:
            NotFoundError: unknown conversation.
        """

        def fn(s: Session) -> dict:
            conv = _conversation(s, conversation_id)
            msgs = s.exec(select(Message).where(Message.conversation_id == conversation_id)
                          .order_by(Message.id)).all()
            fbs = {f.message_id: f for f in s.exec(select(Feedback).where(
                Feedback.conversation_id == conversation_id)).all()}
            anns = {a.message_id: a for a in s.exec(select(Annotation).where(
                Annotation.conversation_id == conversation_id)).all()}
            hs = s.exec(select(Handoff).where(Handoff.conversation_id == conversation_id).order_by(Handoff.id)).all()
            users = {u.id: u.username for u in s.exec(select(User)).all()}
            out = []
            for m in msgs:
                d = m.model_dump()
                d["created_at"] = as_utc(m.created_at)
                d["author"] = users.get(m.author_id) if m.author_id else None
                f = fbs.get(m.id)
                d["feedback"] = {"rating": f.rating, "comment": f.comment} if f else None
                a = anns.get(m.id)
                d["annotation"] = ({"corrected_text": a.corrected_text, "approved": a.approved,
                                    "author": users.get(a.author_id), "approved_by": users.get(a.approved_by_id)}
                                   if a else None)
                out.append(d)
            handoffs = [{**h.model_dump(), "assigned_to": users.get(h.assigned_to_id)} for h in hs]
            return {"conversation": conv.model_dump(), "messages": out, "handoffs": handoffs}

        return self._read("read the transcript", fn)

    def approved_conversation_ids(self) -> list[str]:
        """Ids of the conversations with at least one reply approved for training, oldest first."""

        def fn(s: Session) -> list[str]:
            return list(s.exec(select(Conversation.id).where(Conversation.id.in_(_approved_ids()))
                               .order_by(Conversation.started_at, Conversation.id)).all())

        return self._read("list the approved conversations", fn)

    def sft_examples(self, conversation_ids: Sequence[str] | None = None, approved_only: bool = False,
                     system_prompt: str | None = None) -> list[dict]:
        """Conversations as chat-SFT examples ``{"id", "messages": [{"role", "content"}, ...]}``.

        Customer messages become ``user``; bot and staff replies ``assistant``, with a
        staff correction (annotation) in place of the original; consecutive messages
        of one side are joined with a newline; an example starts with a customer
        message and ends with a reply. ``approved_only``: only conversations with an
        approved reply, cut after the last approved one.

        Args:
            conversation_ids: these conversations (in this order); None for all.
            approved_only: see above.
            system_prompt: a system message to put first.
        """

        def fn(s: Session) -> list[dict]:
            if conversation_ids is None:
                ids = list(s.exec(select(Conversation.id).order_by(Conversation.started_at)).all())
            else:
                ids = list(dict.fromkeys(conversation_ids))
            if not ids:
                return []
            anns: dict[int, Annotation] = {}
            for a in s.exec(select(Annotation).where(Annotation.conversation_id.in_(ids))).all():
                anns[a.message_id] = a
            by_conv: dict[str, list[Message]] = {i: [] for i in ids}
            for m in s.exec(select(Message).where(Message.conversation_id.in_(ids)).order_by(Message.id)).all():
                by_conv[m.conversation_id].append(m)
            examples = []
            for cid in ids:
                msgs = by_conv.get(cid) or []
                if approved_only:
                    last = max((i for i, m in enumerate(msgs) if m.id in anns and anns[m.id].approved), default=None)
                    if last is None:
                        continue
                    msgs = msgs[: last + 1]
                out: list[dict] = [{"role": "system", "content": system_prompt}] if system_prompt else []
                for m in msgs:
                    role = "user" if m.role == "user" else "assistant"
                    a = anns.get(m.id)
                    content = (a.corrected_text if a is not None and a.corrected_text else m.text or "").strip()
                    if not content or (role == "assistant" and not any(x["role"] == "user" for x in out)):
                        continue
                    if out and out[-1]["role"] == role:
                        out[-1]["content"] += "\n" + content
                    else:
                        out.append({"role": role, "content": content})
                while out and out[-1]["role"] != "assistant":
                    out.pop()
                if any(x["role"] == "assistant" for x in out):
                    examples.append({"id": f"store:{cid}", "messages": out})
            return examples

        return self._read("export the conversations", fn)

    def export_rows(self, conversation_ids: Sequence[str]) -> list[dict]:
        """One row per message of these conversations (for CSV): conversation_id, message_id,
        created_at (ISO, UTC), role, text, corrected_text, approved, intent, confidence, rating,
        comment, cited_docs (``;``-joined doc ids)."""

        def fn(s: Session) -> list[dict]:
            ids = list(dict.fromkeys(conversation_ids))
            if not ids:
                return []
            anns = {a.message_id: a for a in s.exec(select(Annotation).where(Annotation.conversation_id.in_(ids)))}
            fbs = {f.message_id: f for f in s.exec(select(Feedback).where(Feedback.conversation_id.in_(ids)))}
            order = {cid: i for i, cid in enumerate(ids)}
            msgs = sorted(s.exec(select(Message).where(Message.conversation_id.in_(ids))).all(),
                          key=lambda m: (order[m.conversation_id], m.id))
            rows = []
            for m in msgs:
                a, f = anns.get(m.id), fbs.get(m.id)
                rows.append({
                    "conversation_id": m.conversation_id, "message_id": m.id,
                    "created_at": as_utc(m.created_at).isoformat(), "role": m.role, "text": m.text,
                    "corrected_text": a.corrected_text if a else "", "approved": bool(a and a.approved),
                    "intent": m.intent or "", "confidence": "" if m.confidence is None else round(m.confidence, 4),
                    "rating": f.rating if f else "", "comment": (f.comment or "") if f else "",
                    "cited_docs": ";".join(c.get("doc_id", "") for c in (m.citations or [])),
                })
            return rows

        return self._read("export the conversations", fn)

    def analytics(self, since: _dt.datetime | None = None, until: _dt.datetime | None = None,
                  top: int = 10) -> dict:
        """Figures for the operator's analytics page over conversations started in [since, until).

        Returns:
            ``{"per_day": [{"day": "YYYY-MM-DD", "conversations", "handoffs", "up", "down"}],
            "conversations", "handed_off", "deflection" (share of conversations with a customer
            message and no handoff; None without any), "handoff_by_intent": [{"intent",
            "conversations", "handoffs", "rate"}], "thumbs_up", "thumbs_down", "thumbs_up_rate"
            (None without ratings), "unanswered": [{"question", "count"}]}``: ``unanswered``
            are the customer messages most often answered without any retrieved passage.
        """

        def fn(s: Session) -> dict:
            cq = select(Conversation.id, Conversation.started_at)
            if since is not None:
                cq = cq.where(Conversation.started_at >= since)
            if until is not None:
                cq = cq.where(Conversation.started_at < until)
            convs = {cid: as_utc(t) for cid, t in s.exec(cq).all()}
            ids = list(convs)
            per_day: dict[str, dict] = {}

            def day(cid: str) -> dict:
                d = convs[cid].date().isoformat()
                return per_day.setdefault(d, {"day": d, "conversations": 0, "handoffs": 0, "up": 0, "down": 0})

            for cid in ids:
                day(cid)["conversations"] += 1
            if not ids:
                return {"per_day": [], "conversations": 0, "handed_off": 0, "deflection": None,
                        "handoff_by_intent": [], "thumbs_up": 0, "thumbs_down": 0, "thumbs_up_rate": None,
                        "unanswered": []}
            with_user: set[str] = set()
            intents_of: dict[str, set[str]] = {}
            unanswered: Counter = Counter()
            display: dict[str, str] = {}
            last_user: dict[str, Message] = {}
            for chunk in _chunks(ids, 500):
                for m in s.exec(select(Message).where(Message.conversation_id.in_(chunk))
                                .order_by(Message.id)).all():
                    if m.role == "user":
                        with_user.add(m.conversation_id)
                        last_user[m.conversation_id] = m
                        if m.intent:
                            intents_of.setdefault(m.conversation_id, set()).add(m.intent)
                    elif m.role == "assistant" and not m.chunk_ids and m.conversation_id in last_user:
                        q = last_user[m.conversation_id].text.strip()
                        key = " ".join(q.lower().split())
                        unanswered[key] += 1
                        display.setdefault(key, q[:200])
            handed: set[str] = set()
            for chunk in _chunks(ids, 500):
                for cid in s.exec(select(Handoff.conversation_id).where(Handoff.conversation_id.in_(chunk))).all():
                    if cid not in handed:
                        handed.add(cid)
                        day(cid)["handoffs"] += 1
            up = down = 0
            for chunk in _chunks(ids, 500):
                for cid, rating in s.exec(select(Feedback.conversation_id, Feedback.rating)
                                          .where(Feedback.conversation_id.in_(chunk))).all():
                    if rating > 0:
                        up += 1
                        day(cid)["up"] += 1
                    else:
                        down += 1
                        day(cid)["down"] += 1
            by_intent: dict[str, list[int]] = {}
            for cid, its in intents_of.items():
                for it in its:
                    c = by_intent.setdefault(it, [0, 0])
                    c[0] += 1
                    c[1] += cid in handed
            return {
                "per_day": [per_day[k] for k in sorted(per_day)],
                "conversations": len(ids),
                "handed_off": len(handed),
                "deflection": (len(with_user - handed) / len(with_user)) if with_user else None,
                "handoff_by_intent": sorted(
                    ({"intent": k, "conversations": v[0], "handoffs": v[1], "rate": v[1] / v[0]}
                     for k, v in by_intent.items()), key=lambda r: (-r["rate"], -r["conversations"], r["intent"])),
                "thumbs_up": up,
                "thumbs_down": down,
                "thumbs_up_rate": (up / (up + down)) if up + down else None,
                "unanswered": [{"question": display[k], "count": n} for k, n in unanswered.most_common(top)],
            }

        return self._read("compute the analytics", fn)

    # ------------------------------------------------------------------ users and sessions

    def add_user(self, username: str, password_hash: str, role: str = "staff") -> User:
        """Create a console user.

        Raises:
            InvalidInputError: bad username or role, or the username is taken.
        """
        if role not in USER_ROLES:
            raise InvalidInputError(f"role must be one of {USER_ROLES}, got {role!r}")
        bare = username.replace("_", "").replace(".", "").replace("-", "") if isinstance(username, str) else ""
        if not username or len(username) > 64 or not bare.isalnum():
            raise InvalidInputError(f"username must be 1..64 letters, digits, '.', '_' or '-', got {username!r}")

        def fn(s: Session) -> User:
            if s.exec(select(User).where(User.username == username)).first() is not None:
                raise InvalidInputError(f"username {username!r} is taken")
            u = User(username=username, password_hash=password_hash, role=role)
            s.add(u)
            s.flush()
            return u

        return self._write("create the user", fn)

    def get_user(self, username: str) -> User | None:
        """The user with this name, or None."""
        return self._read("read the user", lambda s: s.exec(select(User).where(User.username == username)).first())

    def list_users(self) -> list[User]:
        """All console users by name."""
        return self._read("list the users", lambda s: list(s.exec(select(User).order_by(User.username)).all()))

    def update_user(self, username: str, password_hash: str | None = None, role: str | None = None,
                    active: bool | None = None) -> User:
        """Change a user's password hash, role or active flag (a deactivated user's sessions end).

        Raises:
            NotFoundError: no such user.
            InvalidInputError: bad role.
        """
        if role is not None and role not in USER_ROLES:
            raise InvalidInputError(f"role must be one of {USER_ROLES}, got {role!r}")

        def fn(s: Session) -> User:
            u = s.exec(select(User).where(User.username == username)).first()
            if u is None:
                raise NotFoundError(f"user {username!r} does not exist")
            if password_hash is not None:
                u.password_hash = password_hash
            if role is not None:
                u.role = role
            if active is not None:
                u.active = active
            if password_hash is not None or active is False:
                for sess in s.exec(select(AuthSession).where(AuthSession.user_id == u.id)).all():
                    s.delete(sess)
            s.add(u)
            s.flush()
            return u

        return self._write("update the user", fn)

    def create_session(self, user_id: int, token_hash: str, expires_at: _dt.datetime) -> None:
        """Store a login session (and drop expired ones)."""

        def fn(s: Session) -> None:
            s.add(AuthSession(token_hash=token_hash, user_id=user_id, expires_at=expires_at))
            u = s.get(User, user_id)
            if u is not None:
                u.last_login_at = _now()
                s.add(u)
            for old in s.exec(select(AuthSession).where(AuthSession.expires_at < _now())).all():
                s.delete(old)

        self._write("create the session", fn)

    def session_user(self, token_hash: str) -> User | None:
        """The active user of an unexpired session, or None."""

        def fn(s: Session) -> User | None:
            sess = s.get(AuthSession, token_hash)
            if sess is None or as_utc(sess.expires_at) <= _now():
                return None
            u = s.get(User, sess.user_id)
            return u if u is not None and u.active else None

        return self._read("read the session", fn)

    def delete_session(self, token_hash: str) -> None:
        """End a login session (no error when it does not exist)."""

        def fn(s: Session) -> None:
            sess = s.get(AuthSession, token_hash)
            if sess is not None:
                s.delete(sess)

        self._write("end the session", fn)


def _chunks(seq: Sequence[T], n: int) -> Iterable[Sequence[T]]:
    for i in range(0, len(seq), n):
        yield seq[i: i + n]


def ids_as_str(ids: Sequence[int]) -> list[str]:
    """Chunk ids as strings (int64 does not survive JSON in browsers)."""
    return [str(i) for i in ids]


__all__ = [
    "Annotation", "AuthSession", "Conversation", "Feedback", "Handoff", "Message", "Store", "User",
    "CONVERSATION_STATUSES", "HANDOFF_STATUSES", "HUMAN_STATUSES", "MESSAGE_ROLES", "USER_ROLES",
    "as_utc", "ids_as_str",
]
