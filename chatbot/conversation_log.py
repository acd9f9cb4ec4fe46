"""Writing a conversation to the store from the turn pipeline: redaction first, never breaking the reply.

:class:`ConversationLog` sits between :class:`chatbot.service.Assistant` and
:class:`chatbot.store.Store`:

* every text is redacted (:mod:`chatbot.redaction`) before it is written, so with
  redaction on the raw text reaches neither the database nor the logs;
* the customer's message is written when the turn is accepted, the reply when it is
  complete (never half-written);
* a failed write does not break the customer's reply: the store retries transient
  failures itself; what still fails is kept in memory (in order, up to
  ``spool_limit``), reported (log error, ``chatbot_store_write_failures_total``,
  ``chatbot_store_pending_writes``) and written with the next write that succeeds
  or by :meth:`flush`. Message writes carry the turn's ``request_id``, so a write
  that is retried after an unclear failure is still stored once.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

from chatbot.errors import NotFoundError, StoreError
from chatbot.redaction import NoRedaction, Redactor
from chatbot.store import Handoff, Message, Store

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    message: Message
    create: bool
    channel: str
    customer_ref: str | None


def _slot_in(text: str, slot) -> bool:
    """True when ``slot`` (``start``, ``end``, ``value``) marks exactly its value in ``text``."""
    get = slot.get if isinstance(slot, dict) else (lambda k, d=None: getattr(slot, k, d))
    start, end, value = get("start"), get("end"), get("value")
    return isinstance(start, int) and isinstance(end, int) and text[start:end] == value


class ConversationLog:
    """Redacting, failure-tolerant writer of conversation messages.

    Args:
        store: the store.
        redactor: applied to every stored text (:class:`~chatbot.redaction.NoRedaction` to store as given).
        metrics: a :class:`chatbot.metrics.Metrics` whose registry gets the failure counter and pending gauge.
        spool_limit: failed writes kept for a retry; beyond that the oldest are dropped (and counted).
    """

    def __init__(self, store: Store, redactor: Redactor | None = None, metrics=None,
                 spool_limit: int = 10_000) -> None:
        self.store = store
        self.redactor = redactor or NoRedaction()
        self._pending: deque[_Pending] = deque()
        self._lock = threading.Lock()
        self.spool_limit = spool_limit
        self.dropped = 0
        self._failures = self._pending_gauge = None
        if metrics is not None:
            from prometheus_client import Counter, Gauge

            try:
                self._failures = Counter("chatbot_store_write_failures", "Log writes that failed after retries",
                                         registry=metrics.registry)
                self._pending_gauge = Gauge("chatbot_store_pending_writes", "Log writes waiting for a retry",
                                            registry=metrics.registry)
            except ValueError:  # already registered on this registry
                pass

    # ------------------------------------------------------------------ writes

    @property
    def pending(self) -> int:
        """Failed writes waiting for a retry."""
        return len(self._pending)

    def _report(self, exc: Exception, what: str) -> None:
        if self._failures is not None:
            self._failures.inc()
        if self._pending_gauge is not None:
            self._pending_gauge.set(len(self._pending))
        log.error("store: could not %s (%s); %d write(s) kept for a retry", what, exc, len(self._pending))

    def flush(self) -> int:
        """Write the kept failed writes in order; return how many were written (stops at the first failure)."""
        written = 0
        with self._lock:
            while self._pending:
                p = self._pending[0]
                try:
                    self.store.add_message(p.message, create=p.create, channel=p.channel, customer_ref=p.customer_ref)
                except NotFoundError:
                    log.error("store: dropping a kept message of the vanished conversation %s",
                              p.message.conversation_id)
                except StoreError:
                    break
                self._pending.popleft()
                written += 1
            if self._pending_gauge is not None:
                self._pending_gauge.set(len(self._pending))
        if written:
            log.info("store: wrote %d kept message(s)", written)
        return written

    def write(self, message: Message, create: bool = False, channel: str = "api",
              customer_ref: str | None = None) -> Message | None:
        """Store an already redacted message, keeping it for a retry when the store fails.

        Returns:
            The stored message, or None when it was kept for a retry.

        Raises:
            NotFoundError: the conversation does not exist (and not ``create``).
        """
        if self._pending:
            self.flush()
        if self._pending:  # keep the order: queue behind the older ones
            self._keep(_Pending(message, create, channel, customer_ref))
            self._report(StoreError("earlier writes are still pending"), "store the message")
            return None
        try:
            return self.store.add_message(message, create=create, channel=channel, customer_ref=customer_ref)
        except StoreError as exc:
            self._keep(_Pending(message, create, channel, customer_ref))
            self._report(exc, "store the message")
            return None

    def _keep(self, p: _Pending) -> None:
        with self._lock:
            self._pending.append(p)
            while len(self._pending) > self.spool_limit:
                self._pending.popleft()
                self.dropped += 1
                log.error("store: spool full; dropped the oldest kept write (%d dropped so far)", self.dropped)

    # ------------------------------------------------------------------ messages of a turn

    def customer_message(self, conversation_id: str, text: str, request_id: str | None, channel: str = "api",
                         new: bool = False, route=None, customer_ref: str | None = None,
                         action: str | None = None) -> Message | None:
        """Redact and store the customer's message (creating the conversation when ``new``).

        Args:
            route: the routing decision (``intent``, ``confidence``, ``slots``, ``action`` attributes),
                or None.
            action: overrides ``route.action`` (e.g. ``held`` while a person has the conversation).

        Returns:
            The stored message, or None when the write was kept for a retry.
        """
        slots = list(getattr(route, "slots", None) or [])
        # spans come only from slots found in this text: a route can carry slots over from an earlier
        # message (a filled ask_slot), whose offsets point into that message
        own = [s for s in slots if _slot_in(text, s)]
        red = self.redactor.redact(text, slots=own if route is not None else None)
        msg = Message(
            conversation_id=conversation_id, role="user", text=red.text, request_id=request_id,
            intent=getattr(route, "intent", None), confidence=getattr(route, "confidence", None),
            slots=self.redactor.redact_slots(slots) or None,
            action=action or getattr(route, "action", None), redactions=red.counts or None,
        )
        return self.write(msg, create=new, channel=channel, customer_ref=customer_ref)

    def reply(self, message: Message) -> Message | None:
        """Redact and store a complete assistant reply (``message.text`` is replaced by its redacted form,
        and so are the text and claims of its withheld sentences, which staff see in the console)."""
        red = self.redactor.redact(message.text)
        message.text = red.text
        message.redactions = red.counts or None
        if message.withheld:
            message.withheld = [{**w, "text": self.redactor.redact(w.get("text") or "").text,
                                 "claims": [self.redactor.redact(str(c)).text for c in w.get("claims") or []]}
                                for w in message.withheld]
        return self.write(message)

    def staff_reply(self, conversation_id: str, user_id: int, text: str) -> Message:
        """Redact and store a staff member's reply (takes the conversation when nobody has).

        Raises:
            InvalidInputError: empty text.
            NotFoundError: unknown conversation.
            StoreError: the write failed (staff see the error and can resend).
        """
        red = self.redactor.redact(text or "")
        return self.store.staff_reply(conversation_id, user_id, red.text, redactions=red.counts or None)

    def request_handoff(self, conversation_id: str | None, reason: str, queue: str = "default",
                        channel: str = "web", customer_ref: str | None = None, intent: str | None = None) -> Handoff:
        """Queue the conversation for a person (see :meth:`chatbot.store.Store.request_handoff`)."""
        if self._pending:
            self.flush()
        return self.store.request_handoff(conversation_id, reason, queue=queue, channel=channel,
                                          customer_ref=customer_ref, intent=intent)


__all__ = ["ConversationLog"]
