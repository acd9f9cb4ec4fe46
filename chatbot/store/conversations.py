"""Conversations and their messages, and the one function that changes a conversation's status.

Writes: a customer's message is written as soon as the turn is accepted and the reply only once
it is complete, each in its own transaction, so a customer message is never lost and a reply is
never half-written. Message writes carry the turn's ``request_id``, so a retried write is stored
once.

Status (``bot`` | ``handoff`` | ``human`` | ``closed``) changes only in :func:`change_status`,
which moves the conversation's handoff rows along with it:

================  ==========================  ================================================
event             status afterwards           handoff rows
================  ==========================  ================================================
customer_message  ``closed`` -> ``bot``,      none
                  others unchanged
handoff           ``handoff``                 a new ``open`` one, unless one is pending: then
                                              nothing changes and the pending one is returned
take              ``human``                   the pending one (or a new ``staff_takeover``)
                                              ``assigned`` to the staff member
staff_reply       ``human``                   as ``take``, unless the status is ``human``
hand_back         ``bot``                     pending ones ``returned``
close             ``closed`` (``ended_at``)   pending ones ``closed``
================  ==========================  ================================================
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from chatbot.errors import InvalidInputError, NotFoundError, StoreError
from chatbot.store.base import StoreBase
from chatbot.store.schema import MESSAGE_ROLES, PENDING_HANDOFF, Conversation, Handoff, Message, User, _now

#: Events of :func:`change_status`.
STATUS_EVENTS = ("customer_message", "handoff", "take", "staff_reply", "hand_back", "close")


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


def _pending_handoff(s: Session, conversation_id: str) -> Handoff | None:
    """The newest ``open`` or ``assigned`` handoff of a conversation, or None."""
    return s.exec(select(Handoff).where(Handoff.conversation_id == conversation_id,
                                        Handoff.status.in_(PENDING_HANDOFF))
                  .order_by(Handoff.id.desc())).first()


def _last_intent(s: Session, conversation_id: str) -> str | None:
    """The routed intent of the conversation's newest customer message that has one."""
    return s.exec(select(Message.intent).where(Message.conversation_id == conversation_id, Message.role == "user",
                                               Message.intent.is_not(None))
                  .order_by(Message.id.desc()).limit(1)).first()


def change_status(s: Session, conv: Conversation, event: str, user_id: int | None = None,
                  reason: str = "staff_takeover", queue: str = "default", intent: str | None = None) -> Handoff | None:
    """Apply ``event`` to ``conv`` and its handoff rows in the caller's transaction (the table in the module
    docstring): the only place a conversation's status changes.

    Args:
        s: the session of the caller's transaction (lock ``conv`` first where several processes may race).
        conv: the conversation row, attached to ``s``.
        event: one of :data:`STATUS_EVENTS`.
        user_id: the staff member (``take``, ``staff_reply``).
        reason, queue: of a new handoff (``handoff``; ``take`` and ``staff_reply`` open ``staff_takeover``).
        intent: the routed intent shown in the queue (``handoff``; default: the newest routed customer
            message's).

    Returns:
        The handoff opened, found pending or assigned (``handoff``, ``take``, ``staff_reply`` when it takes
        the conversation); None otherwise.

    Raises:
        InvalidInputError: an unknown ``event``.
    """
    if event not in STATUS_EVENTS:
        raise InvalidInputError(f"event must be one of {STATUS_EVENTS}, got {event!r}")
    now = _now()
    handoff: Handoff | None = None
    if event == "customer_message":
        if conv.status == "closed":
            conv.status, conv.ended_at = "bot", None
    elif event == "handoff":
        pending = _pending_handoff(s, conv.id)
        if pending is not None:
            return pending
        handoff = Handoff(conversation_id=conv.id, reason=reason, queue=queue,
                          intent=intent or _last_intent(s, conv.id))
        conv.status, conv.ended_at = "handoff", None
    elif event == "take" or (event == "staff_reply" and conv.status != "human"):
        handoff = _pending_handoff(s, conv.id) or Handoff(conversation_id=conv.id, reason="staff_takeover")
        handoff.status, handoff.assigned_to_id, handoff.assigned_at = "assigned", user_id, now
        conv.status, conv.ended_at = "human", None
    elif event in ("hand_back", "close"):
        for h in s.exec(select(Handoff).where(Handoff.conversation_id == conv.id,
                                              Handoff.status.in_(PENDING_HANDOFF))).all():
            h.status, h.closed_at = ("closed" if event == "close" else "returned"), now
            s.add(h)
        conv.status, conv.ended_at = ("closed", now) if event == "close" else ("bot", None)
    conv.updated_at = now
    s.add(conv)
    if handoff is not None:
        s.add(handoff)
    return handoff


class ConversationStore(StoreBase):
    """Conversations, messages and handoff status changes (part of :class:`chatbot.store.Store`)."""

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
            if message.role == "user":
                change_status(s, conv, "customer_message")
            else:
                conv.updated_at = _now()
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
            h = change_status(s, conv, "handoff", reason=reason, queue=queue, intent=intent)
            s.flush()
            return h

        return self._write("queue the handoff", fn)

    def take_handoff(self, conversation_id: str, user_id: int) -> Handoff:
        """A staff member takes the conversation (status ``human``; a handoff is opened when none is pending).

        Raises:
            NotFoundError: unknown conversation or user.
        """

        def fn(s: Session) -> Handoff:
            conv = _conversation(s, conversation_id, lock=True)
            if s.get(User, user_id) is None:
                raise NotFoundError(f"user id {user_id!r} does not exist")
            h = change_status(s, conv, "take", user_id=user_id)
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
            change_status(s, conv, "staff_reply", user_id=user_id)
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
            change_status(s, conv, "close" if close else "hand_back")
            s.flush()
            return conv

        return self._write("close the handoff" if close else "hand the conversation back", fn)


__all__ = ["ConversationStore", "change_status", "STATUS_EVENTS"]
