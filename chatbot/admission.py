"""Admission control in front of the engine: a bounded number of running turns and a bounded queue.

A turn reserves a place when it is prepared (so a full queue is refused with
HTTP 429 before any streaming starts) and waits for a running slot when its
generation begins. Places are handed out first come, first served.

Besides the global bound, one client may hold only ``max_per_client`` places (running or
queued) and one conversation ``max_per_conversation``: a client that opens requests in a loop
is refused (429 with ``Retry-After``) once it holds its share, while everyone else still gets
places. The client key is the caller's address (``chatbot.api`` takes it from the connection,
or from ``X-Forwarded-For`` when the connection comes from a trusted proxy).
"""

from __future__ import annotations

import asyncio
import collections

from chatbot.errors import TooBusyError


class Ticket:
    """A reserved place: ``await acquire()`` for a running slot, ``release()`` when done (idempotent)."""

    def __init__(self, admission: "Admission", keys: tuple[str, ...] = ()) -> None:
        self._adm = admission
        self._keys = keys  # the per-client / per-conversation counters this place holds
        self._state = "queued"  # queued -> running -> released
        self._fut: asyncio.Future | None = None

    async def acquire(self) -> None:
        """Wait until this ticket may run.

        Raises:
            asyncio.CancelledError: the waiting task was cancelled (the place is released).
        """
        adm = self._adm
        if self._state != "queued":
            return
        if adm._running < adm.max_running and not adm._waiters:
            adm._to_running(self)
            return
        self._fut = asyncio.get_running_loop().create_future()
        adm._waiters.append(self)
        try:
            await self._fut
        except BaseException:  # cancelled while waiting (or just after being woken): give the place back
            self.release()
            raise

    def release(self) -> None:
        """Give back the place (queued or running)."""
        self._adm._release(self)


class Admission:
    """Bounded concurrency with a bounded queue.

    Args:
        max_running: turns generating at once (the engine's batch: vLLM ``max_num_seqs``; 1 for transformers).
        max_queued: turns waiting beyond those; one more is refused.
        retry_after_s: the ``Retry-After`` hint of a refusal, seconds.
        metrics: optional :class:`~chatbot.metrics.Metrics` whose running/queued gauges are kept current
            and whose ``chatbot_requests_rejected_total{reason}`` counts refusals (``queue_full``,
            ``client_limit``, ``conversation_limit``).
        max_per_client: places (running + queued) one client address may hold; None: no limit.
        max_per_conversation: places one conversation may hold; None: no limit.

    Raises:
        ValueError: ``max_running < 1``, ``max_queued < 0`` or a per-key limit ``< 1``.
    """

    def __init__(self, max_running: int, max_queued: int, retry_after_s: int = 5, metrics=None,
                 max_per_client: int | None = None, max_per_conversation: int | None = None) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued}")
        for name, v in (("max_per_client", max_per_client), ("max_per_conversation", max_per_conversation)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")
        self.max_per_client = max_per_client
        self.max_per_conversation = max_per_conversation
        self._held: dict[str, int] = {}  # "client:<addr>" / "conversation:<id>" -> places held
        self.max_running = max_running
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self._running = 0
        self._queued = 0
        self._waiters: collections.deque[Ticket] = collections.deque()

    @property
    def running(self) -> int:
        """Turns holding a running slot."""
        return self._running

    @property
    def queued(self) -> int:
        """Turns holding a place but not yet running."""
        return self._queued

    def held(self, client: str | None = None, conversation: str | None = None) -> int:
        """Places (running + queued) held now by ``client`` (an address) or ``conversation`` (an id)."""
        key = f"client:{client}" if client is not None else f"conversation:{conversation}"
        return self._held.get(key, 0)

    def reserve(self, client: str | None = None, conversation: str | None = None) -> Ticket:
        """Take a place or refuse.

        Args:
            client: the caller's address (its per-client share is checked), or None (not limited).
            conversation: the conversation id (its per-conversation share is checked), or None.

        Raises:
            TooBusyError: the client or the conversation already holds its share of places, or
                running and queued places are all taken (HTTP 429 with ``Retry-After``).
        """
        keys: list[str] = []
        for kind, value, limit in (("client", client, self.max_per_client),
                                   ("conversation", conversation, self.max_per_conversation)):
            if value is None or limit is None:
                continue
            key = f"{kind}:{value}"
            if self._held.get(key, 0) >= limit:
                if self.metrics is not None:
                    self.metrics.rejected.labels(f"{kind}_limit").inc()
                raise TooBusyError(
                    f"too many requests from this {kind}: {self._held[key]} running or queued "
                    f"(max_per_{kind} {limit}); retry in {self.retry_after_s} s",
                    retry_after_s=self.retry_after_s,
                )
            keys.append(key)
        if self._running + self._queued >= self.max_running + self.max_queued:
            if self.metrics is not None:
                self.metrics.rejected.labels("queue_full").inc()
            raise TooBusyError(
                f"server busy: {self._running} replies running and {self._queued} queued "
                f"(max_queued {self.max_queued}); retry in {self.retry_after_s} s",
                retry_after_s=self.retry_after_s,
            )
        self._queued += 1
        for key in keys:
            self._held[key] = self._held.get(key, 0) + 1
        self._gauges()
        return Ticket(self, tuple(keys))

    def _to_running(self, t: Ticket) -> None:
        t._state = "running"
        self._queued -= 1
        self._running += 1
        self._gauges()

    def _release(self, t: Ticket) -> None:
        if t._state == "released":
            return
        if t._state == "running":
            self._running -= 1
        else:
            self._queued -= 1
            try:
                self._waiters.remove(t)
            except ValueError:
                pass
        t._state = "released"
        for key in t._keys:
            n = self._held.get(key, 0) - 1
            if n > 0:
                self._held[key] = n
            else:
                self._held.pop(key, None)
        while self._waiters and self._running < self.max_running:
            nxt = self._waiters.popleft()
            self._to_running(nxt)
            if nxt._fut is not None and not nxt._fut.done():
                nxt._fut.set_result(None)
        self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(self._running)
            self.metrics.queued.set(self._queued)
