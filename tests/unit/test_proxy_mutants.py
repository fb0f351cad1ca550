"""The full path of the proxy (agent/inject/proxy.py), found by mutation testing: what an
accepted connection is served as (the kernel's record of it, the image and identity it
connected with, its ancestors' identity), what reaches the server for each verdict and what
the workload is answered (refusals, a body read for policy, a policy denial, a token that
cannot be had, the workload's Authorization, DPoP and proxy fields removed, Expect:
100-continue), the image and identity checked again on every request, and what is audited
and counted.

Sans-kernel: the proxy's protocols over stand-in transports (the World of
tests/unit/test_fast_path.py), its ports answered from fields: the redirect record, the
attestor (and the kernel's view of the image), the identities, the token cache, policy.
What a test reads is what the upstream's stand-in received and what the workload's got."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import ssl
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from agent.attest.selectors import Attestation
from agent.config import InjectSection
from agent.identity.entries import Entry
from agent.identity.manager import Identity
from agent.identity.spiffeid import SpiffeId
from agent.inject.flows import ClientSide
from agent.inject.redirect import RedirectInfo
from agent.inject.timeouts import IDLE, SLOW_REQUEST, UPSTREAM
from agent.inject.upstreams import Upstream
from agent.oauth.errors import OAuthError
from agent.oauth.tokens import Token
from agent.policy.rules import Decision
from tests.helpers import run_async as run
from tests.unit import test_tokens_mutants
from tests.unit.test_as_certificate import TlsServer, cas
from tests.unit.test_assertion_seams import FORM, TOKEN_PATH, AsTokens, AsWorld
from tests.unit.test_assertion_seams import server as as_server
from tests.unit.test_decide import parsed
from tests.unit.test_fast_path import (
    BODY,
    INFO,
    RESPONSE,
    SID,
    TOKEN,
    UP,
    FakeIdentities,
    FakeImages,
    NoRedirect,
    World,
    request,
)
from tests.unit.test_full_path_forwarding import _until
from tests.unit.transport import Transport

EXE = "/usr/bin/agent"
OTHER = "spiffe://example.org/other"
PARENT = "spiffe://example.org/parent"
PEER, LOCAL = ("10.1.2.3", 40000), ("127.0.0.1", 15001)
CALL = b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"%s"}}'


# ------------------------------------------------------------------ the ports, answered


def image(exe: str = EXE, tgid: int = INFO.tgid, exec_ns: int = INFO.exec_ns, **kw: Any):
    """An attestation of one process image (the attestor's answer)."""
    fields: dict[str, Any] = dict(
        tgid=tgid,
        exec_ns=exec_ns,
        start_ns=INFO.start_ns,
        ppid=1,
        comm="agent",
        exe=exe,
        sha256=None,
        uid=0,
        gid=0,
        real_uid=0,
        real_gid=0,
        groups=(),
        cgroup_path="/kubepods/pod-1/c-1",
        cgroup_id=INFO.cgroup_id,
        lineage=(),
        selectors=frozenset({"unix:uid:0"}),
    )
    return Attestation(**{**fields, **kw})


class Kernel(FakeImages):
    """The kernel's view of each process (tgid -> (start, exec)), with its change counter
    (mark); each bpf(2) lookup counted."""

    def __init__(self, images: dict[int, tuple[int, int]]):
        super().__init__(None)
        self.images = images
        self.mark: int | None = None
        self.lookups: list[int] = []

    def image_changes(self, tgid: int) -> int | None:
        return self.mark if tgid in self.images else None

    def kernel_image(self, tgid: int) -> tuple[int, int] | None:
        self.lookups.append(tgid)
        return self.images.get(tgid)


class Attestor:
    """The attestor: the image each (tgid, exec_ns) is; each question recorded."""

    def __init__(self, images: dict[tuple[int, int], Attestation]):
        self.images = images
        self.asked: list[tuple[int, int, float]] = []
        self.source = Kernel({})

    def attest_image(self, tgid: int, exec_ns: int, timeout: float = 1.0) -> Attestation | None:
        self.asked.append((tgid, exec_ns, timeout))
        return self.images.get((tgid, exec_ns))

    def ancestors(self, att: Attestation) -> Iterator[Attestation]:
        """The images that started att's, as the table kept them: each asked for (at once,
        timeout 0) in turn, nearest first, only as far as the caller reads."""
        for tgid, exec_ns, _exe in att.lineage:
            self.asked.append((tgid, exec_ns, 0))
            if (tgid, exec_ns) in self.images:
                yield self.images[(tgid, exec_ns)]


def identity(sid: str) -> Identity:
    return Identity(SpiffeId.parse(sid), Entry("e-" + sid.rsplit("/", 1)[1], sid, frozenset()))


class Registry(FakeIdentities):
    """The identities: the SPIFFE ID of each executable; generation: of the registration
    entries (a test moves it); each resolution and use recorded."""

    def __init__(self, ids: dict[str, str]):
        self.ids = ids
        self.generation = 0
        self.resolved: list[tuple[str, bool]] = []
        self.used: list[tuple[str, str]] = []

    def resolve(self, attestation: Attestation, quiet: bool = False) -> Identity | None:
        self.resolved.append((attestation.exe, quiet))
        sid = self.ids.get(attestation.exe)
        return identity(sid) if sid else None

    def note_use(self, ident: Identity, attestation: Attestation) -> None:
        self.used.append((str(ident.spiffe_id), attestation.exe))


class Records(NoRedirect):
    """The kernel's redirect records: the one connection's (or none), written only by the
    process that made it; each lookup and forget recorded."""

    def __init__(self, info: RedirectInfo | None):
        super().__init__()
        self.info = info
        self.asked: list[tuple] = []
        self.forgotten: list[tuple] = []
        self.fail: BaseException | None = None

    def lookup(self, peer, local, netns: int) -> RedirectInfo | None:
        self.asked.append((peer, local, netns))
        if self.fail is not None:
            raise self.fail
        return self.info

    def forget(self, peer, local, info: RedirectInfo) -> None:
        self.forgotten.append((peer, local, info))


class Socket(Transport):
    """An accepted socket's stand-in: its addresses, and TLS when tls."""

    def __init__(self, tls: bool = False):
        super().__init__()
        self.extra = {"peername": PEER, "sockname": LOCAL, "ssl_object": object() if tls else None}

    def get_extra_info(self, name):
        return self.extra.get(name)


class Rules:
    """Policy: denies the tools (or methods, "http:GET") named; each question recorded."""

    def __init__(self, *denied: str):
        self.denied = set(denied)
        self.asked: list[tuple] = []

    def decide(self, sid, server, method, tool, parent, /, args=None, selectors=()) -> Decision:
        self.asked.append((sid, server, method, tool, parent, frozenset(selectors)))
        if tool in self.denied or method in self.denied:
            return Decision(False, "deny-1", f"{tool or method} is denied")
        return Decision(True, "allow-1", "allowed")


class Inline(concurrent.futures.ThreadPoolExecutor):
    """run_in_executor without a thread: the attestation is answered at once."""

    def submit(self, fn, /, *args, **kwargs):
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(fn(*args, **kwargs))  # the fakes' attest_image never raises
        return done


def tokens(w: World, *answers: Token | OAuthError) -> list[str]:
    """The token service fetches (Tokens.token): each answer in turn; the cache holds w.token.
    Returns, in order, for which identity and server the cache was asked and a token fetched."""
    fetched: list[str] = []
    queue = list(answers)
    cached = w.oauth.cached_token

    def cached_token(ident: Identity, server_name: str) -> Token | None:
        fetched.append(f"cache {ident.spiffe_id} {server_name}")
        return cached(ident, server_name)

    async def token(ident: Identity, server_name: str) -> Token:
        fetched.append(f"{ident.spiffe_id} {server_name}")
        answer = queue.pop(0)
        if isinstance(answer, OAuthError):
            raise answer
        return answer

    w.oauth.token = token  # type: ignore[method-assign]
    w.oauth.cached_token = cached_token  # type: ignore[method-assign]
    return fetched


def node(
    info: RedirectInfo | None = INFO,
    ids: dict[str, str] | None = None,
    images: dict[tuple[int, int], Attestation] | None = None,
    up: Upstream = UP,
    tls: bool = False,
    **world: Any,
) -> World:
    """A World whose proxy accepts its client (Proxy.handle): records, attestor and
    identities answered from fields (w.records, w.attestor, w.identities)."""
    records = Records(info)
    attestor = Attestor({(INFO.tgid, INFO.exec_ns): image()} if images is None else images)
    # the kernel's view: the process runs the image it connected with
    attestor.source = Kernel({info.tgid: (info.start_ns, info.exec_ns)} if info else {})
    identities = Registry({EXE: SID} if ids is None else ids)
    w = World(
        redirect=records,
        attestor=attestor,
        identity=identities,
        upstreams={(up.host, up.port): up},
        **world,
    )
    w.records, w.attestor, w.identities = records, attestor, identities  # type: ignore[attr-defined]
    w.client = ClientSide(lambda c: None)
    w.client.connection_made(Socket(tls))
    return w


# ------------------------------------------------------------------ driving it


def get(*fields: bytes) -> bytes:
    return b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n%s\r\n" % b"".join(
        f + b"\r\n" for f in fields
    )


