"""The token cache's rules the rest of the suite left unpinned (found by `make mutate`): when a
refresh starts (and when it does not), the backoff after a failure and its jitter, what a
caller gets meanwhile, the events the service audits, the counters it reports as hits and
misses, and what invalidate and drop leave behind."""

from __future__ import annotations

import asyncio
import gc

import pytest

from agent.oauth import cache as cache_module
from agent.oauth.cache import TokenCache
from agent.oauth.errors import InvalidClient, OAuthError, ServerUnavailable
from agent.oauth.tokens import Token
from tests.unit.test_oauth_units import Clock, tok


class Server:
    """An authorization server the test scripts: each fetch takes the next answer (a token
    lifetime, or an exception to raise); `hold` makes fetches wait until released."""

    def __init__(self, clock: Clock, *answers: float | OAuthError):
        self.clock = clock
        self.answers = list(answers)
        self.calls = 0
        self.called = asyncio.Event()  # set at each fetch
        self.hold: asyncio.Event | None = None

    async def __call__(self, key: object) -> Token:
        self.calls += 1
        self.called.set()
        if self.hold is not None:
            await self.hold.wait()
        answer = self.answers.pop(0)
        if isinstance(answer, OAuthError):
            raise answer
        return tok(self.clock.t, ttl=answer, name=f"t{self.calls}")


class Events:
    """on_event's record, and a way to wait for each event in turn."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object, object]] = []
        self.read = 0
        self.arrived = asyncio.Event()

    def __call__(self, what: str, key: object, obj: object) -> None:
        self.seen.append((what, key, obj))
        self.arrived.set()

    async def next(self) -> str:
        """The name of the first event not yet read, once it has come."""
        while self.read == len(self.seen):
            self.arrived.clear()
            await self.arrived.wait()
        self.read += 1
        return self.seen[self.read - 1][0]


def world(*answers: float | OAuthError, start: float = 1000.0, **settings: float):
    """The test's clock (at `start`), an authorization server that gives `answers` in turn,
    the record of what the cache reports, and the cache over them (with `settings`)."""
    clock = Clock()
    clock.t = start
    server = Server(clock, *answers)
    events = Events()
    return clock, server, events, TokenCache(server, clock=clock, on_event=events, **settings)


def run(coro_fn):
    asyncio.run(coro_fn())


def refreshing() -> int:
    """How many fetches the cache has started behind its callers (a refresh is a task)."""
    return len(asyncio.all_tasks() - {asyncio.current_task()})


# ---------------------------------------------------------------- refresh ahead
@pytest.mark.parametrize(
    "start,refresh_ahead,elapsed,refreshes",
    [
        (1000.0, None, 79.9, False),  # the default: after 80 % of the lifetime
        (1000.0, None, 80.0, True),  # from that moment on, not after it
        (1000.0, 0.5, 49.9, False),
        (1000.0, 0.5, 50.0, True),
        # a clock counting from zero (time.monotonic on a machine just booted): nothing
        # holds the first refresh back but the refresh point
        (0.0, 0.005, 0.25, False),
        (0.0, 0.005, 0.5, True),
    ],
)
def test_a_refresh_starts_once_the_refresh_ahead_share_of_the_lifetime_has_passed(
    start, refresh_ahead, elapsed, refreshes
):
    settings = {} if refresh_ahead is None else {"refresh_ahead": refresh_ahead}
    clock, _server, _events, cache = world(100, 100, start=start, **settings)

    async def main():
        first = await cache.get("k")
        clock.t += elapsed
        assert cache.peek("k") is first  # the valid token is served either way
        assert refreshing() == (1 if refreshes else 0)

    run(main)


def test_one_refresh_at_a_time_and_the_new_token_replaces_the_old():
    clock, server, events, cache = world(100, 100)

    async def main():
        first = await cache.get("k")
        assert await events.next() == "obtained"
        clock.t += 90
        server.hold = asyncio.Event()
        for _ in range(5):  # every caller meanwhile gets the old token, one fetch goes out
            assert cache.peek("k") is first
            assert refreshing() == 1
        await server.called.wait()
        assert cache.peek("k") is first and refreshing() == 1
        server.hold.set()
        assert await events.next() == "refreshed"
        assert server.calls == 2
        second = cache.peek("k")
        assert second is not None and second.access_token == "t2"
        assert events.seen == [("obtained", "k", first), ("refreshed", "k", second)]

    run(main)


def test_a_failed_refresh_keeps_the_token_and_waits_its_backoff_before_the_next():
    clock, server, events, cache = world(100, InvalidClient("no"), 100)

    async def main():
        first = await cache.get("k")
        await events.next()
        clock.t += 80
        assert cache.peek("k") is first
        assert await events.next() == "refresh_failed"
        assert isinstance(events.seen[-1][2], InvalidClient)
        clock.t += 0.25  # within the first backoff step (0.5 s; a client error: no jitter)
        assert cache.peek("k") is first and refreshing() == 0
        clock.t += 0.25
        assert cache.peek("k") is first and refreshing() == 1
        assert await events.next() == "refreshed"
        assert server.calls == 3
        assert cache.peek("k").access_token == "t3"

    run(main)


def test_a_failed_background_refresh_leaves_no_unretrieved_exception():
    """Nobody awaits a refresh: its failure must not end up as asyncio's "Task exception
    was never retrieved" in the log, once per failed refresh."""
    clock, _server, events, cache = world(100, ServerUnavailable("down"))
    reported: list[dict] = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        await cache.get("k")
        await events.next()
        clock.t += 80
        cache.peek("k")
        refresh = asyncio.all_tasks() - {asyncio.current_task()}
        assert len(refresh) == 1
        await asyncio.wait(refresh)
        assert events.seen[-1][0] == "refresh_failed"
        del refresh
        gc.collect()  # a task's unretrieved exception is reported when it is collected

    run(main)
    assert reported == []


