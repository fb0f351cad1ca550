"""The Workload API's per-connection guard: grpclib sees no byte before the caller is known."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from agent.identity import workload_api
from agent.identity.workload_api import _Connection


class Transport:
    def __init__(self, sock: socket.socket):
        self.sock, self.calls, self.closing = sock, [], False

    def get_extra_info(self, name):
        return self.sock if name == "socket" else None

    def pause_reading(self):
        self.calls.append("pause")

    def resume_reading(self):
        self.calls.append("resume")

    def is_closing(self):
        return self.closing

    def abort(self):
        self.calls.append("abort")
        self.closing = True

    close = abort


class Inner:
    def __init__(self):
        self.calls = []

    def connection_made(self, transport):
        self.calls.append("made")

    def data_received(self, data):
        self.calls.append(bytes(data))

    def eof_received(self):
        self.calls.append("eof")

    def connection_lost(self, exc):
        self.calls.append("lost")


class Attestor:
    """attest() blocks until released, so the test can act while a caller is attested."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.asked: list[int] = []

    def attest(self, pid, timeout=None):
        self.asked.append(pid)
        self.entered.set()
        self.release.wait(10)
        return SimpleNamespace(tgid=pid, exec_ns=1)


@pytest.fixture
def setup():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pool = ThreadPoolExecutor(2)
    api = SimpleNamespace(_connections=set(), _callers={}, _pool=pool, attestor=Attestor())
    yield api, Transport(a), Inner()
    api.attestor.release.set()
    pool.shutdown()
    a.close()
    b.close()


async def _attesting(api) -> None:
    assert await asyncio.to_thread(api.attestor.entered.wait, 10)


async def _settle(conn: _Connection) -> None:
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
        conn = _Connection(api, inner)
        conn.connection_made(transport)
        assert transport.calls == ["pause"]
        for chunk in early:  # a loop that delivers despite the pause
            conn.data_received(chunk)
        if eof:
            assert conn.eof_received() is True  # the transport stays until then
        await _attesting(api)
        assert inner.calls == [] and api._callers == {}
        api.attestor.release.set()
        await _settle(conn)
        assert api.attestor.asked == [os.getpid()]  # SO_PEERCRED of the socket
        caller = api._callers[transport]
        assert caller.cred.pid == os.getpid() and caller.attestation.tgid == os.getpid()
        want = ["made"] + ([b"".join(early)] if early else [])
        assert inner.calls == want
        assert transport.calls[-1] == ("abort" if eof else "resume")
        conn.data_received(b"later")
        conn.connection_lost(None)
        assert inner.calls[len(want) :] == [b"later", "lost"]
        assert api._callers == {} and api._connections == set()
        assert caller.cred.pidfd is None  # closed with the connection

    asyncio.run(run())


def test_too_much_before_the_caller_is_known_ends_the_connection(setup, monkeypatch):
    api, transport, inner = setup
    monkeypatch.setattr(workload_api, "_EARLY_BYTES", 8)

    async def run():
        conn = _Connection(api, inner)
        conn.connection_made(transport)
        conn.data_received(b"12345")
        assert "abort" not in transport.calls
        conn.data_received(b"6789")
        assert transport.calls[-1] == "abort"
        api.attestor.release.set()
        await _settle(conn)
        assert inner.calls == [] and api._callers == {}
        conn.connection_lost(None)

    asyncio.run(run())


def test_a_connection_lost_while_its_caller_is_attested_never_reaches_grpclib(setup):
    api, transport, inner = setup

    async def run():
        conn = _Connection(api, inner)
        conn.connection_made(transport)
        await _attesting(api)
        transport.closing = True
        conn.connection_lost(None)
        api.attestor.release.set()
        with pytest.raises(asyncio.CancelledError):
            await _settle(conn)
        assert inner.calls == [] and api._callers == {} and api._connections == set()

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