async def accept(w: World, netns: int = 7) -> asyncio.Task:
    """Proxy.handle on w's client, until it waits for a request (or has ended)."""
    asyncio.get_running_loop().set_default_executor(Inline())
    task = asyncio.ensure_future(w.proxy.handle(w.client, netns))
    await _until(lambda: w.client.waiting() is not None or task.done())
    return task


async def coroutine(w: World) -> asyncio.Task:
    """The serving coroutine on w's connection as World made it (no lane offered)."""
    w.client.fast = None
    task = asyncio.ensure_future(w.proxy._serve_requests(w.served))
    await _until(lambda: w.client.waiting() is not None)
    return task


async def turn(w: World, read: bytes, answer: bytes = RESPONSE) -> tuple[bytes, bytes]:
    """read from the workload; the server answers whatever reaches it. What went upstream
    and what the workload got, of this turn."""
    up, out = w.upstream.transport, w.client.transport
    u0, o0 = len(up.out), len(out.out)
    w.client.data_received(read)
    await _until(lambda: len(up.out) > u0 or len(out.out) > o0 or out.closed)
    if len(up.out) > u0:
        w.upstream.data_received(answer)
        await _until(lambda: len(out.out) > o0 or out.closed)
    return up.out[u0:], out.out[o0:]


async def end(w: World, task: asyncio.Task) -> None:
    w.client.eof_received()
    await asyncio.wait_for(task, 5)


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> dict:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


def event_id(answer: bytes) -> str | None:
    """The audit event an answer names (a JSON-RPC error's data, or the plain body's)."""
    shaped = body_of(answer)
    return shaped["error"]["data"]["event_id"] if "jsonrpc" in shaped else shaped["event_id"]


def count(w: World, outcome: str, mode: str = "broker") -> float:
    return (
        w.registry.get_sample_value(
            "credless_injected_requests_total",
            {"server": UP.name, "mode": mode, "outcome": outcome},
        )
        or 0.0
    )


def events(w: World, name: str) -> list[dict]:
    return [e for e in w.audit() if e["event"] == name]


# ------------------------------------------------------------------ accepted connections


@run
async def test_a_connection_without_a_redirect_record_is_audited_and_closed_unanswered():
    w = node(info=None)
    task = await accept(w, netns=42)
    assert task.done()
    assert w.records.asked == [(PEER, LOCAL, 42)]
    assert w.client.transport.closed and w.client.transport.out == b""
    [refused] = events(w, "connection.refused")
    assert refused["peer"] == "10.1.2.3:40000" and refused["listener"] == "127.0.0.1:15001"
    assert refused["netns"] == 42
    assert refused["reason"] == (
        "no redirect record for this connection: it was not redirected by the kernel; closed"
    )
    assert w.records.forgotten == [] and w.attestor.asked == []
    assert w.registry.get_sample_value("credless_proxy_active_connections") == 0


@pytest.mark.parametrize(
    "info,up,tls",
    [
        (dataclasses.replace(INFO, orig_port=9999), UP, False),  # no server configured there
        (dataclasses.replace(INFO, orig_host="127.0.0.2"), UP, False),
        (INFO, UP, True),  # an http server's address, on the TLS listener
        (INFO, dataclasses.replace(UP, scheme="https"), False),  # https in clear
    ],
    ids=["other-port", "other-host", "tls-to-http", "clear-to-https"],
)
@run
async def test_a_connection_to_no_server_or_on_the_wrong_listener_is_closed_unserved(info, up, tls):
    w = node(info=info, up=up, tls=tls)
    task = await accept(w)
    assert task.done()
    assert w.client.transport.closed and w.client.transport.out == b""
    assert w.attestor.asked == []  # never attested, never served
    assert w.records.forgotten == [(PEER, LOCAL, info)]  # its record is let go
    assert w.audit() == []


