"""The Workload API's calls (agent/identity/workload_api.py, workload_api_servicer.py),
found by mutation testing: which SVIDs a caller gets (only its own connection's identity),
what is refused and with which status (the security header, an unknown or unattested
caller, a process that exec'd or exited since it connected, no matching entry, another
identity's SPIFFE ID, an authorization server as audience, too many calls open), that every
call and every answer of a stream checks its caller again, and what each refusal audits
and tells the caller (the audit event's id, no token, no key).

Sans-kernel: a real WorkloadApiServer (not started), its handlers driven with a stand-in
grpclib stream; the caller is what AttestedConnection would have recorded for the stream's
transport, the attestor and the identity manager are answered from fields (real keys, a
real CA). What a test reads is what the caller gets: the messages sent, or the GRPCError
(status and message) grpclib would answer with; and the audit events and counters. The
last section starts the server on a unix socket in a temporary directory (this process its
only caller, a grpcio client): the socket's mode, the change relay, stop()."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import structlog
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from prometheus_client import CollectorRegistry

from agent.attest.procfs import ProcIds, current_ids
from agent.attest.selectors import Attestation
from agent.identity import workload_api_servicer
from agent.identity.bundle import TrustBundle
from agent.identity.ca import SigningCA
from agent.identity.entries import Entry
from agent.identity.jwt_rotation import JwtSigningKeys
from agent.identity.jwtsvid import JwtSvid, mint_jwt_svid, validate_jwt_svid
from agent.identity.manager import Identity
from agent.identity.proto import workload_pb2 as pb
from agent.identity.spiffeid import SpiffeId, TrustDomain
from agent.identity.workload_api import WorkloadApiServer
from agent.identity.workload_api_servicer import (
    METHODS,
    SERVICE,
    WorkloadApiServicer,
    client_call,
)
from agent.identity.workload_callers import Caller
from agent.identity.x509svid import X509Svid, mint_x509_svid
from agent.observe import logging as obs

TD = TrustDomain("example.org")
WEB, DB = "spiffe://example.org/web", "spiffe://example.org/db"
WEB_EXE, DB_EXE, STRANGER_EXE = "/usr/bin/web", "/usr/bin/db", "/usr/bin/stranger"
WEB_PID, DB_PID = 4101, 4102
AUD = "https://api.example.com"
AS_URL = "https://as.example.com/realms/mcp"
HEADER = {"workload.spiffe.io": "true"}
EVENT = re.compile(r" \(audit event ([0-9a-f]{16})\)$")


def image(pid: int, exe: str, exec_ns: int = 1) -> Attestation:
    return Attestation(
        tgid=pid,
        exec_ns=exec_ns,
        start_ns=1,
        ppid=1,
        comm=exe.rsplit("/", 1)[1],
        exe=exe,
        sha256=None,
        uid=1000 + pid % 100,
        gid=1000,
        real_uid=1000 + pid % 100,
        real_gid=1000,
        groups=(),
        cgroup_path="/",
        cgroup_id=1,
        lineage=(),
        selectors=frozenset(),
    )


class Attestor:
    """The kernel's view of each pid now (None: exited), and who asked."""

    def __init__(self) -> None:
        self.now: dict[int, Attestation | None] = {}
        self.asked: list[tuple[int, float]] = []
        self._asking = threading.Condition()

    def attest(self, pid: int, timeout: float = 1.0) -> Attestation | None:
        with self._asking:
            self.asked.append((pid, timeout))
            self._asking.notify_all()
        return self.now.get(pid)

    async def checked(self, n: int) -> None:
        """Once the callers were checked n times in all (a stream's n-th look, say)."""

        def wait() -> bool:
            with self._asking:
                return self._asking.wait_for(lambda: len(self.asked) >= n, 10)

        assert await asyncio.to_thread(wait)


class Manager:
    """The identity manager: an entry per executable, real SVIDs and keys, and a generation
    moved (under `changed`) by change()."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.generation = 0
        self.ca = SigningCA.generate(TD)
        self.keys = JwtSigningKeys()
        self.entries = {
            WEB_EXE: Entry("web-entry", WEB, frozenset()),
            DB_EXE: Entry("db-entry", DB, frozenset()),
        }
        self.svids: dict[str, X509Svid] = {}
        self.sequence = 7
        self.used: list[tuple[str, int]] = []
        self.jwt_asked: list[tuple[str, list[str]]] = []

    def resolve(self, attestation: Attestation, quiet: bool = False) -> Identity | None:
        entry = self.entries.get(attestation.exe)
        return Identity(SpiffeId.parse(entry.spiffe_id), entry) if entry else None

    def note_use(self, ident: Identity, attestation: Attestation) -> None:
        self.used.append((str(ident.spiffe_id), attestation.tgid))

    def x509_svid(self, ident: Identity) -> X509Svid:
        sid = str(ident.spiffe_id)
        if sid not in self.svids:
            self.svids[sid] = mint_x509_svid(self.ca, ident.spiffe_id)
        return self.svids[sid]

    def jwt_svid(
        self, ident: Identity, audience: list[str], ttl: int | None = None, iss: str | None = None
    ) -> JwtSvid:
        self.jwt_asked.append((str(ident.spiffe_id), list(audience)))
        return mint_jwt_svid(self.keys, ident.spiffe_id, audience)

    def bundle(self) -> TrustBundle:
        return TrustBundle(TD, self.ca.roots, self.keys.published(), sequence=self.sequence)

    def change(self) -> None:
        with self.changed:
            self.generation += 1
            self.changed.notify_all()


class Audit:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, **fields})

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]


@dataclass
class Cred:
    """The connection's peer credentials (agent.peercred.PeerCred) as the server uses them."""

    pid: int
    uid: int
    gid: int
    live: bool = True
    closed: bool = False

    def alive(self) -> bool:
        return self.live

    def close(self) -> None:
        self.closed = True


class Stream:
    """grpclib's server stream as the handlers use it: the request (then the end of the
    client's side), the metadata, the connection's transport, and what was sent."""

    def __init__(self, transport: object, request: Any = None, metadata: Any = HEADER):
        self.peer = SimpleNamespace(_transport=transport)
        self.metadata = metadata
        self._requests = [request]
        self.sent: list[Any] = []
        self.arrived = asyncio.Event()

    async def recv_message(self) -> Any:
        return self._requests.pop(0) if self._requests else None

    async def send_message(self, msg: Any) -> None:
        self.sent.append(msg)
        self.arrived.set()

    async def next(self, n: int) -> Any:
        """The n-th message sent (1-based), once it is."""
        while len(self.sent) < n:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 10)
        return self.sent[n - 1]


