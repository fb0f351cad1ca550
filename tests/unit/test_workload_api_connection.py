"""The Workload API's per-connection guard (agent/identity/workload_callers.py): grpclib sees
no byte before the caller is known. And FetchJWTSVID's refusal of audiences that name an
authorization server."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from agent.attest.selectors import Attestation
from agent.identity import workload_callers
from agent.identity.workload_callers import AttestedConnection, Caller


class Transport(asyncio.Transport):
    """A unix socket's transport as the connection uses it; records what it was told."""

    def __init__(self, sock: socket.socket):
        super().__init__()
        self.sock, self.closing = sock, False
        self.calls: list[str] = []

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.sock if name == "socket" else default

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.calls.append("abort")
        self.closing = True

    close = abort


class Inner(asyncio.Protocol):
    """grpclib's protocol, as far as the connection hands it the connection."""

    def __init__(self) -> None:
        self.calls: list[str | bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.calls.append("made")

    def data_received(self, data: bytes) -> None:
        self.calls.append(bytes(data))

    def eof_received(self) -> bool | None:
        self.calls.append("eof")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("lost")


def attestation(pid: int) -> Attestation:
    return Attestation(
        tgid=pid,
        exec_ns=1,
        start_ns=1,
        ppid=1,
        comm="test",
        exe="/usr/bin/test",
        sha256=None,
        uid=os.geteuid(),
        gid=os.getegid(),
        real_uid=os.getuid(),
        real_gid=os.getgid(),
        groups=(),
        cgroup_path="/",
        cgroup_id=1,
        lineage=(),
        selectors=frozenset(),
    )


class Admission:
    """The server's side of a connection (workload_callers.Admission): its caller's attestation
    blocks on a worker thread until released, so the test can act while it is under way."""

    def __init__(self) -> None:
        self.connections: set[AttestedConnection] = set()
        self.callers: dict[asyncio.BaseTransport, Caller] = {}
        self.entered = threading.Event()
        self.release = threading.Event()
        self.asked: list[int] = []

    async def attest_caller(self, pid: int) -> Attestation | None:
        return await asyncio.to_thread(self._attest, pid)

    def _attest(self, pid: int) -> Attestation:
        self.asked.append(pid)
        self.entered.set()
        self.release.wait(10)
        return attestation(pid)


@pytest.fixture
def setup() -> Iterator[tuple[Admission, Transport, Inner]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    api = Admission()
    yield api, Transport(a), Inner()
    api.release.set()
    a.close()
    b.close()


async def _attesting(api: Admission) -> None:
    assert await asyncio.to_thread(api.entered.wait, 10)


async def _settle(conn: AttestedConnection) -> None:
    assert conn._task is not None  # made by connection_made
    await asyncio.wait_for(asyncio.shield(conn._task), 10)


@pytest.mark.parametrize(
    "early, eof",
    [
        ([], False),
        ([b"PRI * HTTP/2.0", b"\r\n\r\nSM"], False),
        ([b"preface"], True),
    ],
)
def test_bytes_before_the_caller_is_known_reach_grpclib_after_it_in_order(setup, early, eof):
    api, transport, inner = setup

    async def run():
        conn = AttestedConnection(api, inner)
        conn.connection_made(transport)
        assert transport.calls == ["pause"]
        for chunk in early:  # a loop that delivers despite the pause
            conn.data_received(chunk)
        if eof:
            assert conn.eof_received() is True  # the transport stays until then
        await _attesting(api)
        assert inner.calls == [] and api.callers == {}
        api.release.set()
        await _settle(conn)
        assert api.asked == [os.getpid()]  # SO_PEERCRED of the socket
        caller = api.callers[transport]
        assert caller.cred.pid == os.getpid() and caller.attestation.tgid == os.getpid()
        want = ["made"] + ([b"".join(early)] if early else [])
        assert inner.calls == want
        assert transport.calls[-1] == ("abort" if eof else "resume")
        conn.data_received(b"later")
        conn.connection_lost(None)
        assert inner.calls[len(want) :] == [b"later", "lost"]
        assert api.callers == {} and api.connections == set()
        assert caller.cred.pidfd is None  # closed with the connection

    asyncio.run(run())


def test_too_much_before_the_caller_is_known_ends_the_connection(setup, monkeypatch):
    api, transport, inner = setup
    monkeypatch.setattr(workload_callers, "_EARLY_BYTES", 8)

    async def run():
        conn = AttestedConnection(api, inner)
        conn.connection_made(transport)
        conn.data_received(b"12345")
        assert "abort" not in transport.calls
        conn.data_received(b"6789")
        assert transport.calls[-1] == "abort"
        api.release.set()
        await _settle(conn)
        assert inner.calls == [] and api.callers == {}
        conn.connection_lost(None)

    asyncio.run(run())


def test_a_connection_lost_while_its_caller_is_attested_never_reaches_grpclib(setup):
    api, transport, inner = setup

    async def run():
        conn = AttestedConnection(api, inner)
        conn.connection_made(transport)
        await _attesting(api)
        transport.closing = True
        conn.connection_lost(None)
        api.release.set()
        with pytest.raises(asyncio.CancelledError):
            await _settle(conn)
        assert inner.calls == [] and api.callers == {} and api.connections == set()

    asyncio.run(run())


class SetuidAdmission(Admission):
    """The process as attested after it exec'd a setuid program: other effective ids than
    the ones SO_PEERCRED took at connect(2)."""

    def __init__(self, uid: int, gid: int) -> None:
        super().__init__()
        self.ids = uid, gid

    def _attest(self, pid: int) -> Attestation:
        att = super()._attest(pid)
        return dataclasses.replace(att, uid=self.ids[0], gid=self.ids[1])


@pytest.mark.parametrize("changed", ["uid", "gid"])
def test_a_caller_whose_ids_changed_since_it_connected_is_served_unattested(setup, changed):
    _, transport, inner = setup
    uid, gid = os.geteuid(), os.getegid()
    api = SetuidAdmission(
        uid + 1 if changed == "uid" else uid, gid + 1 if changed == "gid" else gid
    )

    async def run():
        conn = AttestedConnection(api, inner)
        conn.connection_made(transport)
        api.release.set()
        await _settle(conn)
        # served (grpclib answers every call PermissionDenied), as no identity at all
        assert api.callers[transport].attestation is None
        assert inner.calls == ["made"]
        conn.connection_lost(None)

    asyncio.run(run())


# FetchJWTSVID's refusal of audiences naming an authorization server credless uses: the
# JWT-SVID would be exactly the client assertion credless sends (issue 15, item 3).
AS = ["https://as.example.com/realms/mcp", "http://127.0.0.1:8444"]
AUDIENCES = {
    "the issuer": (["https://as.example.com/realms/mcp"], True),
    "the issuer with a trailing slash": (["https://as.example.com/realms/mcp/"], True),
    "its token endpoint": (["https://as.example.com/realms/mcp/protocol/token"], True),
    "another endpoint on its origin": (["https://AS.example.com:443/register"], True),
    "a loopback AS by its token endpoint": (["http://127.0.0.1:8444/token"], True),
    "one of several audiences": (["https://api.example.com", "http://127.0.0.1:8444"], True),
    "another service": (["https://api.example.com/"], False),
    "the AS's host on another port": (["https://as.example.com:8443/token"], False),
    "the same host over http": (["http://as.example.com/realms/mcp/protocol/token"], False),
    "a name that is not a URL": (["spiffe://example.org/service"], False),
}


@pytest.mark.parametrize("audience,refused", AUDIENCES.values(), ids=AUDIENCES.keys())
def test_an_audience_naming_an_authorization_server_is_recognised(audience, refused):
    from agent.identity.workload_api import names_an_as

    assert (names_an_as(audience, AS) is not None) is refused