@run
async def test_an_accepted_connection_is_attested_once_and_its_requests_audited_as_it():
    pod = SimpleNamespace(namespace="team", name="agent-0")
    lineage = ((50, 11, "/bin/sh"), (40, 12, "/usr/bin/orchestrator"), (30, 13, "/usr/bin/x"))
    images = {
        (INFO.tgid, INFO.exec_ns): image(pod=pod, lineage=lineage),
        (40, 12): image("/usr/bin/orchestrator", 40, 12),  # the nearest with an identity
        (30, 13): image("/usr/bin/x", 30, 13),
    }
    w = node(ids={EXE: SID, "/usr/bin/orchestrator": PARENT, "/usr/bin/x": OTHER}, images=images)
    task = await accept(w)
    assert w.registry.get_sample_value("credless_proxy_active_connections") == 1
    # the image, in the executor, with a second to answer; then its ancestors', at once
    assert w.attestor.asked == [(INFO.tgid, INFO.exec_ns, 1.0), (50, 11, 0), (40, 12, 0)]
    assert w.identities.resolved == [(EXE, False), ("/usr/bin/orchestrator", True)]
    assert w.identities.used == [(SID, EXE)]
    sent, answer = await turn(w, request())
    assert answer == RESPONSE and b"Authorization: Bearer header.payload.sig" in sent
    await end(w, task)
    [done] = events(w, "request.injected")
    assert {k: done[k] for k in ("pid", "start_ns", "exe", "cgroup", "spiffe_id", "pod")} == {
        "pid": INFO.tgid,
        "start_ns": INFO.start_ns,
        "exe": EXE,
        "cgroup": "/kubepods/pod-1/c-1",
        "spiffe_id": SID,
        "pod": "team/agent-0",
    }
    assert done["parent_spiffe_id"] == PARENT
    assert done["server"] == "tools" and done["mode"] == "broker"
    assert done["method"] == "POST" and done["path"] == "/mcp" and done["status"] == 200
    assert w.attestor.asked[3:] == []  # nothing changed: not attested again per request
    assert w.records.forgotten == [(PEER, LOCAL, INFO)]
    assert w.client.transport.closed
    assert w.registry.get_sample_value("credless_proxy_active_connections") == 0


@run
async def test_the_policy_is_asked_with_the_parent_and_the_attested_selectors():
    lineage = ((40, 12, "/usr/bin/orchestrator"),)
    images = {
        (INFO.tgid, INFO.exec_ns): image(lineage=lineage, selectors=frozenset({"k8s:ns:team"})),
        (40, 12): image("/usr/bin/orchestrator", 40, 12),
    }
    rules = Rules()
    w = node(ids={EXE: SID, "/usr/bin/orchestrator": PARENT}, images=images, policy=rules)
    task = await accept(w)
    await turn(w, request(body=CALL % (1, b"search")))
    await end(w, task)
    assert rules.asked == [
        (SID, "tools", "tools/call", "search", PARENT, frozenset({"k8s:ns:team"}))
    ]


@pytest.mark.parametrize(
    "info,images",
    [
        (dataclasses.replace(INFO, exec_ns=0), None),  # no exec time: not attested
        (INFO, {}),  # the attestor has no answer
    ],
    ids=["no-exec-ns", "unattestable"],
)
@run
async def test_an_unattested_connection_is_served_as_no_one(info, images):
    w = node(info=info, images=images)
    task = await accept(w)
    sent, answer = await turn(w, request())
    await end(w, task)
    assert sent == b"" and status(answer) == 403
    assert w.attestor.asked == ([] if info.exec_ns == 0 else [(INFO.tgid, INFO.exec_ns, 1.0)])
    assert w.identities.resolved == [] and w.identities.used == []
    [denied] = events(w, "request.denied")
    assert denied["spiffe_id"] is None and denied["exe"] is None and denied["cgroup"] is None
    assert denied["pod"] is None and denied["parent_spiffe_id"] is None
    assert denied["pid"] == INFO.tgid and denied["server"] == "tools"
    assert count(w, "unattested") == 1


@run
async def test_an_attested_process_without_an_entry_is_not_noted_as_using_one():
    w = node(ids={}, images={(INFO.tgid, INFO.exec_ns): image(lineage=((40, 12, "/p"),))})
    task = await accept(w)
    sent, answer = await turn(w, request())
    await end(w, task)
    assert sent == b"" and status(answer) == 403
    assert w.identities.used == [] and w.attestor.asked == [(INFO.tgid, INFO.exec_ns, 1.0)]
    [denied] = events(w, "request.denied")
    assert denied["exe"] == EXE and denied["spiffe_id"] is None
    assert denied["parent_spiffe_id"] is None


@run
async def test_an_ancestor_without_identity_or_attestation_is_passed_over():
    lineage = ((50, 11, "/gone"), (45, 1, "/bin/sh"))
    images = {(INFO.tgid, INFO.exec_ns): image(lineage=lineage), (45, 1): image("/bin/sh", 45, 1)}
    w = node(images=images)
    task = await accept(w)
    await turn(w, request())
    await end(w, task)
    assert events(w, "request.injected")[0]["parent_spiffe_id"] is None
    assert w.identities.resolved == [(EXE, False), ("/bin/sh", True)]


@run
async def test_the_lane_serves_the_next_request_and_gives_its_connection_back_at_the_end():
    w = node()
    task = await accept(w)
    first, _ = await turn(w, get())  # the coroutine: the read came before the lane was asked
    assert first.startswith(b"GET /mcp HTTP/1.1")
    lane_took = w.client.fast is not None and w.client.fast(request())
    assert lane_took and b"Authorization: Bearer" in w.upstream.transport.out
    w.upstream.data_received(RESPONSE)
    await end(w, task)
    assert w.proxy.pool.get(w.key) is w.upstream  # released to the pool, not held


def test_a_connection_to_an_assertion_server_is_given_no_lane_and_ends_cleanly(debug_lines):
    async def body():
        w = node(up=dataclasses.replace(UP, mode="assertion"))
        task = await accept(w)
        assert w.client.fast is None
        await end(w, task)

    asyncio.run(body())
    assert [line for line in debug_lines() if line["level"] == "error"] == []