class World:
    def __init__(
        self,
        audit: bool = True,
        path: str = "/run/credless/test.sock",
        attestor: Attestor | None = None,
        **kw: Any,
    ) -> None:
        self.attestor = attestor or Attestor()
        self.manager = Manager()
        self.audit = Audit() if audit else None
        self.registry = CollectorRegistry()
        self.servers: list[str] = [AS_URL]
        # each pid's ids now, where they are not its attestation's (a setuid since)
        self.ids: dict[int, ProcIds | None] = {}
        kw.setdefault("ids_now", self.ids_now)
        self.server = WorkloadApiServer(
            path,
            self.manager,
            self.attestor,
            audit=self.audit,  # type: ignore[arg-type]
            registry=self.registry,
            authorization_servers=lambda: self.servers,
            **kw,
        )
        self.handlers = WorkloadApiServicer(self.server).__mapping__()

    def connect(self, pid: int, exe: str | None, live: bool = True) -> object:
        """A connection accepted from `pid`, attested as `exe` (None: unattestable)."""
        transport = object()
        att = image(pid, exe) if exe is not None else None
        if att is not None:
            self.attestor.now[pid] = att
        uid = att.uid if att is not None else 1000 + pid % 100
        self.server.callers[transport] = Caller(Cred(pid, uid, 1000, live), att)  # type: ignore[arg-type]
        return transport

    def ids_now(self, pid: int) -> ProcIds | None:
        """What /proc/<pid>/status would say of a stand-in pid: its attested ids unless
        changed since (`ids`); of a real process (OwnAttestor's), what it says."""
        if pid in self.ids:
            return self.ids[pid]
        if pid not in self.attestor.now:
            return current_ids(pid)
        att = self.attestor.now[pid]
        if att is None:
            return None
        return ProcIds(att.real_uid, att.uid, att.real_gid, att.gid, tuple(att.groups))

    def exec(self, pid: int, exe: str) -> None:
        """The process `pid` runs another program now."""
        old = self.attestor.now[pid]
        assert old is not None
        self.attestor.now[pid] = image(pid, exe, old.exec_ns + 1)

    async def call(self, method: str, stream: Stream) -> None:
        await self.handlers[f"/{SERVICE}/{method}"].func(stream)

    def run(self, method: str, stream: Stream) -> None:
        asyncio.run(self.call(method, stream))

    def refused(self, method: str, stream: Stream) -> GRPCError:
        with pytest.raises(GRPCError) as e:
            self.run(method, stream)
        return e.value

    def count(self, method: str, code: str) -> float:
        v = self.registry.get_sample_value(
            "credless_workload_api_calls_total", {"method": method, "code": code}
        )
        return v or 0.0

    def close(self) -> None:
        self.server._pool.shutdown(wait=True)


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    w.close()


def jwt_request(*audience: str, spiffe_id: str = "") -> pb.JWTSVIDRequest:
    return pb.JWTSVIDRequest(audience=list(audience), spiffe_id=spiffe_id)


def issued(world: World, transport: object, *audience: str, **kw: Any) -> pb.JWTSVID:
    stream = Stream(transport, jwt_request(*audience, **kw))
    world.run("FetchJWTSVID", stream)
    (msg,) = stream.sent
    (svid,) = msg.svids
    return svid


def claims(world: World, token: str, audience: str = AUD) -> JwtSvid:
    b = world.manager.bundle()
    return validate_jwt_svid(token, audience, {TD: b})


def denial(world: World, err: GRPCError) -> dict[str, Any]:
    """The one workload_api.denied event err's message names."""
    m = EVENT.search(err.message or "")
    assert m, err.message
    (event,) = [e for e in world.audit.of("workload_api.denied") if e["event_id"] == m[1]]
    assert event["reason"] == err.message[: m.start()]
    assert event["code"] == err.status.name
    return event


# ------------------------------------------------------------------ FetchJWTSVID: who gets what


def test_each_connection_gets_only_the_identity_it_was_attested_as(world):
    web, db = world.connect(WEB_PID, WEB_EXE), world.connect(DB_PID, DB_EXE)
    for transport, sid, pid, exe in ((web, WEB, WEB_PID, WEB_EXE), (db, DB, DB_PID, DB_EXE)):
        svid = issued(world, transport, AUD, "https://other.example")
        assert svid.spiffe_id == sid
        got = validate_jwt_svid(svid.svid, AUD, {TD: world.manager.bundle()})
        assert str(got.spiffe_id) == sid
        assert got.audience == (AUD, "https://other.example")
        (event,) = world.audit.of("svid.issued")[-1:]
        assert event == {
            "event": "svid.issued",
            "spiffe_id": sid,
            "pid": pid,
            "uid": image(pid, exe).uid,
            "exe": exe,
            "type": "jwt",
            "jti": got.jti,
            "kid": got.kid,
            "audience": [AUD, "https://other.example"],
        }
        assert svid.svid not in repr(world.audit.events)  # the token itself is not audited
    assert world.manager.used == [(WEB, WEB_PID), (DB, DB_PID)]
    assert world.count("FetchJWTSVID", "OK") == 2
    # each connection re-checked its own process, with less time than a connection's attestation
    assert [pid for pid, _ in world.attestor.asked] == [WEB_PID, DB_PID]
    assert all(0 < t < 1.0 for _, t in world.attestor.asked)


def test_asking_for_its_own_spiffe_id_is_answered(world):
    web = world.connect(WEB_PID, WEB_EXE)
    assert issued(world, web, AUD, spiffe_id=WEB).spiffe_id == WEB


def test_asking_for_another_identity_is_refused_and_names_both(world):
    web = world.connect(WEB_PID, WEB_EXE)
    err = world.refused("FetchJWTSVID", Stream(web, jwt_request(AUD, spiffe_id=DB)))
    assert err.status is Status.PERMISSION_DENIED
    assert err.message.startswith(
        f"no identity issued for {DB} to this process: it is {WEB} (registration entry 'web-entry')"
    )
    event = denial(world, err)
    assert event["requested_spiffe_id"] == DB and event["audience"] == [AUD]
    assert event["spiffe_id"] == WEB and event["pid"] == WEB_PID and event["exe"] == WEB_EXE
    assert world.manager.jwt_asked == []
    assert world.count("FetchJWTSVID", "PERMISSION_DENIED") == 1
    assert world.count("FetchJWTSVID", "OK") == 0


@pytest.mark.parametrize("audience", [[], [""], [AUD, ""]])
def test_an_empty_audience_is_refused(world, audience):
    web = world.connect(WEB_PID, WEB_EXE)
    err = world.refused("FetchJWTSVID", Stream(web, jwt_request(*audience)))
    assert err.status is Status.INVALID_ARGUMENT
    assert err.message.startswith("audience must be specified (audit event ")
    assert denial(world, err)["spiffe_id"] == WEB
    assert world.manager.jwt_asked == []


def test_a_call_without_its_request_message_is_refused(world):
    web = world.connect(WEB_PID, WEB_EXE)
    stream = Stream(web, None)
    err = world.refused("FetchJWTSVID", stream)
    assert err.status is Status.INVALID_ARGUMENT
    assert err.message.startswith("the request message is missing (audit event ")
    event = denial(world, err)
    assert event["pid"] == WEB_PID and event["method"] == "FetchJWTSVID"
    assert stream.sent == [] and world.manager.jwt_asked == []