# ---------------------------------------------------------------- backoff
def test_the_default_backoff_doubles_from_half_a_second_up_to_a_minute():
    steps = [0.5, 1, 2, 4, 8, 16, 32, 60, 60]
    clock, server, _events, cache = world(
        *[InvalidClient(f"no {i}") for i in range(len(steps) + 1)]
    )

    async def main():
        for n, step in enumerate(steps, 1):
            with pytest.raises(InvalidClient):
                await cache.get("k")
            assert server.calls == n
            clock.t += step - 0.25
            with pytest.raises(InvalidClient, match=f"no {n - 1}"):  # answered at once
                await cache.get("k")
            assert server.calls == n
            clock.t += 0.25  # the step is over: the next get asks again

    run(main)


def test_a_success_starts_the_backoff_over():
    clock, _server, _events, cache = world(
        InvalidClient("a"),
        InvalidClient("b"),
        10,
        InvalidClient("c"),
        10,
        backoff_base=1,
        backoff_max=100,
    )

    async def main():
        for step in (1, 2):
            with pytest.raises(InvalidClient):
                await cache.get("k")
            clock.t += step
        await cache.get("k")
        clock.t += 10  # expired
        with pytest.raises(InvalidClient, match="c"):
            await cache.get("k")
        clock.t += 1  # the first step again, not the third (4)
        assert (await cache.get("k")).access_token == "t5"

    run(main)


@pytest.mark.parametrize(
    "error,jittered",
    [(ServerUnavailable("down"), True), (InvalidClient("no"), False)],
)
def test_only_transient_failures_wait_a_random_part_of_the_step(monkeypatch, error, jittered):
    """Full jitter (a uniform draw between 0 and the step) spreads the retries of many
    identities after an outage; a client error waits the whole step."""
    drawn = []

    def uniform(a, b):
        drawn.append((a, b))
        return b / 4

    monkeypatch.setattr(cache_module.random, "uniform", uniform)
    clock, server, _events, cache = world(error, 100, backoff_base=2, backoff_max=100)

    async def main():
        with pytest.raises(type(error)):
            await cache.get("k")
        wait = 0.5 if jittered else 2
        clock.t += wait - 0.125
        with pytest.raises(type(error)):
            await cache.get("k")
        assert server.calls == 1
        clock.t += 0.125
        await cache.get("k")
        assert server.calls == 2

    run(main)
    assert drawn == ([(0, 2)] if jittered else [])


@pytest.mark.parametrize("start", [1000.0, 0.0])  # 0: a clock counting from boot
def test_invalidate_ends_the_backoff_at_once(start):
    *_, cache = world(InvalidClient("no"), 100, start=start, backoff_base=30)

    async def main():
        with pytest.raises(InvalidClient):
            await cache.get("k")
        cache.invalidate("k")
        assert (await cache.get("k")).access_token == "t2"  # not 30 s later

    run(main)


def test_each_outcome_is_reported_with_its_key_and_what_came_of_it():
    """The service audits token.obtained and token.refreshed and logs a failed refresh,
    each by its name, with the key (SPIFFE ID, server) and the token or the error."""
    refused, down = InvalidClient("no"), ServerUnavailable("down")
    clock, server, events, cache = world(refused, 100, down, 100, backoff_base=1)

    async def main():
        with pytest.raises(InvalidClient):
            await cache.get("k")
        assert await events.next() == "failed"
        clock.t += 1
        first = await cache.get("k")
        assert await events.next() == "obtained"
        clock.t += 80
        cache.peek("k")
        await server.called.wait()
        assert await events.next() == "refresh_failed"
        clock.t += 1
        cache.peek("k")
        assert await events.next() == "refreshed"
        second = cache.peek("k")
        assert events.seen == [
            ("failed", "k", refused),
            ("obtained", "k", first),
            ("refresh_failed", "k", down),
            ("refreshed", "k", second),
        ]
        assert second is not first

    run(main)