@pytest.mark.parametrize(
    "read,answered,outcome",
    [
        (b"NOT HTTP\r\n\r\n", 400, "malformed"),
        (b"GET /mcp HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431, "head_too_large"),
    ],
)
@run
async def test_what_cannot_be_framed_is_answered_counted_and_audited_under_its_server(
    read, answered, outcome
):
    w = node()
    task = await accept(w)
    w.client.max_fields = 100
    w.client._reader = type(w.client._reader)(max_fields=100)
    w.client.data_received(read)
    await asyncio.wait_for(task, 5)
    answer = w.client.transport.out
    assert status(answer) == answered and w.client.transport.closed
    assert w.upstream.transport.out == b""
    [denied] = events(w, "request.denied")
    assert denied["server"] == "tools" and denied["status"] == answered
    assert denied["event_id"] == body_of(answer)["event_id"]
    assert count(w, outcome) == 1


@run
async def test_a_tls_failure_is_audited_with_the_peers_port():
    w = node()
    e = ssl.SSLError(1, "bad record")
    e.reason = "WRONG_VERSION_NUMBER"
    w.records.fail = e
    await accept(w)
    [failed] = events(w, "connection.tls_failed")
    assert failed["peer_port"] == PEER[1]
    assert failed["reason"] == "TLS with the workload failed: WRONG_VERSION_NUMBER"
    assert w.client.transport.closed and w.client.transport.out == b""


@pytest.mark.parametrize(
    "fail",
    [ConnectionResetError(), RuntimeError("a bug"), asyncio.CancelledError()],
    ids=["reset", "bug", "cancelled"],
)
@run
async def test_a_connection_that_fails_is_closed_unanswered_and_no_longer_counted(fail):
    w = node()
    w.records.fail = fail
    task = await accept(w)
    assert task.done() and not task.cancelled() and task.exception() is None
    assert w.client.transport.closed and w.client.transport.out == b""
    assert w.audit() == []
    assert w.registry.get_sample_value("credless_proxy_active_connections") == 0


@run
async def test_an_https_server_is_served_on_the_tls_listener():
    up = dataclasses.replace(UP, scheme="https", origin="https://127.0.0.1:8080")
    w = node(up=up, tls=True)
    w.proxy.pool.put((SID, up.host, up.port, "https"), w.upstream)
    task = await accept(w)
    sent, answer = await turn(w, get())
    await end(w, task)
    assert sent.startswith(b"GET /mcp HTTP/1.1") and answer == RESPONSE


@pytest.mark.parametrize("trusted", [True, False], ids=["given-context", "default-context"])
def test_an_https_servers_certificate_is_checked_with_the_context_the_proxy_was_given(
    tmp_path, trusted
):
    async def body():
        ca, _ = cas(tmp_path)
        async with TlsServer(ca, "mcp") as srv:
            srv.routes["/mcp"] = {"jsonrpc": "2.0", "id": 1, "result": {}}
            port = int(srv.url.rsplit(":", 1)[1])
            ctx = ssl.create_default_context(cafile=str(ca.cert_path)) if trusted else None
            w = World(pooled=False, ssl_context=ctx)
            w.served.up = dataclasses.replace(
                UP, scheme="https", host="127.0.0.1", port=port, origin=srv.url
            )
            task = await coroutine(w)
            w.client.data_received(get())
            w.client.eof_received()  # after this request: served, then the coroutine ends
            await asyncio.wait_for(task, 10)
            w.proxy.close()
            return srv.requests, w.client.transport.out

    requests, answer = asyncio.run(body())
    if trusted:  # the CA the proxy was given issued the server's certificate
        assert requests == ["/mcp"] and status(answer) == 200
    else:  # the system's CAs did not: nothing was sent
        assert requests == [] and status(answer) == 502


def test_unattested_passthrough_forwards_a_process_without_identity_as_read():
    cfg = InjectSection(upstream_pool_size=4, upstream_idle_seconds=4.0, unattested="passthrough")

    async def body():
        w = node(ids={}, cfg=cfg)
        w.proxy.pool.put((None, UP.host, UP.port, UP.scheme), w.upstream)  # no identity's
        task = await accept(w)
        sent, answer = await turn(w, request(b"Authorization: Bearer own"))
        await end(w, task)
        # unattested = "passthrough": forwarded bare, as read (the proxy's settings decided)
        assert answer == RESPONSE and b"Authorization: Bearer own\r\n" in sent

    asyncio.run(body())


# ------------------------------------------------------------------ the image, per request


@run
async def test_a_process_that_execd_or_exited_is_closed_unanswered_and_audited():
    for now in [(INFO.start_ns, INFO.exec_ns + 1), None]:
        w = node()
        task = await accept(w)
        if now is None:
            del w.attestor.source.images[INFO.tgid]
        else:
            w.attestor.source.images[INFO.tgid] = now
        sent, answer = await turn(w, request())
        await asyncio.wait_for(task, 5)
        assert sent == b"" and answer == b"" and w.client.transport.closed
        [denied] = events(w, "request.denied")
        assert denied["reason"] == (
            "the process exec'd or exited since it connected; connection closed"
        )
        assert denied["path"] == "/mcp" and denied["spiffe_id"] == SID
        assert count(w, "image_changed") == 1


# The kernel's record at connect (INFO: uid 0, cgroup id 1) against the attestation made at
# exec: what differs, and the reason audited ("": served as the identity).
CHANGED_SINCE_EXEC = [
    ({}, ""),
    ({"uid": 65534, "gid": 65534}, ""),  # effective ids: the record holds the real uid
    (
        {"real_uid": 1000},
        "pid 100 connected as uid 0, but its image was attested as uid 1000: its attestation "
        "no longer describes it; connection closed (make the change before the exec, e.g. "
        "with setpriv or systemd-run, for the program to be attested as what it runs as)",
    ),
    (
        {"cgroup_id": 7},
        "pid 100 connected from another cgroup (id 1) than its image was attested in "
        "(/kubepods/pod-1/c-1, id 7): its attestation no longer describes it; connection "
        "closed (make the change before the exec, e.g. with setpriv or systemd-run, for the "
        "program to be attested as what it runs as)",
    ),
    ({"cgroup_id": 0}, ""),  # no cgroup id attested (outside the agent's namespace)
]


@pytest.mark.parametrize(("attested", "reason"), CHANGED_SINCE_EXEC)
def test_a_process_changed_between_its_exec_and_its_connect_is_served_as_no_one(attested, reason):
    async def body() -> None:
        w = node(images={(INFO.tgid, INFO.exec_ns): image(**attested)})
        task = await accept(w)
        sent, answer = await turn(w, request())
        if not reason:
            assert answer == RESPONSE and b"Authorization: Bearer " in sent
            await end(w, task)
            return
        await asyncio.wait_for(task, 5)
        assert sent == b"" and answer == b"" and w.client.transport.closed
        [denied] = events(w, "request.denied")
        assert denied["reason"] == reason and denied["spiffe_id"] == SID
        assert w.attestor.source.lookups == []  # decided before the kernel is asked

    asyncio.run(body())


@run
async def test_the_kernel_is_asked_again_only_when_the_change_counter_moved():
    w = node()
    kernel = w.attestor.source
    kernel.mark = 3
    task = await accept(w)
    for _ in range(2):
        await turn(w, get())
    assert kernel.lookups == [INFO.tgid]  # the mark kept the first answer
    kernel.mark = 4  # the process changed something: asked again, then kept again
    for _ in range(2):
        await turn(w, get())
    assert kernel.lookups == [INFO.tgid] * 2
    kernel.mark = None  # no counter: asked every time
    for _ in range(2):
        await turn(w, get())
    assert kernel.lookups == [INFO.tgid] * 4
    kernel.mark = 4  # an answer taken without a mark is not kept under the next one
    await turn(w, get())
    assert kernel.lookups == [INFO.tgid] * 5
    await end(w, task)


@run
async def test_an_image_found_changed_is_not_remembered_as_current():
    w = node()
    kernel = w.attestor.source
    kernel.mark = 3
    kernel.images[INFO.tgid] = (INFO.start_ns, INFO.exec_ns + 1)
    task = await accept(w)
    # the lane asks first, then the coroutine: neither may take the first "no" as a mark
    sent, answer = await turn(w, get())
    await asyncio.wait_for(task, 5)
    assert sent == b"" and answer == b"" and w.client.transport.closed
    assert w.client.image_mark is None and set(kernel.lookups) == {INFO.tgid}


REATTESTED = [
    # (the entries now say: exe -> id, the reason audited or None: served)
    ({EXE: SID}, None),
    (
        {EXE: OTHER},
        f"the registration entries changed: the process is now {OTHER}; connection closed",
    ),
    (
        {},
        "the registration entries changed: the process has no identity any more; connection closed",
    ),
]


@pytest.mark.parametrize("ids,reason", REATTESTED, ids=["same", "other", "none"])
@run
async def test_changed_entries_are_read_again_on_the_next_request(ids, reason):
    w = node()
    task = await accept(w)
    w.identities.ids = ids
    w.identities.generation = 1
    sent, answer = await turn(w, request())
    # asked again (by the lane, and by the coroutine when the lane declined), at once
    assert set(w.attestor.asked[1:]) == {(INFO.tgid, INFO.exec_ns, 0)}
    assert set(w.identities.resolved[1:]) == {(EXE, True)}
    if reason is None:  # the same identity: served, and not read again until they change
        assert answer == RESPONSE and b"Authorization: Bearer" in sent
        await turn(w, request())
        assert w.attestor.asked[2:] == []
        await end(w, task)
        return
    await asyncio.wait_for(task, 5)
    assert sent == b"" and answer == b"" and w.client.transport.closed
    [denied] = events(w, "request.denied")
    assert denied["reason"] == reason
    assert count(w, "identity_changed") == 1


@run
async def test_changed_entries_and_an_image_the_attestor_no_longer_knows_revoke():
    w = node()
    task = await accept(w)
    w.attestor.images.clear()
    w.identities.generation = 5
    sent, _ = await turn(w, request())
    await asyncio.wait_for(task, 5)
    assert sent == b""
    assert "has no identity any more" in events(w, "request.denied")[0]["reason"]


# ------------------------------------------------------------------ what reaches the server

# the workload's fields a proxy vouches for, or that carry its own credentials: removed
STRIPPED = [
    b"Authorization: Bearer the-workloads-own",
    b"DPoP: eyJ.workloads.proof",
    b"X-Forwarded-For: 10.9.9.9",
    b"X-Forwarded-Proto: https",
    b"Forwarded: for=10.9.9.9",
    b"X-Real-IP: 10.9.9.9",
    b"X-Original-URL: /admin",
    b"X-Http-Method-Override: DELETE",
]


@pytest.mark.parametrize("field", STRIPPED, ids=lambda f: f.split(b":")[0].decode())
@run
async def test_the_workloads_credentials_and_proxy_fields_are_removed_and_the_token_added(field):
    w = World()
    task = await coroutine(w)
    sent, answer = await turn(w, request(b"Content-Type: application/json", field))
    await end(w, task)
    assert answer == RESPONSE
    head = parsed(sent)
    assert head.get(field.split(b":")[0].lower()) in (None, b"Bearer header.payload.sig")
    assert [v for k, v in head.headers if k.lower() == b"authorization"] == [
        b"Bearer header.payload.sig"
    ]
    assert head.get(b"content-type") == b"application/json"
    assert sent.endswith(b"\r\n\r\n" + BODY)


@run
async def test_a_passthrough_server_gets_the_workloads_fields_and_no_token():
    w = World()
    w.served.up = dataclasses.replace(UP, mode="passthrough")
    task = await coroutine(w)
    sent, answer = await turn(w, request(*STRIPPED))
    await end(w, task)
    assert answer == RESPONSE
    for field in STRIPPED:
        assert field + b"\r\n" in sent
    assert b"header.payload.sig" not in sent and w.asked == 0
    [done] = events(w, "request.forwarded")
    assert done["token_sha256"] is None


@run
async def test_connection_fields_are_the_proxys_own_on_each_side():
    w = World()
    task = await coroutine(w)
    sent, _ = await turn(w, request(b"Connection: keep-alive", b"Keep-Alive: timeout=5"))
    sent2, _ = await turn(w, request(b"Proxy-Connection: keep-alive"))
    await end(w, task)
    for out in (sent, sent2):
        head = parsed(out)
        assert head.get(b"connection") is None and head.get(b"keep-alive") is None
        assert head.get(b"proxy-connection") is None
        assert head.get(b"authorization") == b"Bearer header.payload.sig"


@pytest.mark.parametrize("expect", [b"100-continue", b"100-Continue"])
@run
async def test_a_workload_awaiting_100_continue_is_told_to_go_on_and_the_server_is_not(expect):
    w = World(policy=Rules())
    task = await coroutine(w)
    whole = request(b"Expect: " + expect)
    head, body = whole.split(b"\r\n\r\n")
    w.client.data_received(head + b"\r\n\r\n")
    await _until(lambda: w.client.transport.out != b"")
    assert w.client.transport.out == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert w.upstream.transport.out == b""  # the body is read first (policy)
    sent, answer = await turn(w, body)
    await end(w, task)
    assert answer == RESPONSE
    assert parsed(sent).get(b"expect") is None and sent.endswith(BODY)


@run
async def test_a_body_another_process_wrote_after_its_head_is_not_sent_on():
    """The head is decided (100 Continue), then the kernel marks a write by another process:
    the body that follows is checked again before anything of the request goes upstream."""
    w = World()  # no policy: the body streams, nothing reads it whole first
    task = await coroutine(w)
    head, body = request(b"Expect: 100-continue").split(b"\r\n\r\n")
    w.client.data_received(head + b"\r\n\r\n")
    await _until(lambda: w.client.transport.out != b"")
    w.proxy.redirect.changes, w.proxy.redirect.bits = 1, 1  # a child wrote the body
    w.client.data_received(body)
    with pytest.raises(ConnectionError):  # Proxy.handle closes the workload's connection
        await asyncio.wait_for(task, 5)
    assert w.upstream.transport.out == b""  # nothing of the request went upstream
    [denied] = events(w, "request.denied")
    assert "another process wrote on this connection" in denied["reason"]
    assert count(w, "identity_changed") == 1


@run
async def test_another_expectation_is_not_answered_100():
    w = World()
    task = await coroutine(w)
    _, answer = await turn(w, request(b"Expect: 100-continue-please"))
    await end(w, task)
    assert not answer.startswith(b"HTTP/1.1 100")


@run
async def test_a_token_not_cached_is_fetched_for_the_connections_identity_and_server():
    w = World(token=None)
    fetched = tokens(w, dataclasses.replace(TOKEN, access_token="fetched.payload.sig"))
    task = await coroutine(w)
    sent, answer = await turn(w, request())
    await end(w, task)
    assert fetched == [f"cache {SID} tools", f"{SID} tools"]
    assert parsed(sent).get(b"authorization") == b"Bearer fetched.payload.sig"
    assert answer == RESPONSE


@run
async def test_a_cached_token_is_not_fetched_again():
    w = World()
    fetched = tokens(w)
    task = await coroutine(w)
    await turn(w, request())
    await end(w, task)
    assert fetched == [f"cache {SID} tools"] and w.asked == 1


@pytest.mark.parametrize("closes", [False, True], ids=["keep-alive", "connection-close"])
@run
async def test_a_token_that_cannot_be_had_is_answered_502_and_nothing_goes(closes):
    w = World(token=None)
    fields = (b"Content-Type: application/json",) + ((b"Connection: close",) if closes else ())
    tokens(w, OAuthError("the authorization server said no"), TOKEN)
    task = await coroutine(w)
    sent, answer = await turn(w, request(*fields))
    assert sent == b"" and status(answer) == 502
    rpc = body_of(answer)
    assert rpc["id"] == 1  # the body read for the ids of the answer
    [failed] = events(w, "request.failed")
    assert failed["reason"] == "the authorization server said no"
    assert failed["event_id"] == rpc["error"]["data"]["event_id"]
    assert failed["method"] == "POST" and failed["path"] == "/mcp"
    assert count(w, "token_error") == 1
    if closes:
        await asyncio.wait_for(task, 5)
        return
    sent, answer = await turn(w, request())  # the connection stays open: the next goes
    await end(w, task)
    assert answer == RESPONSE and b"Authorization: Bearer" in sent


@run
async def test_a_dpop_token_on_the_full_path_gets_a_proof_for_this_method_and_url():
    proofs = []

    class Key:
        def proof(self, method: str, url: str, access_token: str | None = None) -> str:
            proofs.append((method, url, access_token))
            return "the-proof"

    keys = []

    def dpop_key(spiffe_id: str) -> Key:
        keys.append(spiffe_id)
        return Key()

    w = World(token=dataclasses.replace(TOKEN, token_type="DPoP", jkt="jkt-1", spiffe_id=OTHER))
    w.oauth.dpop_key = dpop_key  # type: ignore[method-assign]
    task = await coroutine(w)
    sent, _ = await turn(w, request(b"DPoP: workloads", target=b"/mcp/sub?x=1?y=2"))
    await end(w, task)
    head = parsed(sent)
    assert head.get(b"authorization") == b"DPoP header.payload.sig"
    assert [v for k, v in head.headers if k.lower() == b"dpop"] == [b"the-proof"]
    assert proofs == [("POST", "http://127.0.0.1:8080/mcp/sub", "header.payload.sig")]
    assert keys == [OTHER]  # the key of the identity the token was issued to


@run
async def test_each_forwarded_request_is_timed_and_audited_with_its_path_without_query():
    w = World()
    task = await coroutine(w)
    await turn(w, request(target=b"/mcp?secret=1?more=2"))
    await turn(w, get())
    await end(w, task)
    assert w.registry.get_sample_value("credless_proxy_added_seconds_count") == 2
    # the time credless added: from the request's head to its going upstream
    assert 0 <= w.registry.get_sample_value("credless_proxy_added_seconds_sum") < 60
    assert [(e["method"], e["path"]) for e in events(w, "request.injected")] == [
        ("POST", "/mcp"),
        ("GET", "/mcp"),
    ]
    assert "secret" not in w.audit_out.getvalue()


# ------------------------------------------------------------------ refusals by the head

REFUSED = [
    # (read, status, outcome, the connection stays open)
    (request(b"Content-Type: application/json", target=b"/other"), 403, "path_refused", True),
    (request(b"Host: 127.0.0.1:8080"), 400, "framing_refused", False),
    (request(b"Upgrade: websocket", b"Connection: Upgrade"), 501, "upgrade_refused", False),
    (b"PATCH /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n", 405, "method_refused", False),
]


@pytest.mark.parametrize("read,answered,outcome,keep", REFUSED, ids=[r[2] for r in REFUSED])
@run
async def test_a_request_refused_by_its_head_is_answered_counted_audited_and_never_sent(
    read, answered, outcome, keep
):
    w = World()
    task = await coroutine(w)
    sent, answer = await turn(w, read)
    assert sent == b"" and status(answer) == answered
    assert count(w, outcome) == 1
    [denied] = events(w, "request.denied")
    assert denied["status"] == answered and denied["server"] == "tools"
    assert denied["method"] == read.split(b" ")[0].decode()
    assert denied["event_id"] == event_id(answer)
    if outcome == "path_refused":  # a JSON POST: its body read for the id its answer keeps
        assert body_of(answer)["id"] == 1
    if not keep:
        await asyncio.wait_for(task, 5)  # the coroutine ends: the connection is closed
        assert b"Connection: close" in answer.split(b"\r\n\r\n")[0]
        return
    sent, answer = await turn(w, get())  # the next request on the connection is served
    await end(w, task)
    assert answer == RESPONSE and sent.startswith(b"GET /mcp")


@run
async def test_a_get_policy_denies_is_answered_403_and_not_sent():
    w = World(policy=Rules("http:GET"))
    task = await coroutine(w)
    sent, answer = await turn(w, get())
    await end(w, task)
    assert sent == b"" and status(answer) == 403
    assert count(w, "policy_denied") == 1


@pytest.mark.parametrize("max_body", [len(BODY), len(BODY) - 1])
@run
async def test_a_refused_requests_body_is_read_for_its_ids_up_to_the_limit(max_body):
    w = World(max_body=max_body)
    task = await coroutine(w)
    _, answer = await turn(w, request(b"Content-Type: application/json", target=b"/other"))
    await end(w, task)
    assert status(answer) == 403
    assert body_of(answer)["id"] == (1 if max_body == len(BODY) else None)


class Placeholders:
    """Phantom placeholders: "Bearer ph:<SPIFFE ID>" was issued to that ID for tools; each
    misuse the proxy reports recorded."""

    def __init__(self) -> None:
        self.misuses: list[tuple[str, str]] = []

    def binding(self, authorization: bytes):
        if not authorization.startswith(b"Bearer ph:"):
            return None
        return SimpleNamespace(spiffe_id=authorization[10:].decode(), server="tools", jti="p-1")

    def misused(self, found, server: str) -> None:
        self.misuses.append((found.spiffe_id, server))


@run
async def test_a_placeholder_from_another_process_is_refused_reported_and_never_sent():
    phantom = Placeholders()
    w = World(phantom=phantom)
    task = await coroutine(w)
    sent, answer = await turn(w, request(b"Authorization: Bearer ph:" + OTHER.encode()))
    await end(w, task)
    assert sent == b"" and status(answer) == 403
    assert phantom.misuses == [(OTHER, "tools")]
    [misuse] = events(w, "phantom.misuse")
    assert misuse["issued_to"] == OTHER and misuse["spiffe_id"] == SID
    assert count(w, "phantom_misuse") == 1


# ------------------------------------------------------------------ a body read for policy


CHUNKED = request(b"Transfer-Encoding: chunked", body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY))