@pytest.mark.parametrize("audience", [[AS_URL], [AUD, AS_URL + "/protocol/openid-connect/token"]])
def test_an_authorization_server_as_audience_is_refused_unless_the_entry_allows_it(world, audience):
    web = world.connect(WEB_PID, WEB_EXE)
    err = world.refused("FetchJWTSVID", Stream(web, jwt_request(*audience)))
    assert err.status is Status.PERMISSION_DENIED
    named = audience[-1]
    assert err.message.startswith(
        f"audience {named!r} is the authorization server {AS_URL!r}, which credless obtains "
        "this identity's tokens from: a JWT-SVID for it would let the workload get tokens "
        "past credless's policy, DPoP binding and audit. Call the MCP server through "
        "credless instead, or set authorization_server_audience = true on the registration "
        "entry 'web-entry' if this workload must talk to it itself (audit event "
    )
    event = denial(world, err)
    assert event["authorization_server"] == AS_URL and event["audience"] == audience
    assert world.manager.jwt_asked == []

    entry = world.manager.entries[WEB_EXE]
    world.manager.entries[WEB_EXE] = Entry(
        entry.id, entry.spiffe_id, entry.selectors, authorization_server_audience=True
    )
    assert issued(world, web, *audience).spiffe_id == WEB


def test_the_authorization_servers_are_read_at_each_call(world):
    web = world.connect(WEB_PID, WEB_EXE)
    assert issued(world, web, "https://late.example/token").spiffe_id == WEB
    world.servers.append("https://late.example")  # discovered since
    err = world.refused("FetchJWTSVID", Stream(web, jwt_request("https://late.example/token")))
    assert err.status is Status.PERMISSION_DENIED
    assert denial(world, err)["authorization_server"] == "https://late.example"


# ------------------------------------------------------------------ authorize: every call


@pytest.mark.parametrize(
    "metadata", [None, {}, {"workload.spiffe.io": "false"}, {"workload.spiffe.io": b"true"}]
)
def test_a_call_without_the_security_header_is_refused(world, metadata):
    web = world.connect(WEB_PID, WEB_EXE)
    err = world.refused("FetchJWTSVID", Stream(web, jwt_request(AUD), metadata=metadata))
    assert err.status is Status.INVALID_ARGUMENT
    assert err.message.startswith(
        "security header missing from request: send metadata workload.spiffe.io: true "
    )
    event = denial(world, err)
    assert event["pid"] == WEB_PID and event["spiffe_id"] is None
    assert world.manager.jwt_asked == [] and world.manager.used == []
    assert world.count("FetchJWTSVID", "INVALID_ARGUMENT") == 1


def test_a_call_on_no_known_connection_is_refused(world):
    world.connect(WEB_PID, WEB_EXE)
    err = world.refused("FetchJWTSVID", Stream(object(), jwt_request(AUD)))
    assert err.status is Status.PERMISSION_DENIED
    assert err.message.startswith(
        "connect through the Workload API socket /run/credless/test.sock (audit event "
    )
    event = denial(world, err)
    assert event["pid"] is None and event["exe"] is None
    # nor a stream whose peer has no transport at all
    err = world.refused("FetchJWTSVID", Stream(None, jwt_request(AUD)))
    assert err.status is Status.PERMISSION_DENIED
    assert world.manager.jwt_asked == []


def test_an_unattested_or_vanished_caller_is_refused(world):
    unattested = world.connect(WEB_PID, None)
    err = world.refused("FetchJWTSVID", Stream(unattested, jwt_request(AUD)))
    assert err.status is Status.PERMISSION_DENIED
    assert err.message.startswith(
        "no identity issued: the calling process could not be attested (audit event "
    )
    assert denial(world, err)["pid"] == WEB_PID  # from its peer credentials

    gone = world.connect(DB_PID, DB_EXE, live=False)
    err = world.refused("FetchJWTSVID", Stream(gone, jwt_request(AUD)))
    assert err.status is Status.PERMISSION_DENIED
    assert "could not be attested" in err.message
    assert world.manager.jwt_asked == []
    assert world.attestor.asked == []  # refused before asking the kernel


@pytest.mark.parametrize("then", ["exec", "exit"])
def test_a_process_that_exec_d_or_exited_since_it_connected_is_refused_at_its_next_call(
    world, then
):
    web = world.connect(WEB_PID, WEB_EXE)
    assert issued(world, web, AUD).spiffe_id == WEB
    if then == "exec":
        world.exec(WEB_PID, WEB_EXE)  # even the same program, exec'd again
    else:
        world.attestor.now[WEB_PID] = None
    err = world.refused("FetchJWTSVID", Stream(web, jwt_request(AUD)))
    assert err.status is Status.PERMISSION_DENIED
    assert err.message.startswith(
        "no identity issued: the calling process has exec'd or exited since it connected; "
        "reconnect (audit event "
    )
    event = denial(world, err)
    assert event["pid"] == WEB_PID and event["exe"] == WEB_EXE  # who connected
    assert event["spiffe_id"] is None
    assert len(world.manager.jwt_asked) == 1 and world.manager.used == [(WEB, WEB_PID)]
    # another connection of the same pid, made after the exec, is attested anew
    if then == "exec":
        again = world.connect(WEB_PID, DB_EXE)
        assert issued(world, again, AUD).spiffe_id == DB


@pytest.mark.parametrize(
    "ids",
    [
        ProcIds(65534, 65534, 65534, 65534, ()),  # dropped to nobody
        ProcIds(1001, 1065534, 1000, 1000, ()),  # effective uid only (seteuid)
        ProcIds(1001, 1001, 1000, 0, ()),  # effective gid only
        ProcIds(0, 1001, 1000, 1000, ()),  # real uid only
        ProcIds(1001, 1001, 5, 1000, ()),  # real gid only
        ProcIds(1001, 1001, 1000, 1000, (5,)),  # supplementary groups only
        None,  # its /proc gone meanwhile
    ],
    ids=["all", "euid", "egid", "ruid", "rgid", "groups", "gone"],
)
def test_a_process_whose_ids_changed_since_its_attestation_is_refused_at_its_next_call(world, ids):
    """The ids are read at each call: its attestation (at exec) made its selectors, and a
    process running as another uid, gid or groups now is no longer what they were made
    from."""
    web = world.connect(WEB_PID, WEB_EXE)
    att = world.attestor.now[WEB_PID]
    assert att is not None
    assert ProcIds(att.real_uid, att.uid, att.real_gid, att.gid, att.groups) == (
        1001,
        1001,
        1000,
        1000,
        (),
    )
    assert issued(world, web, AUD).spiffe_id == WEB
    world.ids[WEB_PID] = ids
    err = world.refused("FetchJWTSVID", Stream(web, jwt_request(AUD)))
    assert err.status is Status.PERMISSION_DENIED
    assert err.message.startswith(
        "no identity issued: the calling process has changed its uid, gid or groups since it "
        "was attested at its exec; make the change before the exec (setpriv, systemd's User=) "
        "for the program to be attested as what it runs as (audit event "
    )
    event = denial(world, err)
    assert event["ids_now"] == (
        {**ids._asdict(), "groups": list(ids.groups)} if ids is not None else None
    )
    assert event["pid"] == WEB_PID and event["spiffe_id"] is None
    assert len(world.manager.jwt_asked) == 1


