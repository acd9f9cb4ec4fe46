"""The operator's analytics, computed by the database (``GROUP BY`` aggregates) on SQLite and PostgreSQL.

Only the "unanswered questions" list is finished in Python: SQL finds each reply given without a
retrieved passage and the customer message it answered; grouping those questions case- and
whitespace-insensitively has no portable SQL form, and they are few.
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter

from sqlalchemy import String, case, cast, distinct, func, or_
from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from chatbot.store.base import StoreBase
from chatbot.store.schema import Conversation, Feedback, Handoff, Message


def _day(value) -> str:
    """A ``date()`` result as ``YYYY-MM-DD`` (SQLite gives a string, PostgreSQL a date)."""
    return value if isinstance(value, str) else value.isoformat()


class AnalyticsStore(StoreBase):
    """Figures for the operator's analytics page (part of :class:`chatbot.store.Store`)."""

    def analytics(self, since: _dt.datetime | None = None, until: _dt.datetime | None = None,
                  top: int = 10) -> dict:
        """Figures for the operator's analytics page over conversations started in [since, until).

        Returns:
            ``{"per_day": [{"day": "YYYY-MM-DD", "conversations", "handoffs", "up", "down"}],
            "conversations", "handed_off", "deflection" (share of conversations with a customer
            message and no handoff; None without any), "handoff_by_intent": [{"intent",
            "conversations", "handoffs", "rate"}], "thumbs_up", "thumbs_down", "thumbs_up_rate"
            (None without ratings), "unanswered": [{"question", "count"}]}``: ``unanswered``
            are the customer messages most often answered without any retrieved passage. Days are
            UTC days of the conversations' start.
        """

        def fn(s: Session) -> dict:
            window = select(Conversation.id)
            if since is not None:
                window = window.where(Conversation.started_at >= since)
            if until is not None:
                window = window.where(Conversation.started_at < until)
            in_window = Conversation.id.in_(window)
            day = func.date(Conversation.started_at)
            handed_ids = select(Handoff.conversation_id)

            per_day: dict[str, dict] = {}
            for d, n in s.exec(select(day, func.count()).where(in_window).group_by(day)).all():
                per_day[_day(d)] = {"day": _day(d), "conversations": n, "handoffs": 0, "up": 0, "down": 0}
            if not per_day:
                return {"per_day": [], "conversations": 0, "handed_off": 0, "deflection": None,
                        "handoff_by_intent": [], "thumbs_up": 0, "thumbs_down": 0, "thumbs_up_rate": None,
                        "unanswered": []}
            for d, n in s.exec(select(day, func.count(distinct(Handoff.conversation_id)))
                               .join(Handoff, Handoff.conversation_id == Conversation.id)
                               .where(in_window).group_by(day)).all():
                per_day[_day(d)]["handoffs"] = n
            up_down = (func.sum(case((Feedback.rating > 0, 1), else_=0)),
                       func.sum(case((Feedback.rating > 0, 0), else_=1)))
            for d, up, down in s.exec(select(day, *up_down).join(Feedback, Feedback.conversation_id == Conversation.id)
                                      .where(in_window).group_by(day)).all():
                per_day[_day(d)].update(up=int(up or 0), down=int(down or 0))

            customer = (Message.role == "user", Message.conversation_id.in_(window))
            with_user, without_handoff = s.exec(select(
                func.count(distinct(Message.conversation_id)),
                func.count(distinct(case((Message.conversation_id.not_in(handed_ids), Message.conversation_id)))),
            ).where(*customer)).one()

            by_intent = s.exec(select(
                Message.intent, func.count(distinct(Message.conversation_id)),
                func.count(distinct(case((Message.conversation_id.in_(handed_ids), Message.conversation_id)))),
            ).where(*customer, Message.intent.is_not(None), Message.intent != "").group_by(Message.intent)).all()

            # a reply without any retrieved chunk (SQL NULL, JSON null or []), and the customer message before it
            asked = aliased(Message)
            question = (select(asked.text).where(asked.conversation_id == Message.conversation_id,
                                                 asked.role == "user", asked.id < Message.id)
                        .order_by(asked.id.desc()).limit(1).correlate(Message).scalar_subquery())
            no_chunks = or_(Message.chunk_ids.is_(None), cast(Message.chunk_ids, String).in_(("null", "[]")))
            unanswered: Counter = Counter()
            display: dict[str, str] = {}
            for q in s.exec(select(question).where(Message.role == "assistant", no_chunks,
                                                      Message.conversation_id.in_(window))
                               .order_by(Message.id)).all():
                if q is None:
                    continue
                q = q.strip()
                key = " ".join(q.lower().split())
                unanswered[key] += 1
                display.setdefault(key, q[:200])

            days = [per_day[k] for k in sorted(per_day)]
            up, down = sum(d["up"] for d in days), sum(d["down"] for d in days)
            return {
                "per_day": days,
                "conversations": sum(d["conversations"] for d in days),
                "handed_off": sum(d["handoffs"] for d in days),
                "deflection": (without_handoff / with_user) if with_user else None,
                "handoff_by_intent": sorted(
                    ({"intent": it, "conversations": n, "handoffs": h, "rate": h / n} for it, n, h in by_intent),
                    key=lambda r: (-r["rate"], -r["conversations"], r["intent"])),
                "thumbs_up": up,
                "thumbs_down": down,
                "thumbs_up_rate": (up / (up + down)) if up + down else None,
                "unanswered": [{"question": display[k], "count": n} for k, n in unanswered.most_common(top)],
            }

        return self._read("compute the analytics", fn)


__all__ = ["AnalyticsStore"]