@pytest.mark.parametrize("read", [CHUNKED, request()], ids=["chunked", "content-length"])
@run
async def test_an_allowed_body_goes_as_read_reframed_with_its_length(read):
    w = World(policy=Rules())
    task = await coroutine(w)
    sent, answer = await turn(w, read)
    await end(w, task)
    assert answer == RESPONSE
    head = parsed(sent)
    assert head.get(b"transfer-encoding") is None and not head.chunked
    assert [v for k, v in head.headers if k.lower() == b"content-length"] == [b"%d" % len(BODY)]
    assert sent.endswith(b"\r\n\r\n" + BODY)
    [allowed] = events(w, "call.allowed")
    assert allowed["tool"] is None and allowed["rpc_method"] == "tools/list"
    assert allowed["path"] == "/mcp" and allowed["spiffe_id"] == SID
    assert "event_id" not in allowed  # nothing answered names it


@pytest.mark.parametrize("audited", [True, False])
@run
async def test_a_body_policy_denies_is_answered_with_its_ids_and_the_event_and_not_sent(audited):
    w = World(policy=Rules("delete"))
    if not audited:
        w.proxy.rec.audit = None
    task = await coroutine(w)
    batch = b"[%s,%s]" % (CALL % (1, b"search"), CALL % (2, b"delete"))
    sent, answer = await turn(w, request(body=batch))
    assert sent == b"" and status(answer) == 403
    errors = body_of(answer)
    assert [e["id"] for e in errors] == [1, 2]
    event_id = errors[0]["error"]["data"].get("event_id")
    assert count(w, "policy_denied") == 1
    if audited:
        calls = events(w, "call.allowed") + events(w, "call.denied")
        assert [c["tool"] for c in calls] == ["search", "delete"]
        assert {c["event_id"] for c in calls} == {event_id} and event_id
        assert events(w, "request.denied") == []  # the calls' records are the refusal's
    else:
        assert event_id is None
    sent, answer = await turn(w, request())  # 403 keeps the connection: the next goes
    await end(w, task)
    assert answer == RESPONSE and sent.endswith(BODY)


