"""The pre-fetch on exec (agent/oauth/prewarm.py): one fetch per identity and server however
many execs, a bound on fetches at once, nothing for a process without identity, a refused
server or an unmanaged cgroup, and a failure that leaves the next exec free to try again.

The identity manager and the OAuth service are fakes named as such (FakeIdentities,
FakeTokens): what is tested is the scheduling, on a real event loop in its own thread as the
OAuth service runs it; the end-to-end path is tests/integration/test_prewarm.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from agent.oauth.prewarm import Prewarmer


@dataclass(frozen=True)
class Process:
    tgid: int
    spiffe_id: str | None  # None: matches no entry


class FakeIdentities:
    def __init__(self) -> None:
        self.used: list[int] = []

    def resolve(self, attestation: Process, quiet: bool = False):
        assert quiet, "a pre-fetch never audits a process as denied"
        if attestation.spiffe_id is None:
            return None
        return SimpleNamespace(spiffe_id=attestation.spiffe_id)

    def note_use(self, ident, attestation: Process) -> None:
        self.used.append(attestation.tgid)


class FakeTokens:
    """token() waits until the test opens the gate; counts calls and the most at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fail: bool = False):
        self.loop = loop
        self.fail = fail
        self.held: set[tuple[str, str]] = set()
        self.calls: list[tuple[str, str]] = []
        self.running = self.most = 0
        self.gate = asyncio.Event()

    def cached_token(self, ident, server):
        return object() if (ident.spiffe_id, server) in self.held else None

    async def token(self, ident, server, challenge=None):
        self.calls.append((ident.spiffe_id, server))
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.gate.wait()
            if self.fail:
                raise RuntimeError("the authorization server is down")
            self.held.add((ident.spiffe_id, server))
            return SimpleNamespace(fingerprint="f" * 64)
        finally:
            self.running -= 1


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def on_loop(loop, fn):
    """fn() on the loop, once everything scheduled before it has had its turn."""
    return asyncio.run_coroutine_threadsafe(_call(fn), loop).result(timeout=10)


async def _call(fn):
    await asyncio.sleep(0)
    return fn()


EXEC = SimpleNamespace(source="exec")


def make(loop, servers=("weather",), fail=False, **kw):
    registry = CollectorRegistry()
    tokens = FakeTokens(loop, fail)
    ids = FakeIdentities()
    return Prewarmer(ids, tokens, servers, registry=registry, **kw), tokens, ids, registry


def count(registry, server, outcome) -> float:
    value = registry.get_sample_value(
        "credless_prewarm_total", {"server": server, "outcome": outcome}
    )
    return value or 0.0


def wait(futures) -> None:
    for f in futures:
        f.result(timeout=10)


def test_an_exec_storm_of_one_identity_fetches_once(loop):
    warm, tokens, ids, registry = make(loop)
    futures = []
    for tgid in range(100, 120):
        futures += warm.attested(EXEC, Process(tgid, "spiffe://example.org/bot"))
    on_loop(loop, tokens.gate.set)
    wait(futures)
    assert tokens.calls == [("spiffe://example.org/bot", "weather")]
    assert count(registry, "weather", "fetched") == 1
    assert count(registry, "weather", "coalesced") == 19
    assert ids.used == list(range(100, 120))  # each process uses the identity from its exec
    # once fetched, a later exec finds the token held and fetches nothing
    wait(warm.attested(EXEC, Process(200, "spiffe://example.org/bot")))
    assert len(tokens.calls) == 1 and count(registry, "weather", "cached") == 1


def test_fetches_at_once_are_bounded_across_identities(loop):
    warm, tokens, _ids, registry = make(loop, servers=("a", "b"), concurrency=2)
    futures = []
    for n in range(6):
        futures += warm.attested(EXEC, Process(n, f"spiffe://example.org/bot{n}"))
    on_loop(loop, lambda: None)  # every scheduled fetch has started or queued
    assert tokens.most == 2
    on_loop(loop, tokens.gate.set)
    wait(futures)
    assert len(tokens.calls) == 12 and tokens.most == 2
    assert count(registry, "a", "fetched") == count(registry, "b", "fetched") == 6


@pytest.mark.parametrize(
    ("process", "allowed", "managed"),
    [
        pytest.param(Process(1, None), True, True, id="matches-no-entry"),
        pytest.param(Process(1, "spiffe://example.org/bot"), False, True, id="policy-refuses"),
        pytest.param(Process(1, "spiffe://example.org/bot"), True, False, id="not-managed"),
    ],
)
def test_nothing_is_fetched_for_a_process_that_will_not_call(loop, process, allowed, managed):
    warm, tokens, ids, registry = make(
        loop, allowed=lambda _sid, _server: allowed, managed=lambda _att: managed
    )
    assert warm.attested(EXEC, process) == []
    on_loop(loop, lambda: None)
    assert tokens.calls == []
    assert count(registry, "weather", "denied") == (0 if allowed or not managed else 1)
    assert ids.used == ([1] if managed and process.spiffe_id else [])


def test_a_failed_fetch_is_counted_and_the_next_exec_tries_again(loop):
    warm, tokens, _ids, registry = make(loop, fail=True)
    tokens.gate.set()
    wait(warm.attested(EXEC, Process(1, "spiffe://example.org/bot")))
    assert count(registry, "weather", "failed") == 1
    wait(warm.attested(EXEC, Process(2, "spiffe://example.org/bot")))
    assert len(tokens.calls) == 2 and count(registry, "weather", "failed") == 2


@pytest.mark.parametrize("source", ["fork", "proc"])
def test_only_an_exec_is_a_program_starting(loop, source):
    warm, tokens, ids, _registry = make(loop)
    assert warm.attested(SimpleNamespace(source=source), Process(1, "spiffe://e.org/b")) == []
    on_loop(loop, lambda: None)
    assert tokens.calls == [] and ids.used == []


def test_no_loop_yet_schedules_nothing():
    warm = Prewarmer(FakeIdentities(), SimpleNamespace(loop=None), ["weather"])
    assert warm.attested(EXEC, Process(1, "spiffe://example.org/bot")) == []
