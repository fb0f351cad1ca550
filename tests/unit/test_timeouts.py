"""agent/inject/timeouts.py: which waits have gone on too long."""

from __future__ import annotations

import asyncio

import pytest

from agent.inject.timeouts import IDLE, SLOW_REQUEST, UPSTREAM, Timeouts


class Up:
    def __init__(self, since):
        self.since = since

    def waiting_since(self):
        return self.since


class Client:
    def __init__(self, waiting, last_rx, upstream=None):
        self._waiting, self.last_rx, self.upstream = waiting, last_rx, upstream

    def waiting(self):
        return self._waiting


NOW, NOW_PERF = 1000.0, 5000.0


@pytest.mark.parametrize(
    "client,expected",
    [
        (Client("request", NOW - 299), None),  # idle, within client_idle
        (Client("request", NOW - 301), IDLE),
        (Client("more", NOW - 59), None),  # trickling, within request
        (Client("more", NOW - 61), SLOW_REQUEST),
        (Client("request", NOW - 61), None),  # idle is not slow
        (Client(None, NOW - 10_000), None),  # busy: a response streams
        (Client(None, NOW - 10_000, Up(NOW_PERF - 119)), None),  # upstream within its limit
        (Client(None, NOW - 10_000, Up(NOW_PERF - 121)), UPSTREAM),
        (Client(None, NOW - 10_000, Up(None)), None),  # response head arrived
        (Client("more", NOW - 61, Up(NOW_PERF - 121)), SLOW_REQUEST),
    ],
)
def test_what_has_waited_too_long(client, expected):
    t = Timeouts(300, 60, 120, lambda: [], lambda c, w: None)
    assert t.expired(client, NOW, NOW_PERF) == expected


def test_sweep_reports_each_expired_client_once():
    seen = []
    fresh = Client("request", NOW - 1)
    stale = Client("request", NOW - 301)
    # the clocks are the test's: a just-booted machine's monotonic clock is under 300 s
    t = Timeouts(
        300,
        60,
        120,
        lambda: [fresh, stale],
        lambda c, w: seen.append((c, w)),
        clock=lambda: NOW,
        perf_clock=lambda: NOW_PERF,
    )
    assert t.sweep() == 1 and seen == [(stale, IDLE)]


@pytest.mark.parametrize(
    "limits,interval",
    [
        ((300, 60, 120), 1.0),  # at most a second
        ((0.4, 60, 120), 0.1),  # a quarter of the smallest
        ((0.01, 60, 120), 0.05),  # never a busy loop
    ],
)
def test_sweep_interval_follows_the_smallest_limit(limits, interval):
    assert Timeouts(*limits, lambda: [], lambda c, w: None).interval == interval


# ---------------------------------------------------------------- found by `make mutate`
@pytest.mark.parametrize(
    "client,expected",
    [
        # a limit is a wait longer than it: exactly the limit is still within it
        (Client("request", NOW - 300), None),
        (Client("more", NOW - 60), None),
        (Client(None, NOW, Up(NOW_PERF - 120)), None),
    ],
)
def test_a_wait_of_exactly_the_limit_has_not_expired(client, expected):
    t = Timeouts(300, 60, 120, lambda: [], lambda c, w: None)
    assert t.expired(client, NOW, NOW_PERF) == expected


@pytest.mark.parametrize(
    "limits,interval",
    [
        ((300, 0.4, 120), 0.1),  # the request limit the smallest
        ((300, 60, 0.4), 0.1),  # the upstream limit the smallest
    ],
)
def test_the_sweep_interval_follows_whichever_limit_is_smallest(limits, interval):
    assert Timeouts(*limits, lambda: [], lambda c, w: None).interval == interval


def test_sweep_judges_each_client_by_both_clocks_and_counts_every_expiry():
    seen = []
    idle = Client("request", NOW - 301)
    upstream = Client(None, NOW, Up(NOW_PERF - 121))
    t = Timeouts(
        300,
        60,
        120,
        lambda: [idle, Client("request", NOW), upstream],
        lambda c, w: seen.append((c, w)),
        clock=lambda: NOW,
        perf_clock=lambda: NOW_PERF,
    )
    assert t.sweep() == 2 and seen == [(idle, IDLE), (upstream, UPSTREAM)]


def test_run_sweeps_until_cancelled():
    """run() sweeps at each interval; the test waits for the sweep, not for the time."""

    async def main():
        swept = asyncio.Event()
        stale = Client("request", NOW - 301)
        t = Timeouts(
            0.01,  # the shortest interval (0.05 s): the test waits about that long
            60,
            120,
            lambda: [stale],
            lambda c, w: swept.set(),
            clock=lambda: NOW,
            perf_clock=lambda: NOW_PERF,
        )
        runner = asyncio.ensure_future(t.run())
        waiting = asyncio.ensure_future(swept.wait())
        done, _ = await asyncio.wait([runner, waiting], return_when=asyncio.FIRST_COMPLETED)
        assert waiting in done and not runner.done()  # swept, and still running
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner

    asyncio.run(main())