@run
async def test_a_body_over_the_limit_is_refused_413_naming_the_limit_and_closes():
    w = World(policy=Rules(), max_body=32)
    task = await coroutine(w)
    sent, answer = await turn(w, request())
    await asyncio.wait_for(task, 5)
    assert sent == b"" and task.done()
    assert answer.startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
    rpc = body_of(answer)
    assert rpc["id"] is None and rpc["error"]["code"] == -32600
    assert rpc["error"]["message"].startswith("credless: request body larger than 32 bytes")
    assert b"Connection: close" in answer.split(b"\r\n\r\n")[0]
    [denied] = events(w, "request.denied")
    assert denied["status"] == 413 and denied["event_id"] == rpc["error"]["data"]["event_id"]
    assert count(w, "body_too_large") == 1


@run
async def test_a_body_at_the_limit_is_read_and_decided():
    w = World(policy=Rules(), max_body=len(BODY))
    task = await coroutine(w)
    sent, answer = await turn(w, request())
    await end(w, task)
    assert answer == RESPONSE and sent.endswith(BODY)


@run
async def test_a_malformed_body_is_refused_with_its_audit_record():
    w = World(policy=Rules())
    task = await coroutine(w)
    sent, answer = await turn(w, request(body=b"{not json"))
    await end(w, task)
    assert sent == b"" and status(answer) == 400
    [denied] = events(w, "call.denied")
    assert denied["event_id"] == body_of(answer)["error"]["data"]["event_id"]