def test_a_process_whose_pid_died_while_its_ids_were_read_is_refused(world):
    """The ids are read from /proc by pid: if the pidfd says the process is gone after the
    read, they may have been another process's (a reused pid)."""
    web = world.connect(WEB_PID, WEB_EXE)
    caller = world.server.callers[web]
    read = world.ids_now

    def read_then_die(pid: int) -> tuple[int, int, int, int] | None:
        out = read(pid)
        caller.cred.live = False
        return out

    world.server.ids_now = read_then_die
    err = world.refused("FetchJWTSVID", Stream(web, jwt_request(AUD)))
    assert err.status is Status.PERMISSION_DENIED
    assert "changed its uid, gid or groups" in err.message
    assert world.manager.jwt_asked == []


@pytest.mark.parametrize("when", ["exited", "no entry", "other identity"])
def test_a_refusal_names_who_asked_though_the_connection_closed_meanwhile(world, when):
    """The connection is forgotten (its process exited, the socket closed) while the call
    is decided: the audit of the refusal still names the process it was attested as."""
    web = world.connect(WEB_PID, STRANGER_EXE if when == "no entry" else WEB_EXE)
    gone = world.server.callers.copy()

    def lost() -> None:
        world.server.callers.clear()

    if when == "exited":
        attest = world.attestor.attest

        def exiting(pid: int, timeout: float = 1.0) -> Attestation | None:
            attest(pid, timeout)
            lost()
            return None

        world.attestor.attest = exiting  # type: ignore[method-assign]
    elif when == "no entry":
        resolve = world.manager.resolve

        def resolving(attestation: Attestation, quiet: bool = False) -> Identity | None:
            lost()
            return resolve(attestation, quiet)

        world.manager.resolve = resolving  # type: ignore[method-assign]
    else:
        note_use = world.manager.note_use

        def noting(ident: Identity, attestation: Attestation) -> None:
            lost()
            note_use(ident, attestation)

        world.manager.note_use = noting  # type: ignore[method-assign]
    request = jwt_request(AUD, spiffe_id=DB if when == "other identity" else "")
    err = world.refused("FetchJWTSVID", Stream(web, request))
    assert err.status is Status.PERMISSION_DENIED
    assert world.server.callers == {} and gone
    event = denial(world, err)
    assert event["pid"] == WEB_PID
    assert event["exe"] == (STRANGER_EXE if when == "no entry" else WEB_EXE)
    assert event["spiffe_id"] == (WEB if when == "other identity" else None)


def test_a_stream_whose_peer_has_no_transport_is_refused(world):
    """grpclib 0.4 keeps the transport in Peer._transport; had it moved, every call is
    refused, not served and not crashed."""
    world.connect(WEB_PID, WEB_EXE)
    stream = Stream(None, jwt_request(AUD))
    stream.peer = SimpleNamespace()
    err = world.refused("FetchJWTSVID", stream)
    assert err.status is Status.PERMISSION_DENIED
    assert err.message.startswith("connect through the Workload API socket")


def test_a_process_no_entry_matches_is_refused(world):
    stranger = world.connect(WEB_PID, STRANGER_EXE)
    err = world.refused("FetchJWTSVID", Stream(stranger, jwt_request(AUD)))
    assert err.status is Status.PERMISSION_DENIED
    assert err.message.startswith(
        "no identity issued: no registration entry matches this process (audit event "
    )
    event = denial(world, err)
    assert event["exe"] == STRANGER_EXE and event["spiffe_id"] is None
    assert world.manager.used == []


def test_without_an_audit_log_the_refusal_is_its_message_alone():
    w = World(audit=False)
    try:
        err = w.refused("FetchJWTSVID", Stream(w.connect(WEB_PID, STRANGER_EXE), jwt_request(AUD)))
        assert err.status is Status.PERMISSION_DENIED
        assert err.message == "no identity issued: no registration entry matches this process"
        # and an issued SVID is simply not audited
        issued(w, w.connect(DB_PID, DB_EXE), AUD)
    finally:
        w.close()


# ------------------------------------------------------------------ open calls


def test_calls_beyond_max_streams_are_refused_and_each_call_frees_its_place():
    w = World(max_streams=2)
    try:
        web = w.connect(WEB_PID, WEB_EXE)
        w.server.active = 1
        assert issued(w, web, AUD).spiffe_id == WEB  # the second of two
        assert w.server.active == 1
        w.refused("FetchJWTSVID", Stream(web, jwt_request("")))  # a refusal frees it too
        assert w.server.active == 1
        w.server.active = 2
        err = w.refused("FetchJWTSVID", Stream(web, jwt_request(AUD)))
        assert err.status is Status.RESOURCE_EXHAUSTED
        assert err.message.startswith("more than 2 Workload API calls open (audit event ")
        event = denial(w, err)
        assert event["pid"] == WEB_PID and event["method"] == "FetchJWTSVID"
        assert w.count("FetchJWTSVID", "RESOURCE_EXHAUSTED") == 1
        assert w.server.active == 2
        assert len(w.manager.jwt_asked) == 1
    finally:
        w.close()


class Silent(Stream):
    """A call whose request message never comes (the client keeps its side open)."""

    async def recv_message(self) -> Any:
        await asyncio.Event().wait()


@pytest.mark.parametrize(
    "exe,metadata",
    [(None, HEADER), (WEB_EXE, {})],
    ids=["unattested", "no-security-header"],
)
def test_a_call_refused_at_once_never_takes_a_place_among_the_open_ones(world, exe, metadata):
    """Any local process may open calls on the socket: one the checks refuse without an
    attestation (no attested caller, no security header) is refused before it is counted,
    and without waiting for a request it may never send. Before, it held a place: enough
    of them and attested callers got RESOURCE_EXHAUSTED."""
    caller = world.connect(WEB_PID, exe)
    world.server.active = world.server.max_streams  # full: counting would refuse it so
    err = world.refused("FetchJWTSVID", Silent(caller, None, metadata=metadata))
    assert err.status in (Status.PERMISSION_DENIED, Status.INVALID_ARGUMENT)
    assert world.server.active == world.server.max_streams


