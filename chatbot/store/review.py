"""What staff review: customer feedback, annotations, the handoff queue, transcript search and
transcripts, and the exports (chat-SFT examples and JSONL, one row per message for CSV)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from sqlalchemy import func
from sqlmodel import Session, select

from chatbot.dialogue import chat_messages

from chatbot.errors import InvalidInputError, NotFoundError, StoreError
from chatbot.store.base import StoreBase
from chatbot.store.conversations import _conversation
from chatbot.store.schema import (
    CONVERSATION_STATUSES,
    PENDING_HANDOFF,
    Annotation,
    Conversation,
    Feedback,
    Handoff,
    Message,
    User,
    _now,
    as_utc,
)


def _approved_ids():
    """Subquery: conversation ids with a reply approved for training."""
    return select(Annotation.conversation_id).where(Annotation.approved == True)  # noqa: E712


def _escape_like(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _sft_example(conversation_id: str, msgs: Sequence[Message], annotations: dict[int, Annotation],
                approved_only: bool = False, system_prompt: str | None = None) -> dict | None:
    """One conversation as a chat-SFT example ``{"id": "store:<id>", "messages": [{"role", "content"}, ...]}``,
    or None when it has no reply to learn from.

    Customer messages become ``user``; bot and staff replies ``assistant``, with a staff correction
    (``annotations``, by message id) in place of the original; consecutive messages of one side are joined
    with a newline; the example starts with a customer message and ends with a reply. ``approved_only``:
    cut after the last approved reply (None when there is none).
    """
    if approved_only:
        last = max((i for i, m in enumerate(msgs) if m.id in annotations and annotations[m.id].approved),
                   default=None)
        if last is None:
            return None
        msgs = msgs[: last + 1]
    def turn(m: Message) -> tuple[str, str]:
        a = annotations.get(m.id)
        return ("user" if m.role == "user" else "assistant",
                a.corrected_text if a is not None and a.corrected_text else m.text or "")

    out = chat_messages(map(turn, msgs), system_prompt)
    if not any(x["role"] == "assistant" for x in out):
        return None
    return {"id": f"store:{conversation_id}", "messages": out}


class ReviewStore(StoreBase):
    """Feedback, annotations, the handoff queue, search, transcripts and exports (part of
    :class:`chatbot.store.Store`)."""

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

    # ------------------------------------------------------------------ the handoff queue

    def handoff_queue(self, statuses: Sequence[str] = PENDING_HANDOFF, limit: int = 200) -> list[dict]:
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

    # ------------------------------------------------------------------ search and transcripts

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

    # ------------------------------------------------------------------ exports

    def approved_conversation_ids(self) -> list[str]:
        """Ids of the conversations with at least one reply approved for training, oldest first."""

        def fn(s: Session) -> list[str]:
            return list(s.exec(select(Conversation.id).where(Conversation.id.in_(_approved_ids()))
                               .order_by(Conversation.started_at, Conversation.id)).all())

        return self._read("list the approved conversations", fn)

    def sft_examples(self, conversation_ids: Sequence[str] | None = None, approved_only: bool = False,
                     system_prompt: str | None = None) -> list[dict]:
        """Conversations as chat-SFT examples ``{"id", "messages": [{"role", "content"}, ...]}``
        (:func:`_sft_example`: staff corrections in place of the replies, one side's consecutive messages
        joined, from a customer message to a reply; conversations without a reply are left out).

        Args:
            conversation_ids: these conversations (in this order); None for all, oldest first.
            approved_only: only conversations with an approved reply, cut after the last approved one.
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
            examples = (_sft_example(cid, by_conv.get(cid) or [], anns, approved_only, system_prompt) for cid in ids)
            return [e for e in examples if e is not None]

        return self._read("export the conversations", fn)

    def approved_replies(self) -> list[dict]:
        """Every reviewer-approved reply with what it answered and the passages it was shown, oldest first:
        ``{"conversation_id", "message_id", "question", "reply", "original", "citations"}``. ``question`` is the
        customer's latest message before the reply; ``reply`` is the staff correction when there is one, else the
        reply as sent (``original``); ``citations`` are the passages of its prompt as stored (number, doc_id,
        title, source, passage, ...). A reply with no customer message before it is left out."""

        def fn(s: Session) -> list[dict]:
            rows = []
            q = (select(Annotation, Message).where(Annotation.approved == True)  # noqa: E712
                 .where(Annotation.message_id == Message.id).order_by(Message.id))
            for ann, msg in s.exec(q).all():
                user = s.exec(select(Message).where(Message.conversation_id == msg.conversation_id)
                              .where(Message.role == "user").where(Message.id < msg.id)
                              .order_by(Message.id.desc())).first()
                if user is None:
                    continue
                rows.append({"conversation_id": msg.conversation_id, "message_id": msg.id, "question": user.text,
                             "reply": ann.corrected_text or msg.text or "", "original": msg.text or "",
                             "citations": list(msg.citations or [])})
            return rows

        return self._read("read the approved replies", fn)

    def export_sft_jsonl(self, dest: str | Path | TextIO, conversation_ids: Sequence[str] | None = None,
                         approved_only: bool = False, system_prompt: str | None = None) -> int:
        """Write :meth:`sft_examples` as chat JSONL, one ``{"id", "messages"}`` object a line (UTF-8, not
        ASCII-escaped): the one chat-SFT export of the conversation log, which fine-tuning reads.

        Args:
            dest: a text stream, or a file path (its folder is created; the file is replaced atomically,
                so a reader never sees half of it).
            conversation_ids, approved_only, system_prompt: see :meth:`sft_examples`.

        Returns:
            The number of examples (lines) written.

        Raises:
            StoreError: the store cannot be read, or the file cannot be written.
        """
        examples = self.sft_examples(conversation_ids, approved_only=approved_only, system_prompt=system_prompt)
        text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
        if not isinstance(dest, (str, Path)):
            dest.write(text)
            return len(examples)
        path = Path(dest)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StoreError(f"cannot write the chat-SFT export to {str(path)!r}: {exc}") from exc
        return len(examples)

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


__all__ = ["ReviewStore"]