@pytest.mark.parametrize(
    "policy,body,ids",
    [
        (True, BODY, 1),  # read for policy: the answer keeps its id
        (True, b"[%s,%s]" % (CALL % (1, b"a"), CALL % (2, b"b")), [1, 2]),  # a batch's, each
        (False, BODY, None),  # not read: id null
    ],
    ids=["body-read", "batch-read", "body-unread"],
)
@run
async def test_a_server_that_closes_unanswered_is_answered_502_keeping_the_ids_read(
    policy, body, ids
):
    w = World(policy=Rules() if policy else None)
    task = await coroutine(w)
    w.client.data_received(request(b"Content-Type: application/json", body=body))
    await _until(lambda: w.upstream.transport.out != b"")
    w.upstream.connection_lost(None)  # closed before any answer
    await _until(lambda: w.client.transport.out != b"")
    await end(w, task)
    answer = w.client.transport.out
    assert status(answer) == 502
    shaped = body_of(answer)
    assert (shaped["id"] if isinstance(ids, int | None) else [e["id"] for e in shaped]) == ids


@run
async def test_a_token_failure_after_policy_read_the_body_keeps_its_ids():
    # no Content-Type: by its head alone it is no JSON-RPC request, but policy read its calls
    w = World(token=None, policy=Rules())
    tokens(w, OAuthError("no token"))
    task = await coroutine(w)
    sent, answer = await turn(w, request())
    await end(w, task)
    assert sent == b"" and status(answer) == 502 and body_of(answer)["id"] == 1