def test_a_process_no_entry_gives_an_identity_never_takes_a_place(world):
    """Places went to any attested caller, identity or not: a local user could hold them
    all with calls that never send a request, from cgroups of its own making (systemd-run
    --user), each under the per-cgroup bound (found by review, stop 33). Such a caller is
    refused at once, without waiting for a request and without counting."""
    stranger = world.connect(DB_PID + 1, STRANGER_EXE)
    world.server.active = world.server.max_streams  # full: counting would refuse it so
    err = world.refused("FetchJWTSVID", Silent(stranger))
    assert err.status is Status.PERMISSION_DENIED
    assert err.message.startswith(
        "no identity issued: no registration entry matches this process (audit event "
    )
    assert denial(world, err)["exe"] == STRANGER_EXE
    assert world.server.active == world.server.max_streams
    assert world.server.active_by_cgroup == {} and world.attestor.asked == []


def test_a_call_whose_request_never_comes_gives_its_place_back_after_request_wait():
    w = World(request_wait=0.05)
    try:
        web = w.connect(WEB_PID, WEB_EXE)
        for method in ("FetchJWTSVID", "FetchX509SVID"):  # a unary call and a stream
            err = w.refused(method, Silent(web))
            assert err.status is Status.DEADLINE_EXCEEDED
            assert "no request message within 0.05 s" in err.message
            assert w.server.active == 0
            assert w.count(method, "DEADLINE_EXCEEDED") == 1
        assert w.manager.jwt_asked == []  # nothing was issued
    finally:
        w.close()


def test_by_default_256_calls_may_be_open(world):
    web = world.connect(WEB_PID, WEB_EXE)
    world.server.active = 255
    assert issued(world, web, AUD).spiffe_id == WEB
    world.server.active = 256
    err = world.refused("FetchJWTSVID", Stream(web, jwt_request(AUD)))
    assert err.status is Status.RESOURCE_EXHAUSTED
    assert err.message.startswith("more than 256 Workload API calls open")


def in_cgroup(w: World, pid: int, exe: str, cgroup_id: int) -> object:
    """A connection from pid, attested as exe in the cgroup cgroup_id (/pod-<id>)."""
    transport = w.connect(pid, exe)
    att = dataclasses.replace(image(pid, exe), cgroup_id=cgroup_id, cgroup_path=f"/pod-{cgroup_id}")
    w.attestor.now[pid] = att
    caller = w.server.callers[transport]
    w.server.callers[transport] = Caller(caller.cred, att)  # type: ignore[arg-type]
    return transport


def test_one_cgroups_callers_hold_at_most_max_streams_per_cgroup_and_leave_the_rest():
    """A workload's attested processes opening calls that never send a request (or
    streams they never read) could hold every place among max_streams, and every other
    workload on the node got RESOURCE_EXHAUSTED. Forked callers stay in their cgroup, so
    one cgroup's calls are bounded; another cgroup's caller is still served."""
    w = World(max_streams=8, max_streams_per_cgroup=3, request_wait=3600)

    async def scenario() -> tuple[GRPCError, list[str], int]:
        attackers = [in_cgroup(w, 5000 + i, WEB_EXE, 7) for i in range(4)]
        held = [
            asyncio.create_task(w.call("FetchJWTSVID", Silent(t)))
            for t in attackers[:3]  # three processes, one call each
        ]
        while w.server.active < 3:
            await asyncio.sleep(0)
        with pytest.raises(GRPCError) as full:  # a fourth process of the same cgroup
            await w.call("FetchJWTSVID", Stream(attackers[3], jwt_request(AUD)))
        other = in_cgroup(w, DB_PID, DB_EXE, 8)
        stream = Stream(other, jwt_request(AUD))
        await w.call("FetchJWTSVID", stream)
        served = [svid.spiffe_id for msg in stream.sent for svid in msg.svids]
        for t in held:
            t.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        return full.value, served, w.server.active

    try:
        err, served, active_after = asyncio.run(scenario())
        assert err.status is Status.RESOURCE_EXHAUSTED
        assert err.message.startswith(
            "more than 3 Workload API calls open from the cgroup /pod-7: "
        )
        event = denial(w, err)
        assert event["pid"] == 5003 and event["code"] == "RESOURCE_EXHAUSTED"
        assert served == [DB]
        assert active_after == 0 and w.server.active_by_cgroup == {}
    finally:
        w.close()


def test_by_default_64_calls_may_be_open_from_one_cgroup(world):
    web = world.connect(WEB_PID, WEB_EXE)
    world.server.active_by_cgroup[1] = 63
    assert issued(world, web, AUD).spiffe_id == WEB
    assert world.server.active_by_cgroup == {1: 63}
    world.server.active_by_cgroup[1] = 64
    err = world.refused("FetchJWTSVID", Stream(web, jwt_request(AUD)))
    assert err.status is Status.RESOURCE_EXHAUSTED
    assert err.message.startswith("more than 64 Workload API calls open from the cgroup /: ")


# ------------------------------------------------------------------ ValidateJWTSVID


def validate_request(token: str, audience: str = AUD) -> pb.ValidateJWTSVIDRequest:
    return pb.ValidateJWTSVIDRequest(audience=audience, svid=token)


def test_validate_answers_the_token_s_identity_and_claims(world):
    web, db = world.connect(WEB_PID, WEB_EXE), world.connect(DB_PID, DB_EXE)
    token = issued(world, db, AUD).svid
    stream = Stream(web, validate_request(token))
    world.run("ValidateJWTSVID", stream)
    (msg,) = stream.sent
    assert msg.spiffe_id == DB
    got = dict(msg.claims)
    assert got["sub"] == DB and got["aud"] == AUD and got["jti"] == claims(world, token).jti
    assert world.count("ValidateJWTSVID", "OK") == 1


@pytest.mark.parametrize("missing", ["audience", "svid"])
def test_validate_without_audience_or_token_is_refused(world, missing):
    web = world.connect(WEB_PID, WEB_EXE)
    token = issued(world, web, AUD).svid
    request = validate_request(
        "" if missing == "svid" else token, "" if missing == "audience" else AUD
    )
    err = world.refused("ValidateJWTSVID", Stream(web, request))
    assert err.status is Status.INVALID_ARGUMENT
    assert err.message.startswith("audience and svid are required (audit event ")
    assert token not in err.message
    assert denial(world, err)["spiffe_id"] == WEB


def test_validate_refuses_a_token_for_another_audience_without_quoting_it(world):
    web = world.connect(WEB_PID, WEB_EXE)
    token = issued(world, web, "https://elsewhere.example").svid
    err = world.refused("ValidateJWTSVID", Stream(web, validate_request(token)))
    assert err.status is Status.INVALID_ARGUMENT
    assert err.message.startswith("invalid JWT-SVID: ")
    assert token not in err.message and token.split(".")[1] not in err.message
    assert token not in repr(world.audit.events)
    assert world.count("ValidateJWTSVID", "INVALID_ARGUMENT") == 1


