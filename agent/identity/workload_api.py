"""The SPIFFE Workload API, served on a unix socket to attested local processes.

Caller identity comes from the kernel, never from the caller: the socket's peer credentials
(SO_PEERCRED, pinned by SO_PEERPIDFD) name the process, the attestor says who it is, the
registration entries say which SPIFFE ID that earns. Every RPC re-checks: a process that
has exec'd another program since it connected, or has exited, gets PermissionDenied. (The
image is pinned when the agent accepts the connection, not at connect(2): a caller that
execs in between is attested as its new image; see issue 15 item 7.)

How the gRPC server knows who is calling: agent/identity/workload_callers.py (each
connection's process attested before grpclib sees a byte of it), which also says what this
design replaced and why. Every refusal (a Denied, wherever it is raised) is audited with
who asked and answered with the audit event's id: agent/identity/workload_denials.py. The
handler of each call, and the method table: agent/identity/workload_api_servicer.py. This
module is the server: its socket, thread and loop, the change relay, and the authorisation
every call passes (who the caller is, which audiences it may not ask for).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from grpclib.const import Status
from prometheus_client import CollectorRegistry, Counter

from agent.attest.procfs import ProcIds, current_ids
from agent.attest.selectors import Attestation
from agent.identity.bundle import TrustBundle
from agent.identity.jwtsvid import JwtSvid
from agent.identity.manager import Identity
from agent.identity.workload_api_servicer import WorkloadApiServicer
from agent.identity.workload_callers import (
    AttestedConnection,
    AttestingServer,
    Caller,
)
from agent.identity.workload_denials import Denied
from agent.identity.x509svid import X509Svid
from agent.observe.logging import AuditLog, get_logger
from agent.urls import origin

log = get_logger("workload_api")

_HEADER = ("workload.spiffe.io", "true")

T = TypeVar("T")


class CallerAttestor(Protocol):
    """What the server asks of the attestor (agent.attest.attestor.Attestor)."""

    def attest(self, pid: int, timeout: float = 1.0) -> Attestation | None: ...


class Identities(Protocol):
    """What the server asks of the identity manager (agent.identity.manager.IdentityManager):
    the identity an attested process earns, its SVIDs and the bundle, and a condition to
    wait on for their changes (rotations, reloads)."""

    @property
    def changed(self) -> threading.Condition: ...

    @property
    def generation(self) -> int:
        """Moves (under `changed`) whenever an SVID, the bundle or the entries change."""
        ...

    def resolve(self, attestation: Attestation, quiet: bool = False) -> Identity | None: ...

    def note_use(self, ident: Identity, attestation: Attestation) -> None: ...

    def x509_svid(self, ident: Identity) -> X509Svid: ...

    def jwt_svid(
        self, ident: Identity, audience: list[str], ttl: int | None = None, iss: str | None = None
    ) -> JwtSvid: ...

    def bundle(self) -> TrustBundle: ...


def names_an_as(audience: Iterable[str], servers: Iterable[str]) -> tuple[str, str] | None:
    """The first (audience, authorization server) where the audience names that server: the
    same identifier, or any URL on its origin. Any endpoint counts, not only the issuer and
    the token endpoint: authorization servers accept the URL of the endpoint being called
    as an assertion's audience (oidc-provider does), so a JWT-SVID for any of them is a
    client assertion there."""
    # userinfo in an audience changes nothing: the URL still names that host
    known = [(s, origin(s.strip(), userinfo=True)) for s in servers if s]
    for aud in audience:
        aud_origin = origin(aud.strip(), userinfo=True)
        for server, server_origin in known:
            if aud.rstrip("/") == server.rstrip("/") or (
                aud_origin is not None and aud_origin == server_origin
            ):
                return aud, server
    return None


NO_ENTRY = "no identity issued: no registration entry matches this process"


class WorkloadApiServer:
    name = "workload_api"

    def __init__(
        self,
        socket_path: str,
        manager: Identities,
        attestor: CallerAttestor,
        audit: AuditLog | None = None,
        registry: CollectorRegistry | None = None,
        max_streams: int = 256,
        authorization_servers: Callable[[], Iterable[str]] = tuple,
        request_wait: float = 10.0,
        unread_authorization_servers: Callable[[], Iterable[str]] = tuple,
        max_streams_per_cgroup: int = 64,
        ids_now: Callable[[int], ProcIds | None] = current_ids,
    ):
        self.socket_path = Path(socket_path)
        self.manager = manager
        self.attestor = attestor
        self.audit = audit
        # the authorization servers credless obtains tokens from (configured and discovered
        # issuers and endpoints): FetchJWTSVID refuses them as audiences (see names_an_as)
        self.authorization_servers = authorization_servers
        # the servers whose ASes' metadata is not read yet: until it is, any URL audience
        # might be one of their endpoints (agent/oauth/audiences.py)
        self.unread_authorization_servers = unread_authorization_servers
        self.max_streams = max_streams
        # of those, how many callers in one cgroup may hold: a process can fork callers, but
        # they stay in its cgroup (its pod's or service's), so one workload leaves the rest
        self.max_streams_per_cgroup = max_streams_per_cgroup
        self.active_by_cgroup: dict[int, int] = {}
        # a caller's uids, gids and supplementary groups now (procfs)
        self.ids_now = ids_now
        # how long a call may hold its place among max_streams before its request message
        self.request_wait = request_wait
        self.callers: dict[asyncio.BaseTransport, Caller] = {}  # who connected on each
        self.connections: set[AttestedConnection] = set()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="workload-api")
        self._server: AttestingServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._relay: threading.Thread | None = None
        # set (and replaced) on each change; bound to the server's loop at its first wait
        self._changed = asyncio.Event()
        self._stopping = threading.Event()
        self.active = 0
        self.m_calls = Counter(
            "credless_workload_api_calls",
            "Workload API calls by outcome",
            ["method", "code"],
            registry=registry,
        )

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        ready = threading.Event()
        errors: list[BaseException] = []
        loop = self._loop = asyncio.new_event_loop()  # run by the thread
        self._thread = threading.Thread(
            target=self._run, args=(loop, ready, errors), name="workload-api", daemon=True
        )
        self._thread.start()
        ready.wait(10)
        if errors:
            self._thread.join(5)
            self._pool.shutdown(wait=False)
            raise errors[0]
        self._relay = threading.Thread(
            target=self._relay_changes, args=(loop,), name="workload-api-changes", daemon=True
        )
        self._relay.start()
        log.info("workload API listening", socket=str(self.socket_path))

    def _run(
        self, loop: asyncio.AbstractEventLoop, ready: threading.Event, errors: list[BaseException]
    ) -> None:
        asyncio.set_event_loop(loop)

        async def listen() -> None:
            self._server = AttestingServer(self, [WorkloadApiServicer(self)])
            self.socket_path.parent.mkdir(parents=True, exist_ok=True)
            self.socket_path.unlink(missing_ok=True)
            await self._server.start(path=str(self.socket_path))
            os.chmod(self.socket_path, 0o666)  # noqa: S103 — anyone may ask; the kernel says who they are

        try:
            loop.run_until_complete(listen())
        except BaseException as e:  # noqa: BLE001 - reported to start()
            errors.append(e)
            ready.set()
            loop.close()
            return
        ready.set()
        loop.run_forever()
        loop.close()

    def stop(self) -> None:
        self._stopping.set()
        with self.manager.changed:
            self.manager.changed.notify_all()  # the change relay wakes and sees _stopping
        if self._relay is not None:
            self._relay.join(5)
        loop, server = self._loop, self._server
        if loop is not None and server is not None and loop.is_running():

            async def close() -> None:
                server.close()  # no new connections; running RPCs cancelled
                for conn in list(self.connections):
                    conn.transport.abort()
                await asyncio.wait_for(server.wait_closed(), 5)

            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.socket_path.unlink(missing_ok=True)
        for caller in list(self.callers.values()):
            caller.cred.close()
        self.callers.clear()

    def _relay_changes(self, loop: asyncio.AbstractEventLoop) -> None:
        """Turn the identity manager's condition (rotations, reloads) into an asyncio wake-up
        for the open streams."""
        mgr = self.manager
        seen = mgr.generation
        while not self._stopping.is_set():
            with mgr.changed:
                if mgr.generation == seen and not self._stopping.is_set():
                    mgr.changed.wait(timeout=5.0)
                now = mgr.generation
            if now != seen:
                seen = now
                with contextlib.suppress(RuntimeError):  # loop closed: stopping anyway
                    loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    @property
    def stopping(self) -> bool:
        """stop() has begun: open streams end."""
        return self._stopping.is_set()

    @property
    def changes(self) -> asyncio.Event:
        """Set at the next change of an SVID, the bundle or the entries, then replaced by a
        fresh one: a stream takes it before reading the state, so it misses no change."""
        return self._changed

    async def run_blocking(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) on a worker thread (it blocks: attestation, signing)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def attest_caller(self, pid: int) -> Attestation | None:
        """Who a connecting process is (blocks, so on a worker thread)."""
        return await self.run_blocking(self.attestor.attest, pid)

    def audit_call(self, event: str, ident: Identity, att: Attestation, **fields: Any) -> None:
        """An audit event about a call, naming the identity and the process that made it."""
        if self.audit:
            self.audit.emit(
                event,
                spiffe_id=str(ident.spiffe_id),
                pid=att.tgid,
                uid=att.uid,
                exe=att.exe,
                **fields,
            )

    # ------------------------------------------------------------ authorisation
    def refuse_authorization_server_audience(self, audience: list[str], entry_id: str) -> None:
        """Denied when a JWT-SVID for audience could be a client assertion at an
        authorization server credless obtains tokens from: an audience that names one
        (names_an_as), or, while a server's ASes are unread (agent/oauth/audiences.py), any
        URL, which might be an endpoint of theirs on an origin not known yet."""
        named = names_an_as(audience, self.authorization_servers())
        if named is not None:
            raise Denied(
                Status.PERMISSION_DENIED,
                (
                    f"audience {named[0]!r} is the authorization server {named[1]!r}, "
                    "which credless obtains this identity's tokens from: a JWT-SVID for "
                    "it would let the workload get tokens past credless's policy, DPoP "
                    "binding and audit. Call the MCP server through credless instead, or "
                    "set authorization_server_audience = true on the registration entry "
                    f"{entry_id!r} if this workload must talk to it itself"
                ),
                audience=audience,
                authorization_server=named[1],
            )
        unread = tuple(self.unread_authorization_servers())
        url = next((a for a in audience if origin(a.strip(), userinfo=True)), None)
        if unread and url is not None:
            raise Denied(
                Status.UNAVAILABLE,
                (
                    f"audience {url!r} may be an endpoint of an authorization server "
                    "credless obtains tokens from whose metadata it has not read yet "
                    f"(for server{'s' if len(unread) > 1 else ''} {', '.join(unread)}): "
                    "retry shortly; the agent's log says why the read has not succeeded"
                ),
                audience=audience,
                unread=list(unread),
            )

    def admit(
        self, caller: Caller | None, metadata: Mapping[str, str | bytes] | None
    ) -> Attestation:
        """The checks of a call that need no attestation now, asked before the call takes a
        place among max_streams too, so a caller they refuse holds none. Denied, else the
        attestation its connection was accepted with."""
        if metadata is None or metadata.get(_HEADER[0]) != _HEADER[1]:
            raise Denied(
                Status.INVALID_ARGUMENT,
                "security header missing from request: send metadata workload.spiffe.io: true",
            )
        if caller is None:
            raise Denied(
                Status.PERMISSION_DENIED,
                f"connect through the Workload API socket {self.socket_path}",
            )
        att = caller.attestation
        if att is None or not caller.cred.alive():
            raise Denied(
                Status.PERMISSION_DENIED,
                "no identity issued: the calling process could not be attested",
            )
        return att

    def take_place(self, att: Attestation) -> None:
        """Count a call among the open ones: Denied PERMISSION_DENIED when no entry gives the
        caller an identity, RESOURCE_EXHAUSTED when max_streams are open, or
        max_streams_per_cgroup from the caller's cgroup. Runs on the server's loop
        (as give_place does), so the counts need no lock."""
        if self.manager.resolve(att, quiet=True) is None:
            # a process no entry gives an identity holds no place: any local user could
            # otherwise fill them from cgroups of its own making (systemd-run --user)
            self.manager.resolve(att)  # counted and audited as authorize() would
            raise Denied(Status.PERMISSION_DENIED, NO_ENTRY).about(att, None)
        if self.active >= self.max_streams:
            raise Denied(
                Status.RESOURCE_EXHAUSTED, f"more than {self.max_streams} Workload API calls open"
            )
        held = self.active_by_cgroup.get(att.cgroup_id, 0)
        if held >= self.max_streams_per_cgroup:
            raise Denied(
                Status.RESOURCE_EXHAUSTED,
                f"more than {self.max_streams_per_cgroup} Workload API calls open from the "
                f"cgroup {att.cgroup_path}: a workload needs one stream per kind of SVID and "
                "its unary calls; close the calls it no longer reads",
            )
        self.active += 1
        self.active_by_cgroup[att.cgroup_id] = held + 1

    def give_place(self, att: Attestation) -> None:
        """The place take_place counted, given back when the call ends."""
        self.active -= 1
        left = self.active_by_cgroup.get(att.cgroup_id, 0) - 1
        if left > 0:
            self.active_by_cgroup[att.cgroup_id] = left
        else:
            self.active_by_cgroup.pop(att.cgroup_id, None)

    def authorize(
        self, caller: Caller | None, metadata: Mapping[str, str | bytes] | None
    ) -> tuple[Identity, Attestation]:
        """The caller's identity, or Denied with the status to return. Blocks (attests)."""
        att = self.admit(caller, metadata)
        now = self.attestor.attest(att.tgid, timeout=0.5)
        if now is None or now.exec_ns != att.exec_ns:
            raise Denied(
                Status.PERMISSION_DENIED,
                "no identity issued: the calling process has exec'd or exited "
                "since it connected; reconnect",
            ).about(att, None)
        # its ids now, read while its pidfd says it is alive (so the pid is still its own):
        # a process that changed uid, gid or groups after it was attested (at its exec),
        # such as a root one that dropped to another user after it connected, is no longer
        # what its unix selectors were made from
        ids = self.ids_now(att.tgid)
        alive = caller is not None and caller.cred.alive()  # admit() refused None already
        attested = ProcIds(att.real_uid, att.uid, att.real_gid, att.gid, tuple(att.groups))
        if not alive or ids != attested:
            raise Denied(
                Status.PERMISSION_DENIED,
                "no identity issued: the calling process has changed its uid, gid or groups "
                "since it was attested at its exec; make the change before the exec (setpriv, "
                "systemd's User=) for the program to be attested as what it runs as",
                ids_now={**ids._asdict(), "groups": list(ids.groups)} if ids else None,
            ).about(att, None)
        ident = self.manager.resolve(att)
        if ident is None:
            raise Denied(Status.PERMISSION_DENIED, NO_ENTRY).about(att, None)
        self.manager.note_use(ident, att)
        return ident, att