def test_a_caller_that_gives_up_does_not_cancel_the_fetch_for_the_others():
    _clock, server, _events, cache = world(100)

    async def main():
        server.hold = asyncio.Event()
        impatient = asyncio.ensure_future(cache.get("k"))
        patient = asyncio.ensure_future(cache.get("k"))
        await server.called.wait()  # the first caller's fetch, joined by the second
        impatient.cancel()
        server.hold.set()
        assert (await patient).access_token == "t1"
        assert impatient.cancelled() and server.calls == 1

    run(main)


# ---------------------------------------------------------------- what is kept
def test_hits_and_misses_count_each_lookup():
    *_, cache = world(100, 100)

    async def main():
        await cache.get("k")
        await cache.get("k")
        assert cache.peek("k") is not None
        assert cache.peek("other") is None  # peek asks, it does not count a miss
        assert (cache.hits, cache.misses) == (2, 1)
        await cache.get("j")
        await cache.get("j")
        assert (cache.hits, cache.misses) == (3, 2)

    run(main)


def test_what_invalidate_and_drop_leave():
    *_, cache = world(100, 100, 100)

    async def main():
        assert cache.peek("k") is None and len(cache) == 0
        cache.invalidate("never-seen")  # nothing to forget: no error
        a = await cache.get("a")
        await cache.get("b")
        assert len(cache) == 2
        cache.invalidate("b")
        assert cache.peek("b") is None  # forgotten, not served
        assert len(cache) == 1 and cache.tokens() == [("a", a)]
        assert cache.drop(lambda k: k == "b") == ["b"] and cache.tokens() == [("a", a)]
        assert cache.drop(lambda k: False) == []

    run(main)


def test_an_expired_token_is_never_served():
    clock, _server, _events, cache = world(100)

    async def main():
        await cache.get("k")
        clock.t += 95  # within EXPIRY_SKEW_SECONDS of its expiry: as good as expired
        assert cache.peek("k") is None

    run(main)


def test_each_change_of_a_cached_token_changes_the_generation():
    """The fast lane keeps a token while the generation stays the same: every change must
    give a value it has not seen."""
    clock, _server, events, cache = world(100, 100, 100)

    async def main():
        seen = [cache.generation]
        await cache.get("k")
        assert await events.next() == "obtained"
        seen.append(cache.generation)
        clock.t += 80
        cache.peek("k")
        assert await events.next() == "refreshed"
        seen.append(cache.generation)
        cache.invalidate("k")
        seen.append(cache.generation)
        await cache.get("k")
        seen.append(cache.generation)
        cache.drop(lambda k: True)
        seen.append(cache.generation)
        assert len(set(seen)) == len(seen), seen

    run(main)


def test_dropping_a_key_cancels_its_fetch_and_keeps_nothing():
    _clock, server, events, cache = world(100, 100)

    async def main():
        server.hold = asyncio.Event()
        waiting = asyncio.ensure_future(cache.get("k"))
        await server.called.wait()
        assert cache.drop(lambda k: True) == ["k"]
        with pytest.raises(asyncio.CancelledError):
            await waiting
        server.hold.set()
        assert events.seen == [] and cache.tokens() == []
        assert (await cache.get("k")).access_token == "t2"  # a new fetch, not the dropped one

    run(main)


def test_a_dropped_fetch_does_not_forget_the_one_started_after_it():
    """drop() cancels a fetch in flight; a get() at once starts a new one. The cancelled
    fetch ends later and must not remove the new one, or a third caller starts a third
    fetch (two: the dropped one and the one everyone shares)."""
    from agent.oauth.cache import TokenCache
    from tests.unit.test_oauth_units import Clock, tok

    clock = Clock()
    calls = 0

    async def main() -> None:
        nonlocal calls
        gate = asyncio.Event()

        async def fetch(key):
            nonlocal calls
            calls += 1
            await gate.wait()
            return tok(clock.t)

        async def settle() -> None:
            for _ in range(3):
                await asyncio.sleep(0)  # lets the other tasks run their next step

        cache = TokenCache(fetch, clock=clock)
        first = asyncio.ensure_future(cache.get("k"))
        await settle()

        async def drop_then_get():
            cache.drop(lambda k: True)
            return await cache.get("k")

        second = asyncio.ensure_future(drop_then_get())
        await settle()
        third = asyncio.ensure_future(cache.get("k"))
        await settle()
        gate.set()
        await asyncio.gather(second, third)
        first.cancel()

    asyncio.run(main())
    assert calls == 2