def test_validate_is_only_answered_to_an_attested_caller(world):
    token = issued(world, world.connect(WEB_PID, WEB_EXE), AUD).svid
    err = world.refused(
        "ValidateJWTSVID", Stream(world.connect(DB_PID, None), validate_request(token))
    )
    assert err.status is Status.PERMISSION_DENIED
    err = world.refused(
        "ValidateJWTSVID", Stream(world.connect(DB_PID, DB_EXE), validate_request(token), {})
    )
    assert err.status is Status.INVALID_ARGUMENT


def test_validate_without_its_request_message_is_refused(world):
    err = world.refused("ValidateJWTSVID", Stream(world.connect(WEB_PID, WEB_EXE), None))
    assert err.status is Status.INVALID_ARGUMENT
    assert err.message.startswith("the request message is missing")


# ------------------------------------------------------------------ the streams


async def _stream(world: World, method: str, transport: object) -> tuple[Stream, asyncio.Task]:
    stream = Stream(transport, pb.X509SVIDRequest())
    task = asyncio.get_running_loop().create_task(world.call(method, stream))
    await stream.next(1)
    return stream, task


async def _ended(task: asyncio.Task) -> None:
    await asyncio.wait_for(asyncio.shield(task), 10)


def test_x509_stream_sends_the_caller_s_svid_again_at_each_change_until_it_execs(world):
    web = world.connect(WEB_PID, WEB_EXE)
    world.connect(DB_PID, DB_EXE)

    async def run() -> None:
        stream, task = await _stream(world, "FetchX509SVID", web)
        mgr = world.manager
        (svid,) = stream.sent[0].svids
        held = mgr.svids[WEB]
        assert svid.spiffe_id == WEB
        assert svid.x509_svid == held.chain_der() and svid.x509_svid_key == held.key_pkcs8_der()
        assert svid.bundle == mgr.bundle().x509_der()
        assert world.count("FetchX509SVID", "OK") == 1
        # a change that changes nothing of this caller's is not sent again: the stream looks
        # (a second time), and a third time at the next change, having sent nothing more
        mgr.svids[DB] = mint_x509_svid(mgr.ca, SpiffeId.parse(DB))
        mgr.change()
        world.server._wake()
        await world.attestor.checked(2)
        mgr.change()
        world.server._wake()
        await world.attestor.checked(3)
        assert len(stream.sent) == 1
        # ... a rotation of its SVID is
        mgr.svids[WEB] = mint_x509_svid(mgr.ca, SpiffeId.parse(WEB))
        mgr.change()
        world.server._wake()
        second = (await stream.next(2)).svids[0]
        assert second.x509_svid == mgr.svids[WEB].chain_der() != held.chain_der()
        # so is a new bundle
        mgr.sequence += 1
        mgr.change()
        world.server._wake()
        await stream.next(3)
        assert len(stream.sent) == 3 and world.count("FetchX509SVID", "OK") == 3
        # the process execs: the stream ends, refused, at the next change
        world.exec(WEB_PID, WEB_EXE)
        mgr.change()
        world.server._wake()
        with pytest.raises(GRPCError) as e:
            await _ended(task)
        assert e.value.status is Status.PERMISSION_DENIED
        assert "exec'd or exited" in e.value.message
        assert len(stream.sent) == 3
        assert world.server.active == 0

    asyncio.run(run())


def test_each_update_sent_is_logged_naming_the_caller_and_its_entry(world):
    web = world.connect(WEB_PID, WEB_EXE)
    obs.configure(level="debug", fmt="json", stream=io.StringIO())
    try:
        with structlog.testing.capture_logs() as logged:

            async def run() -> None:
                _, task = await _stream(world, "FetchX509Bundles", web)
                world.server._stopping.set()
                world.server._wake()
                await _ended(task)

            asyncio.run(run())
    finally:
        obs.configure(level="info", fmt="json", stream=io.StringIO())
    (event,) = [e for e in logged if e["event"] == "Workload API update sent"]
    assert event["log_level"] == "debug"
    assert (event["method"], event["pid"], event["exe"]) == ("FetchX509Bundles", WEB_PID, WEB_EXE)
    assert (event["spiffe_id"], event["entry"]) == (WEB, "web-entry")


def test_a_stream_checks_its_caller_again_without_any_change(world, monkeypatch):
    """At least every second: an exit is noticed though nothing changed (the wait for a
    change times out). The waits are cut short here; what they asked for is recorded."""
    web = world.connect(WEB_PID, WEB_EXE)
    waits: list[float] = []

    class Asyncio:
        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

        @staticmethod
        def wait_for(aw: Any, timeout: float) -> Any:
            waits.append(timeout)
            return asyncio.wait_for(aw, 0.01)

    monkeypatch.setattr(workload_api_servicer, "asyncio", Asyncio())

    async def run() -> None:
        stream, task = await _stream(world, "FetchX509SVID", web)
        world.attestor.now[WEB_PID] = None
        with pytest.raises(GRPCError) as e:
            await asyncio.wait_for(asyncio.shield(task), 10)
        assert e.value.status is Status.PERMISSION_DENIED
        assert len(stream.sent) == 1
        # checked once when it began, once more when the wait for a change timed out: a
        # quiet stream does not spin
        assert len(world.attestor.asked) == 2

    asyncio.run(run())
    assert waits and all(0 < t <= 1.0 for t in waits)


def test_streams_end_when_the_server_stops(world):
    web = world.connect(WEB_PID, WEB_EXE)

    async def run() -> None:
        stream, task = await _stream(world, "FetchJWTBundles", web)
        world.server._stopping.set()
        world.server._wake()
        await _ended(task)  # no refusal: ended
        assert len(stream.sent) == 1
        assert world.server.stopping

    asyncio.run(run())


@pytest.mark.parametrize("method", ["FetchX509Bundles", "FetchJWTBundles"])
def test_bundle_streams_send_the_bundle_again_when_it_changes(world, method):
    web = world.connect(WEB_PID, WEB_EXE)

    async def run() -> None:
        stream, task = await _stream(world, method, web)
        mgr = world.manager
        first = stream.sent[0]
        assert list(first.bundles) == ["spiffe://example.org"]
        want = (
            mgr.bundle().x509_der()
            if method == "FetchX509Bundles"
            else mgr.bundle().jwt_jwks_json().encode()
        )
        assert first.bundles["spiffe://example.org"] == want
        mgr.change()  # nothing of the bundle changed: not sent again
        world.server._wake()
        mgr.sequence += 1
        mgr.change()
        world.server._wake()
        await stream.next(2)
        assert len(stream.sent) == 2 and world.count(method, "OK") == 2
        world.attestor.now[WEB_PID] = None
        mgr.change()
        world.server._wake()
        with pytest.raises(GRPCError) as e:
            await _ended(task)
        assert e.value.status is Status.PERMISSION_DENIED
        assert world.count(method, "PERMISSION_DENIED") == 1
        assert denial(world, e.value)["method"] == method

    asyncio.run(run())


