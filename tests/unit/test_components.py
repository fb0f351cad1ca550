"""The injection path as the agent starts and stops it (agent/inject/components.py): the
redirect before the proxy, what each tells the other, what a handover changes, and how the
proxy follows its servers' DNS answers.

The components around them (the Redirector, the listeners, the resolver, the proxy) are
stood in for by recorders: what is checked is the order and content of the calls the
agent's start-up and shutdown make, which the kernel suite shows only as a whole."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import structlog.testing

from agent.inject.components import ProxyComponent, RedirectComponent, redirect_targets
from agent.inject.redirect import Target
from agent.inject.upstreams import Upstream


def upstream(host: str, port: int, scheme: str = "http") -> Upstream:
    return Upstream("s", scheme, host, port, f"{scheme}://{host}:{port}", "broker")


PLAIN = {("10.0.0.1", 80): upstream("10.0.0.1", 80)}
BOTH = {
    ("10.0.0.1", 80): upstream("10.0.0.1", 80),
    ("10.0.0.2", 443): upstream("10.0.0.2", 443, "https"),
}


class Calls:
    """One list of every call the stand-ins below receive, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []


class Redirector:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    def start(self) -> None:
        self.calls.log.append(("redirect.start",))

    def stop(self, detach: bool | None = None) -> None:
        self.calls.log.append(("redirect.stop", detach))

    def set_targets(self, targets: set[Target]) -> None:
        self.calls.log.append(("redirect.targets", targets))

    def set_agent_up(self, up: bool) -> None:
        self.calls.log.append(("redirect.agent_up", up))


class Listeners:
    def __init__(self, calls: Calls, name: str) -> None:
        self.calls, self.name = calls, name

    async def start(self) -> None:
        self.calls.log.append((f"{self.name}.start",))

    async def stop(self) -> None:
        self.calls.log.append((f"{self.name}.stop",))


class Proxy:
    def __init__(self, calls: Calls, upstreams: dict) -> None:
        self.calls, self.upstreams = calls, upstreams

    def close(self) -> None:
        self.calls.log.append(("proxy.close",))


class Resolver:
    """Answers each refresh() with the next of `answers` (an exception is raised)."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.asked = 0
        self.done = threading.Event()

    def refresh(self) -> dict:
        self.asked += 1
        answer = self.answers[min(self.asked, len(self.answers)) - 1]
        if self.asked >= len(self.answers):
            self.done.set()
        if isinstance(answer, Exception):
            raise answer
        return answer


def proxy_component(calls: Calls, resolver: Resolver, interval: float, pods: bool = True):
    return ProxyComponent(
        Proxy(calls, dict(PLAIN)),  # type: ignore[arg-type]
        Listeners(calls, "listeners"),  # type: ignore[arg-type]
        Listeners(calls, "pods") if pods else None,  # type: ignore[arg-type]
        Redirector(calls),  # type: ignore[arg-type]
        resolver,  # type: ignore[arg-type]
        interval,
        15443,
    )


async def follow(c: ProxyComponent, resolver: Resolver) -> None:
    """Starts c, waits until its DNS follower has taken all of the resolver's answers, stops
    it. A follower that dies ends the wait too (the resolver is then never asked again) and
    fails here, rather than after the wait's bound."""
    await c.start()
    assert c._dns is not None
    c._dns.add_done_callback(lambda _: resolver.done.set())
    await asyncio.get_running_loop().run_in_executor(None, resolver.done.wait, 10)
    assert not c._dns.done(), "the DNS follower died"
    await c.stop()


def test_each_server_address_is_intercepted_to_the_listener_its_workload_speaks_to():
    assert redirect_targets(BOTH, 15443) == {
        Target("10.0.0.1", 80, 0),  # plain http: the plain listener
        Target("10.0.0.2", 443, 15443),  # https: the TLS listener
    }


def test_the_redirect_attaches_before_it_is_told_its_targets_and_stops_as_configured():
    calls = Calls()
    c = RedirectComponent(Redirector(calls), BOTH, 15443)  # type: ignore[arg-type]
    asyncio.run(c.start())
    asyncio.run(c.stop())
    assert calls.log == [
        ("redirect.start",),
        ("redirect.targets", redirect_targets(BOTH, 15443)),
        ("redirect.stop", None),  # None: as inject.keep_redirect_on_stop says
    ]


def test_a_handed_over_redirect_is_never_detached():
    calls = Calls()
    c = RedirectComponent(Redirector(calls), PLAIN, 15443)  # type: ignore[arg-type]
    c.handed_over = True
    asyncio.run(c.stop())
    assert calls.log == [("redirect.stop", False)]


def test_the_proxy_listens_everywhere_before_the_redirect_calls_the_agent_up_and_back():
    calls = Calls()
    c = proxy_component(calls, Resolver([PLAIN]), 0)

    async def life() -> None:
        await c.start()
        assert c._dns is None  # interval 0: resolved at start only
        await c.stop()

    asyncio.run(life())
    assert calls.log == [
        ("listeners.start",),
        ("pods.start",),
        ("redirect.agent_up", True),
        ("redirect.agent_up", False),
        ("pods.stop",),
        ("listeners.stop",),
        ("proxy.close",),
    ]


def test_without_pod_listeners_and_handed_over_the_new_agent_keeps_the_redirects_up_flag():
    calls = Calls()
    c = proxy_component(calls, Resolver([PLAIN]), 0, pods=False)
    c.handed_over = True
    asyncio.run(c.stop())
    assert calls.log == [("listeners.stop",), ("proxy.close",)]


def test_the_proxy_follows_its_servers_addresses_and_survives_a_failed_resolution():
    calls = Calls()
    moved = {("10.0.0.9", 80): upstream("10.0.0.9", 80)}
    resolver = Resolver([PLAIN, OSError("no DNS"), moved, moved])
    c = proxy_component(calls, resolver, 0.001)
    with structlog.testing.capture_logs() as logs:
        asyncio.run(follow(c, resolver))
    assert resolver.asked >= 4
    changes = [entry for entry in calls.log if entry[0] == "redirect.targets"]
    assert changes == [("redirect.targets", {Target("10.0.0.9", 80, 0)})]  # once, when moved
    assert c.proxy.upstreams == moved
    failed = [e for e in logs if e["event"] == "resolving MCP servers failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "error"
    (changed,) = [e for e in logs if e["event"] == "MCP server addresses changed"]
    assert changed["addresses"] == ["10.0.0.9:80"]
    assert c._dns.cancelled()


def test_stopping_cancels_the_dns_follower_first():
    calls = Calls()
    c = proxy_component(calls, Resolver([PLAIN]), 3600)

    async def life() -> None:
        await c.start()
        task = c._dns
        assert task is not None and not task.done()
        await c.stop()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(life())


def test_a_moved_https_server_is_still_intercepted_to_the_tls_listener():
    calls = Calls()
    moved = {("10.0.0.8", 443): upstream("10.0.0.8", 443, "https")}
    resolver = Resolver([moved, moved])  # the second refresh: the first answer was applied
    c = proxy_component(calls, resolver, 0.001)
    asyncio.run(follow(c, resolver))
    changes = [entry for entry in calls.log if entry[0] == "redirect.targets"]
    assert changes == [("redirect.targets", {Target("10.0.0.8", 443, 15443)})]
