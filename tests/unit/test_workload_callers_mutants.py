"""Who a Workload API connection is served as (agent/identity/workload_callers.py), at the
edges mutation testing found unpinned: a process that died (its pid free for reuse) between
SO_PEERCRED and its attestation is served unattested; an attestation that fails ends the
connection and is logged with the pid; a caller whose ids changed is a warning naming both;
grpclib is handed the very transport, and the reason the connection was lost; the early
bytes' limit is inclusive. Also FetchJWTSVID's audience check (names_an_as) for audiences
with userinfo and identifiers that are not URLs.

Sans-kernel: the connection over a socketpair (SO_PEERCRED names this process) with the
stand-ins of tests/unit/test_workload_api_connection.py."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import structlog

from agent.identity import workload_callers
from agent.identity.workload_api import names_an_as
from agent.identity.workload_callers import AttestedConnection
from agent.observe import logging as obs
from agent.peercred import PeerCred
from tests.unit.test_workload_api_connection import (
    Admission,
    Inner,
    SetuidAdmission,
    _settle,
    setup,  # noqa: F401 - the fixture
)


@pytest.fixture
def logged() -> Iterator[list[MutableMapping[str, Any]]]:
    """The diagnostic events logged during the test, debug included (structlog's capture;
    configured first, as the other logging tests leave it, into a buffer)."""
    obs.configure(level="debug", fmt="json", stream=io.StringIO())
    with structlog.testing.capture_logs() as captured:
        yield captured
    obs.configure(level="info", fmt="json", stream=io.StringIO())


class Recording(Inner):
    """grpclib's protocol, recording the transport it was given and the loss's reason."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: object = None
        self.lost: list[Exception | None] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)
        super().connection_lost(exc)


def test_grpclib_is_handed_the_connection_s_transport_and_the_reason_it_was_lost(setup):
    api, transport, _ = setup
    inner = Recording()

    async def run() -> None:
        conn = AttestedConnection(api, inner)
        conn.connection_made(transport)
        api.release.set()
        await _settle(conn)
        assert inner.transport is transport
        reason = ConnectionResetError("peer reset")
        conn.connection_lost(reason)
        assert inner.lost == [reason]

    asyncio.run(run())


class DeadCred(PeerCred):
    """SO_PEERCRED's process, exited by the time its attestation is back (the pidfd shows
    no pid): whoever the attestation describes may be another process with that pid."""

    def alive(self) -> bool:
        return False


@pytest.mark.parametrize("dead", [True, False])
def test_a_caller_that_died_before_its_attestation_came_back_is_served_unattested(
    setup, monkeypatch, logged, dead
):
    api, transport, inner = setup
    real = workload_callers.peer_cred

    def peer_cred(sock):
        cred = real(sock)
        return DeadCred(cred.pid, cred.uid, cred.gid, cred.pidfd) if dead else cred

    monkeypatch.setattr(workload_callers, "peer_cred", peer_cred)

    async def run() -> None:
        conn = AttestedConnection(api, inner)
        conn.connection_made(transport)
        api.release.set()
        await _settle(conn)
        caller = api.callers[transport]
        assert (caller.attestation is None) is dead
        assert inner.calls == ["made"]  # served: grpclib refuses each of its calls
        conn.connection_lost(None)

    asyncio.run(run())
    (event,) = [e for e in logged if e["event"].startswith("Workload API caller ")]
    assert event["log_level"] == "debug"
    assert event["pid"] == os.getpid() and event["uid"] == os.geteuid()
    if dead:
        assert event["event"] == "Workload API caller unattested"
        assert event["exe"] is None and event["cgroup"] is None
    else:
        assert event["event"] == "Workload API caller attested"
        assert (event["exe"], event["cgroup"]) == ("/usr/bin/test", "/")


class FailingAdmission(Admission):
    def _attest(self, pid: int):
        raise RuntimeError("attestor broke")


