"""Admission control in front of the engine: a bounded number of running turns and a bounded queue.

A turn reserves a place when it is prepared (so a full queue is refused with
HTTP 429 before any streaming starts) and waits for a running slot when its
generation begins. Places are handed out first come, first served.
"""

from __future__ import annotations

import asyncio
import collections

from chatbot.errors import TooBusyError


class Ticket:
    """A reserved place: ``await acquire()`` for a running slot, ``release()`` when done (idempotent)."""

    def __init__(self, admission: "Admission") -> None:
        self._adm = admission
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
        metrics: optional :class:`~chatbot.metrics.Metrics` whose running/queued gauges are kept current.

    Raises:
        ValueError: ``max_running < 1`` or ``max_queued < 0``.
    """

    def __init__(self, max_running: int, max_queued: int, retry_after_s: int = 5, metrics=None) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued}")
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

    def reserve(self) -> Ticket:
        """Take a place or refuse.

        Raises:
            TooBusyError: running and queued places are all taken (HTTP 429 with ``Retry-After``).
        """
        if self._running + self._queued >= self.max_running + self.max_queued:
            if self.metrics is not None:
                self.metrics.rejected.labels("queue_full").inc()
            raise TooBusyError(
                f"server busy: {self._running} replies running and {self._queued} queued "
                f"(max_queued {self.max_queued}); retry in {self.retry_after_s} s",
                retry_after_s=self.retry_after_s,
            )
        self._queued += 1
        self._gauges()
        return Ticket(self)

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
