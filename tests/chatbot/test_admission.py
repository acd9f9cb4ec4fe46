"""Admission control: bounded running slots, bounded queue, FIFO hand-over, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from chatbot.admission import Admission
from chatbot.errors import TooBusyError
from chatbot.metrics import Metrics


def test_refuses_beyond_running_plus_queued():
    m = Metrics()
    adm = Admission(max_running=2, max_queued=1, retry_after_s=7, metrics=m)
    tickets = [adm.reserve() for _ in range(3)]
    with pytest.raises(TooBusyError) as exc:
        adm.reserve()
    assert exc.value.retry_after_s == 7 and exc.value.http_status == 429
    assert m.rejected.labels("queue_full")._value.get() == 1
    tickets[0].release()
    tickets[0].release()  # idempotent
    adm.reserve()  # a place is free again
    assert adm.queued == 3 and adm.running == 0


def test_fifo_handover_and_gauges():
    async def main():
        m = Metrics()
        adm = Admission(max_running=1, max_queued=5, metrics=m)
        order: list[int] = []
        t0 = adm.reserve()
        await t0.acquire()
        assert (adm.running, adm.queued) == (1, 0)

        async def worker(i: int, t):
            await t.acquire()
            order.append(i)
            await asyncio.sleep(0)
            t.release()

        tasks = [asyncio.create_task(worker(i, adm.reserve())) for i in range(3)]
        await asyncio.sleep(0.01)
        assert (adm.running, adm.queued) == (1, 3)
        assert m.queued._value.get() == 3 and m.running._value.get() == 1
        t0.release()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2]
        assert (adm.running, adm.queued) == (0, 0)

    asyncio.run(main())


def test_cancelled_waiter_gives_its_place_back():
    async def main():
        adm = Admission(max_running=1, max_queued=1)
        t0 = adm.reserve()
        await t0.acquire()
        waiter = adm.reserve()
        task = asyncio.create_task(waiter.acquire())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (adm.running, adm.queued) == (1, 0)
        t0.release()
        assert (adm.running, adm.queued) == (0, 0)

    asyncio.run(main())


@pytest.mark.parametrize("kw", [{"max_running": 0, "max_queued": 1}, {"max_running": 1, "max_queued": -1}])
def test_bad_limits(kw):
    with pytest.raises(ValueError, match="max_"):
        Admission(**kw)