def test_an_attestation_that_fails_ends_the_connection_and_is_logged_with_the_pid(setup, logged):
    _, transport, inner = setup
    api = FailingAdmission()

    async def run() -> None:
        conn = AttestedConnection(api, inner)
        conn.connection_made(transport)
        await _settle(conn)
        assert transport.calls[-1] == "abort"
        assert inner.calls == [] and api.callers == {}

    asyncio.run(run())
    (event,) = [e for e in logged if e["log_level"] == "error"]
    assert event["event"] == "attesting a Workload API caller failed"
    assert event["pid"] == os.getpid()


def test_a_caller_whose_ids_changed_is_a_warning_naming_both(setup, logged):
    _, transport, inner = setup
    uid, gid = os.geteuid(), os.getegid()
    api = SetuidAdmission(uid + 1, gid + 2)

    async def run() -> None:
        conn = AttestedConnection(api, inner)
        conn.connection_made(transport)
        api.release.set()
        await _settle(conn)
        assert api.callers[transport].attestation is None
        conn.connection_lost(None)

    asyncio.run(run())
    (event,) = [e for e in logged if e["log_level"] == "warning"]
    assert event["event"] == (
        "Workload API caller changed its credentials since it connected; unattested"
    )
    assert (event["pid"], event["connect_uid"], event["connect_gid"]) == (os.getpid(), uid, gid)
    assert (event["uid"], event["gid"]) == (uid + 1, gid + 2)
    (debug,) = [e for e in logged if e["log_level"] == "debug"]
    assert debug["event"] == "Workload API caller unattested"


def test_early_bytes_up_to_the_limit_are_held(setup, monkeypatch):
    api, transport, inner = setup
    monkeypatch.setattr(workload_callers, "_EARLY_BYTES", 8)

    async def run() -> None:
        conn = AttestedConnection(api, inner)
        conn.connection_made(transport)
        conn.data_received(b"12345678")  # exactly the limit
        assert "abort" not in transport.calls
        api.release.set()
        await _settle(conn)
        assert inner.calls == ["made", b"12345678"]
        conn.connection_lost(None)

    asyncio.run(run())


def test_writing_pauses_reach_grpclib_only_once_it_has_the_connection(setup):
    api, transport, _ = setup

    class Writes(Inner):
        def pause_writing(self) -> None:
            self.calls.append("pause")

        def resume_writing(self) -> None:
            self.calls.append("resume")

    inner = Writes()

    async def run() -> None:
        conn = AttestedConnection(api, inner)
        conn.connection_made(transport)
        conn.pause_writing()
        conn.resume_writing()
        api.release.set()
        await _settle(conn)
        conn.pause_writing()
        conn.resume_writing()
        assert inner.calls == ["made", "pause", "resume"]
        conn.connection_lost(None)

    asyncio.run(run())


# ------------------------------------------------------------------ names_an_as's edges

AS = "https://as.example.com/realms/mcp"


@pytest.mark.parametrize(
    "audience,servers,refused",
    [
        # userinfo changes nothing of the host a URL names, on either side
        (["https://anyone@as.example.com/token"], [AS], True),
        (["https://a:b@as.example.com/realms/mcp"], [AS], True),
        (["https://as.example.com/token"], ["https://client@as.example.com/realms/mcp"], True),
        # an identifier that is not an http(s) URL: itself, up to a trailing slash
        (["urn:example:as"], ["urn:example:as/"], True),
        (["urn:example:as/"], ["urn:example:as"], True),
        (["urn:example:as "], ["urn:example:as"], False),
        (["urn:example:as"], ["urn:example:as "], False),
        (["urn:example:asX"], ["urn:example:as"], False),
        (["urn:example:as"], ["urn:example:asX"], False),
        (["/urn:example:as"], ["urn:example:as"], False),
        (["urn:example:as"], ["/urn:example:as"], False),
    ],
)
def test_an_audience_names_an_as_by_its_host_or_its_very_identifier(audience, servers, refused):
    named = names_an_as(audience, servers)
    assert (named is not None) is refused
    if refused:
        assert named == (audience[0], servers[0])