def test_a_stream_for_an_unknown_caller_sends_nothing(world):
    stream = Stream(object(), pb.X509SVIDRequest())
    err = world.refused("FetchX509SVID", stream)
    assert err.status is Status.PERMISSION_DENIED and stream.sent == []
    assert world.manager.svids == {}


# ------------------------------------------------------------------ the method table


def test_the_method_table_names_the_spiffe_paths_and_message_types(world):
    want = {
        "FetchX509SVID": (Cardinality.UNARY_STREAM, pb.X509SVIDRequest, pb.X509SVIDResponse),
        "FetchX509Bundles": (
            Cardinality.UNARY_STREAM,
            pb.X509BundlesRequest,
            pb.X509BundlesResponse,
        ),
        "FetchJWTSVID": (Cardinality.UNARY_UNARY, pb.JWTSVIDRequest, pb.JWTSVIDResponse),
        "FetchJWTBundles": (Cardinality.UNARY_STREAM, pb.JWTBundlesRequest, pb.JWTBundlesResponse),
        "ValidateJWTSVID": (
            Cardinality.UNARY_UNARY,
            pb.ValidateJWTSVIDRequest,
            pb.ValidateJWTSVIDResponse,
        ),
    }
    assert set(world.handlers) == {f"/SpiffeWorkloadAPI/{m}" for m in want}
    for name, (cardinality, req, resp) in want.items():
        h = world.handlers[f"/SpiffeWorkloadAPI/{name}"]
        assert (h.cardinality, h.request_type, h.reply_type) == (cardinality, req, resp)


class Channel:
    """grpc.Channel as client_call uses it: records which kind of call it made."""

    def _make(self, kind: str):
        def make(path, request_serializer, response_deserializer):
            return (kind, path, request_serializer, response_deserializer)

        return make

    def __getattr__(self, kind: str):
        return self._make(kind)


@pytest.mark.parametrize("method", list(METHODS))
def test_client_call_makes_each_method_s_call(method):
    streaming, req, resp = METHODS[method]
    kind, path, ser, de = client_call(Channel(), method)  # type: ignore[arg-type]
    assert kind == ("unary_stream" if streaming else "unary_unary")
    assert path == f"/SpiffeWorkloadAPI/{method}"
    assert ser == req.SerializeToString and de == resp.FromString


# ------------------------------------------------------------------ the server's own parts


def test_audit_call_names_the_identity_and_the_process(world):
    ident = world.manager.resolve(image(WEB_PID, WEB_EXE))
    world.server.audit_call("svid.issued", ident, image(WEB_PID, WEB_EXE), type="x509")
    assert world.audit.events == [
        {
            "event": "svid.issued",
            "spiffe_id": WEB,
            "pid": WEB_PID,
            "uid": image(WEB_PID, WEB_EXE).uid,
            "exe": WEB_EXE,
            "type": "x509",
        }
    ]


def test_changes_wake_each_waiter_once_and_arm_a_fresh_event(world):
    async def run() -> None:
        first = world.server.changes
        assert not first.is_set()
        world.server._wake()
        assert first.is_set()
        second = world.server.changes
        assert second is not first and not second.is_set()

    asyncio.run(run())