# ------------------------------------------------------------------ the serving coroutine


@run
async def test_no_fast_path_while_a_request_is_under_way():
    w = World(token=None)
    gate: asyncio.Future = asyncio.get_running_loop().create_future()

    async def token(ident, server_name):
        return await gate

    w.oauth.token = token  # type: ignore[method-assign]
    task = await coroutine(w)
    w.client.data_received(request())
    await _until(lambda: w.client.busy)
    gate.set_result(TOKEN)
    await _until(lambda: w.upstream.transport.out != b"")
    w.upstream.data_received(RESPONSE)
    await _until(lambda: not w.client.busy)  # the lane may take the next read again
    assert w.client.transport.out == RESPONSE
    await end(w, task)


@run
async def test_a_stopping_agent_begins_no_other_request_on_the_connection():
    w = World()
    task = await coroutine(w)
    w.client.data_received(request())
    await _until(lambda: w.upstream.transport.out != b"")
    w.client.drain_and_close()
    w.client.data_received(get())  # queued behind the one under way
    w.upstream.data_received(RESPONSE)
    await asyncio.wait_for(task, 5)
    assert w.client.transport.out == RESPONSE
    assert b"GET" not in w.upstream.transport.out


# ------------------------------------------------------------------ assertion mode


@run
async def test_an_assertion_servers_token_request_goes_through_the_full_path():
    w = AsWorld(AsTokens(as_server()))
    task = await coroutine(w)  # type: ignore[arg-type]
    form = b"grant_type=client_credentials"
    read = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n%s\r\nContent-Length: %d\r\n\r\n%s" % (
        TOKEN_PATH,
        FORM[0],
        len(form),
        form,
    )
    sent, answer = await turn(w, read)  # type: ignore[arg-type]
    await end(w, task)  # type: ignore[arg-type]
    assert b"client_assertion=" in sent and status(answer) == 200
    assert w.identity.audiences == [["http://127.0.0.1:9000"]]  # the issuer, by default


# ------------------------------------------------------------------ timeouts and closing


@run
async def test_a_stalled_upstream_is_aborted_and_the_workload_left_for_its_answer():
    w = World()
    w.client.upstream = w.upstream
    w.proxy.expired(w.client, UPSTREAM)
    assert w.upstream.timed_out and w.upstream.transport.closed
    assert not w.client.transport.closed and w.client.transport.out == b""
    w.client.upstream = None
    w.proxy.expired(w.client, UPSTREAM)  # nothing under way: nothing to do
    assert not w.client.transport.closed


@run
async def test_a_request_that_stopped_arriving_is_answered_408_and_closed():
    w = World()
    w.client.served = (UP, w.served.fragment)
    w.proxy.expired(w.client, SLOW_REQUEST)
    answer = w.client.transport.out
    assert status(answer) == 408 and w.client.transport.closed
    [failed] = events(w, "request.failed")
    seconds = w.proxy.cfg.request_timeout_seconds
    assert failed["reason"] == (
        f"the request stopped arriving for {seconds:g} s; connection closed"
    )
    assert count(w, "request_timeout") == 1


@run
async def test_an_idle_connection_is_closed_unanswered():
    w = World()
    w.proxy.expired(w.client, IDLE)
    assert w.client.transport.closed and w.client.transport.out == b""
    assert w.audit() == []


@run
async def test_closing_the_proxy_closes_its_idle_upstream_connections():
    w = World()
    w.proxy.close()
    assert w.upstream.transport.closed


# ------------------------------------------------------------------ the debug lines

debug_lines = test_tokens_mutants.debug_lines  # the diagnostic stream at debug, parsed


def test_the_debug_lines_say_what_was_accepted_served_and_decided(debug_lines):
    async def body():
        w = node()
        task = await accept(w)
        await turn(w, get(b"Authorization: Bearer own"))  # the lane declines: decided here
        await turn(w, request(target=b"/other?q=1?r=2"))
        await end(w, task)

    asyncio.run(body())
    lines = {(line["event"], line.get("path")): line for line in debug_lines()}
    accepted = lines[("accepted connection", None)]
    assert accepted["peer"] == "10.1.2.3:40000" and accepted["redirected"] == "127.0.0.1:8080"
    assert accepted["pid"] == INFO.tgid
    served = lines[("connection served", None)]
    assert served["server"] == "tools" and served["mode"] == "broker"
    assert served["spiffe_id"] == SID and served["exe"] == EXE and served["pid"] == INFO.tgid
    forwarded = lines[("request decided", "/mcp")]
    assert forwarded["server"] == "tools" and forwarded["method"] == "GET"
    assert forwarded["action"] == "forward" and forwarded["outcome"] is None
    assert forwarded["credential"] is True
    refused = lines[("request decided", "/other")]
    assert refused["method"] == "POST" and refused["outcome"] == "path_refused"
    assert refused["credential"] is False


def test_a_connection_without_a_record_is_logged_as_accepted_with_no_redirect(debug_lines):
    async def body():
        await accept(node(info=None))

    asyncio.run(body())
    [accepted] = [line for line in debug_lines() if line["event"] == "accepted connection"]
    assert accepted["redirected"] is None and accepted["pid"] is None


def test_a_failure_of_the_proxys_own_is_logged_with_its_traceback(debug_lines):
    async def body():
        w = node()
        w.records.fail = RuntimeError("a bug")
        await accept(w)

    asyncio.run(body())
    [failed] = [line for line in debug_lines() if line["event"] == "proxy connection failed"]
    assert failed["level"] == "error" and "RuntimeError: a bug" in failed["exception"]