class Changed(threading.Condition):
    """The manager's condition, telling when (and how often) the relay waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        self.waiting.set()
        return super().wait(timeout)


def test_the_relay_started_with_nothing_changed_waits_without_a_wake_up(world):
    woken: list[int] = []

    class Loop:
        def call_soon_threadsafe(self, fn):
            woken.append(world.manager.generation)

    changed = Changed()
    world.manager.changed = changed
    relay = threading.Thread(target=world.server._relay_changes, args=(Loop(),))
    relay.start()
    try:
        assert changed.waiting.wait(10)
        assert woken == []
    finally:
        world.server._stopping.set()
        with changed:
            changed.notify_all()
        relay.join(10)
    assert not relay.is_alive() and woken == []


def test_the_relay_turns_each_manager_change_into_one_wake_up(world):
    """The relay thread: a change made before it first looks wakes the loop without a
    wait; then it waits (it does not spin); the next change wakes the loop again, even
    after a wake-up the loop refused (closing); it ends once the server stops."""
    woken: list[tuple[int, int]] = []
    wake = threading.Event()

    class Loop:
        def call_soon_threadsafe(self, fn):
            assert fn == world.server._wake
            woken.append((world.manager.generation, changed.waits))
            wake.set()
            if len(woken) == 1:
                raise RuntimeError("Event loop is closed")
            world.server._stopping.set()

    class Racing(Manager):
        """Its first change lands right after the relay read its starting point."""

        @property
        def generation(self) -> int:
            g = self._generation
            if self.first:
                self.first, self._generation = False, 1
            return g

        @generation.setter
        def generation(self, value: int) -> None:
            self._generation = value

    changed = Changed()
    world.manager.__class__ = Racing
    world.manager.first = True
    world.manager._generation = 0
    world.manager.changed = changed
    relay = threading.Thread(target=world.server._relay_changes, args=(Loop(),))
    relay.start()
    try:
        assert wake.wait(10)
        assert woken == [(1, 0)]  # at once, no wait
        wake.clear()
        assert changed.waiting.wait(10)  # nothing more changed: it waits
        world.manager.change()
        assert wake.wait(10)
        assert woken[1][0] == 2 and woken[1][1] >= 1 and len(woken) == 2
    finally:
        world.server._stopping.set()
        with changed:
            changed.notify_all()
        relay.join(10)
    assert not relay.is_alive()


def test_a_caller_s_attestation_runs_on_a_worker_thread(world):
    here = threading.get_ident()
    where: list[int] = []

    def attest(pid: int, timeout: float = 1.0) -> Attestation:
        where.append(threading.get_ident())
        return image(pid, WEB_EXE)

    world.attestor.attest = attest  # type: ignore[method-assign]
    att = asyncio.run(world.server.attest_caller(WEB_PID))
    assert att is not None and att.tgid == WEB_PID and where and where[0] != here


# ------------------------------------------------------------------ on a real socket
# The server as started: grpclib on a unix socket in a temporary directory, this process its
# only caller (SO_PEERCRED names it; the attestor answers for it), a grpcio client.


class OwnAttestor(Attestor):
    """This process, attested as WEB_EXE with its own ids (as SO_PEERCRED reads them)."""

    def attest(self, pid: int, timeout: float = 1.0) -> Attestation | None:
        self.asked.append((pid, timeout))
        if pid != os.getpid():
            return None
        return dataclasses.replace(
            image(pid, WEB_EXE, self.exec_ns),
            uid=os.geteuid(),
            gid=os.getegid(),
            real_uid=os.getuid(),
            real_gid=os.getgid(),
            groups=tuple(os.getgroups()),
        )

    exec_ns = 1


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory short enough for a unix socket's path (108 bytes; pytest's tmp_path may
    not be), removed after the test whatever happened."""
    d = tempfile.mkdtemp(prefix="wl-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def served(short_dir: str) -> Iterator[World]:
    d = short_dir
    path = os.path.join(d, "sub", "agent.sock")
    w = World(path=path, attestor=OwnAttestor())
    os.mkdir(os.path.dirname(path))
    with open(path, "w") as f:  # a stale file where the socket goes: replaced
        f.write("stale")
    w.server.start()
    try:
        yield w
    finally:
        w.server.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_the_started_server_answers_the_process_that_connected(served):
    path = str(served.server.socket_path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666  # anyone may connect
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    with grpc.insecure_channel(f"unix:{path}") as channel:
        fetch = client_call(channel, "FetchJWTSVID")
        msg = fetch(jwt_request(AUD), metadata=(("workload.spiffe.io", "true"),), timeout=10)
        (svid,) = msg.svids
        assert svid.spiffe_id == WEB
        assert str(claims(served, svid.svid).spiffe_id) == WEB
        (caller,) = served.server.callers.values()
        assert caller.cred.pid == os.getpid() and caller.attestation.exe == WEB_EXE
        assert served.server.connections and served.server.active == 0
        with pytest.raises(grpc.RpcError) as e:
            fetch(jwt_request(AUD), timeout=10)
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "security header missing" in e.value.details()

        # a stream gets the SVID again when the manager's SVIDs change (the relay thread)
        stream = client_call(channel, "FetchX509SVID")(
            pb.X509SVIDRequest(), metadata=(("workload.spiffe.io", "true"),), timeout=20
        )
        first = next(stream).svids[0]
        served.manager.svids[WEB] = mint_x509_svid(served.manager.ca, SpiffeId.parse(WEB))
        served.manager.change()
        second = next(stream).svids[0]
        assert first.spiffe_id == second.spiffe_id == WEB
        assert second.x509_svid == served.manager.svids[WEB].chain_der() != first.x509_svid
        # the process execs: the stream is refused at the next change
        served.attestor.exec_ns = 2
        served.manager.change()
        with pytest.raises(grpc.RpcError) as e:
            next(stream)
        assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "exec'd or exited" in e.value.details()


class WatchedManager(Manager):
    """A manager that tells when its generation is first read (the relay's starting point)."""

    def __init__(self) -> None:
        self.read = threading.Event()
        super().__init__()

    @property
    def generation(self) -> int:
        self.read.set()
        return self._generation

    @generation.setter
    def generation(self, value: int) -> None:
        self._generation = value


def test_a_change_of_the_manager_wakes_the_started_server_at_once(short_dir: str):
    """Not only at the streams' next check: the relay thread wakes the server's loop."""
    d = short_dir
    w = World(path=os.path.join(d, "agent.sock"), attestor=OwnAttestor())
    w.manager = WatchedManager()
    w.server.manager = w.manager
    w.server.start()
    try:
        loop = w.server._loop
        assert loop is not None
        assert w.manager.read.wait(10)  # the relay has its starting point

        async def changes() -> asyncio.Event:
            return w.server.changes

        pending = asyncio.run_coroutine_threadsafe(changes(), loop).result(10)
        assert not pending.is_set()
        w.manager.change()
        asyncio.run_coroutine_threadsafe(asyncio.wait_for(pending.wait(), 10), loop).result(20)
        assert w.server.changes is not pending
    finally:
        w.server.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_stopping_ends_open_streams_and_forgets_every_caller(served):
    path = str(served.server.socket_path)
    with grpc.insecure_channel(f"unix:{path}") as channel:
        stream = client_call(channel, "FetchJWTBundles")(
            pb.JWTBundlesRequest(), metadata=(("workload.spiffe.io", "true"),), timeout=20
        )
        assert list(next(stream).bundles) == ["spiffe://example.org"]
        (caller,) = served.server.callers.values()
        served.server.stop()
        with pytest.raises(grpc.RpcError) as e:
            next(stream)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE  # the connection closed
    assert not os.path.exists(path)
    assert served.server.callers == {} and caller.cred.pidfd is None
    assert not served.server._thread.is_alive() and not served.server._relay.is_alive()


def test_the_server_makes_the_socket_s_directories(short_dir: str):
    d = short_dir
    try:
        w = World(path=os.path.join(d, "a", "b", "agent.sock"), attestor=OwnAttestor())
        w.server.start()
        try:
            with grpc.insecure_channel(f"unix:{w.server.socket_path}") as channel:
                msg = client_call(channel, "FetchX509Bundles")(
                    pb.X509BundlesRequest(), metadata=(("workload.spiffe.io", "true"),), timeout=10
                )
                assert list(next(msg).bundles) == ["spiffe://example.org"]
        finally:
            w.server.stop()
        assert not os.path.exists(w.server.socket_path)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_the_started_server_says_where_it_listens(short_dir: str):
    d = short_dir
    w = World(path=os.path.join(d, "agent.sock"), attestor=OwnAttestor())
    obs.configure(level="info", fmt="json", stream=io.StringIO())
    try:
        with structlog.testing.capture_logs() as logged:
            w.server.start()
        w.server.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    (event,) = [e for e in logged if e["log_level"] == "info"]
    assert event["event"] == "workload API listening"
    assert event["socket"] == os.path.join(d, "agent.sock")


class StuckAttestor(OwnAttestor):
    """A per-call check (the kernel's answer) that does not come back until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def attest(self, pid: int, timeout: float = 1.0) -> Attestation | None:
        if timeout < 1.0:  # the re-check of a call, not a connection's attestation
            self.entered.set()
            self.release.wait(30)
        return super().attest(pid, timeout)


def test_stopping_does_not_wait_for_a_stuck_attestation(short_dir: str):
    d = short_dir
    attestor = StuckAttestor()
    w = World(path=os.path.join(d, "agent.sock"), attestor=attestor)
    w.server.start()
    answers: list[Any] = []

    def call() -> None:
        with grpc.insecure_channel(f"unix:{w.server.socket_path}") as channel:
            try:
                answers.append(
                    client_call(channel, "FetchJWTSVID")(
                        jwt_request(AUD), metadata=(("workload.spiffe.io", "true"),), timeout=20
                    )
                )
            except grpc.RpcError as e:
                answers.append(e.code())

    caller = threading.Thread(target=call)
    caller.start()
    try:
        assert attestor.entered.wait(10)
        stopping = threading.Thread(target=w.server.stop)
        stopping.start()
        stopping.join(10)
        assert not stopping.is_alive()  # stopped while the attestation is still stuck
        caller.join(10)
        assert answers and answers[0] is not None and not isinstance(answers[0], pb.JWTSVIDResponse)
    finally:
        attestor.release.set()
        caller.join(10)
        shutil.rmtree(d, ignore_errors=True)


def test_a_server_never_started_stops_quietly(world):
    world.server.stop()
    assert world.server.callers == {}


def test_a_server_that_cannot_listen_says_why_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    w = World(path=str(blocker / "agent.sock"))
    with pytest.raises(OSError):
        w.server.start()
    assert not w.server._thread.is_alive()
