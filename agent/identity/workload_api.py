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
who asked and answered with the audit event's id: agent/identity/workload_denials.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream
from prometheus_client import CollectorRegistry, Counter

from agent.attest.selectors import Attestation
from agent.identity.bundle import TrustBundle
from agent.identity.jwtsvid import JwtSvid, JwtSvidError, validate_jwt_svid
from agent.identity.manager import Identity
from agent.identity.proto import workload_pb2 as pb
from agent.identity.workload_callers import (
    AttestedConnection,
    AttestingServer,
    Caller,
    transport_of,
)
from agent.identity.workload_denials import Denied, audit_denial
from agent.identity.x509svid import X509Svid
from agent.observe.logging import AuditLog, get_logger
from agent.urls import origin

log = get_logger("workload_api")

_HEADER = ("workload.spiffe.io", "true")

# The SPIFFE paths: /SpiffeWorkloadAPI/<Method> (see agent/identity/proto/workload.proto for
# why the generated, packaged service name is not used).
SERVICE = "SpiffeWorkloadAPI"
# name: (streaming response, request type, response type)
METHODS: dict[str, tuple[bool, type[Message], type[Message]]] = {
    "FetchX509SVID": (True, pb.X509SVIDRequest, pb.X509SVIDResponse),
    "FetchX509Bundles": (True, pb.X509BundlesRequest, pb.X509BundlesResponse),
    "FetchJWTSVID": (False, pb.JWTSVIDRequest, pb.JWTSVIDResponse),
    "FetchJWTBundles": (True, pb.JWTBundlesRequest, pb.JWTBundlesResponse),
    "ValidateJWTSVID": (False, pb.ValidateJWTSVIDRequest, pb.ValidateJWTSVIDResponse),
}

T = TypeVar("T")
# a request's stream; its message types vary by method
RpcStream = Stream[Any, Any]


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


def client_call(channel: grpc.Channel, method: str) -> Any:
    """A multicallable for one Workload API method (for tools and tests)."""
    stream, req, resp = METHODS[method]
    make = channel.unary_stream if stream else channel.unary_unary
    return make(
        f"/{SERVICE}/{method}",
        request_serializer=req.SerializeToString,
        response_deserializer=resp.FromString,
    )


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
    ):
        self.socket_path = Path(socket_path)
        self.manager = manager
        self.attestor = attestor
        self.audit = audit
        # the authorization servers credless obtains tokens from (configured and discovered
        # issuers and endpoints): FetchJWTSVID refuses them as audiences (see names_an_as)
        self.authorization_servers = authorization_servers
        self.max_streams = max_streams
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
            self._server = AttestingServer(self, [_Servicer(self)])
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

    async def _run_blocking(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def attest_caller(self, pid: int) -> Attestation | None:
        """Who a connecting process is (blocks, so on a worker thread)."""
        return await self._run_blocking(self.attestor.attest, pid)

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
    def authorize(
        self, caller: Caller | None, metadata: Mapping[str, str | bytes] | None
    ) -> tuple[Identity, Attestation]:
        """The caller's identity, or Denied with the status to return. Blocks (attests)."""
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
        now = self.attestor.attest(att.tgid, timeout=0.5)
        if now is None or now.exec_ns != att.exec_ns:
            raise Denied(
                Status.PERMISSION_DENIED,
                "no identity issued: the calling process has exec'd or exited "
                "since it connected; reconnect",
            ).about(att, None)
        ident = self.manager.resolve(att)
        if ident is None:
            raise Denied(
                Status.PERMISSION_DENIED,
                "no identity issued: no registration entry matches this process",
            ).about(att, None)
        self.manager.note_use(ident, att)
        return ident, att


class _Servicer:
    def __init__(self, server: WorkloadApiServer):
        self.s = server

    def __mapping__(self) -> dict[str, Handler]:
        out: dict[str, Handler] = {}
        for name, (streaming, req, resp) in METHODS.items():
            out[f"/{SERVICE}/{name}"] = Handler(
                self._guarded(name, getattr(self, name)),
                Cardinality.UNARY_STREAM if streaming else Cardinality.UNARY_UNARY,
                req,
                resp,
            )
        return out

    def _guarded(
        self, method: str, fn: Callable[[RpcStream], Awaitable[None]]
    ) -> Callable[[RpcStream], Awaitable[None]]:
        async def handle(stream: RpcStream) -> None:
            if self.s.active >= self.s.max_streams:
                raise self._refuse(
                    method,
                    stream,
                    Denied(
                        Status.RESOURCE_EXHAUSTED,
                        f"more than {self.s.max_streams} Workload API calls open",
                    ),
                )
            self.s.active += 1
            try:
                await fn(stream)
            except Denied as d:
                raise self._refuse(method, stream, d) from None
            finally:
                self.s.active -= 1

        return handle

    def _count(self, method: str, code: Status) -> None:
        self.s.m_calls.labels(method, code.name).inc()

    def _caller(self, stream: RpcStream) -> Caller | None:
        transport = transport_of(stream)
        return self.s.callers.get(transport) if transport is not None else None

    def _refuse(self, method: str, stream: RpcStream, d: Denied) -> GRPCError:
        """The answer to a refused call: counted, audited, its message naming the event."""
        self._count(method, d.code)
        return GRPCError(d.code, audit_denial(self.s.audit, method, self._caller(stream), d))

    async def _authorized(
        self, method: str, stream: RpcStream, then: Callable[[Identity, Attestation], T]
    ) -> T:
        """Authorize the caller, then (in the same trip to a worker thread, as both block)
        run then(identity, attestation) and return its result. A refusal by either is a
        Denied knowing who asked (answered by _guarded)."""
        caller = self._caller(stream)
        metadata = stream.metadata

        def work() -> T:
            ident, att = self.s.authorize(caller, metadata)
            try:
                return then(ident, att)
            except Denied as d:
                raise d.about(att, ident) from None

        return await self.s._run_blocking(work)

    async def _watch(
        self,
        method: str,
        stream: RpcStream,
        render: Callable[[Identity], tuple[Message, Hashable]],
    ) -> None:
        """Stream the complete state now and again whenever it changes (SPEC §4), checking
        the caller again at least every second."""
        await stream.recv_message()
        mgr = self.s.manager
        last: Hashable = None
        while not self.s._stopping.is_set():
            changed = self.s._changed
            gen = mgr.generation
            msg, state, ident, att = await self._authorized(
                method, stream, lambda ident, att: (*render(ident), ident, att)
            )
            if state != last:
                self._count(method, Status.OK)
                log.debug(
                    "Workload API update sent",
                    method=method,
                    pid=att.tgid,
                    exe=att.exe,
                    spiffe_id=str(ident.spiffe_id),
                    entry=ident.entry.id,
                )
                await stream.send_message(msg)
                last = state
            if mgr.generation == gen:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), 1.0)

    async def FetchX509SVID(self, stream: RpcStream) -> None:
        mgr = self.s.manager

        def render(ident: Identity) -> tuple[Message, Hashable]:
            svid = mgr.x509_svid(ident)
            bundle = mgr.bundle()
            msg = pb.X509SVIDResponse(
                svids=[
                    pb.X509SVID(
                        spiffe_id=str(ident.spiffe_id),
                        x509_svid=svid.chain_der(),
                        x509_svid_key=svid.key_pkcs8_der(),
                        bundle=bundle.x509_der(),
                    )
                ]
            )
            return msg, (svid.fingerprint, bundle.sequence)

        await self._watch("FetchX509SVID", stream, render)

    async def _watch_bundle(
        self, method: str, stream: RpcStream, message: Callable[[TrustBundle], Message]
    ) -> None:
        """Stream the trust bundle as message(bundle) and again whenever it changes."""
        mgr = self.s.manager

        def render(_ident: Identity) -> tuple[Message, Hashable]:
            b = mgr.bundle()
            return message(b), b.sequence

        await self._watch(method, stream, render)

    async def FetchX509Bundles(self, stream: RpcStream) -> None:
        await self._watch_bundle(
            "FetchX509Bundles",
            stream,
            lambda b: pb.X509BundlesResponse(bundles={b.trust_domain.id_string(): b.x509_der()}),
        )

    async def FetchJWTBundles(self, stream: RpcStream) -> None:
        await self._watch_bundle(
            "FetchJWTBundles",
            stream,
            lambda b: pb.JWTBundlesResponse(
                bundles={b.trust_domain.id_string(): b.jwt_jwks_json().encode()}
            ),
        )

    async def _request(self, method: str, stream: RpcStream) -> Any:
        """A unary call's request message."""
        request = await stream.recv_message()
        if request is None:  # the client ended its side of the stream without one
            raise Denied(Status.INVALID_ARGUMENT, "the request message is missing")
        return request

    async def FetchJWTSVID(self, stream: RpcStream) -> None:
        request = await self._request("FetchJWTSVID", stream)
        audience = list(request.audience)

        def issue(ident: Identity, att: Attestation) -> tuple[Identity, Attestation, JwtSvid]:
            if not audience or not all(audience):
                raise Denied(Status.INVALID_ARGUMENT, "audience must be specified")
            if request.spiffe_id and request.spiffe_id != str(ident.spiffe_id):
                # a process asking for an identity that is not its own: worth an operator's
                # look (a misconfigured workload, or one probing for others' SVIDs)
                raise Denied(
                    Status.PERMISSION_DENIED,
                    f"no identity issued for {request.spiffe_id} to this process: it is "
                    f"{ident.spiffe_id} (registration entry {ident.entry.id!r})",
                    requested_spiffe_id=request.spiffe_id,
                    audience=audience,
                )
            if not ident.entry.authorization_server_audience:
                named = names_an_as(audience, self.s.authorization_servers())
                if named is not None:
                    raise Denied(
                        Status.PERMISSION_DENIED,
                        (
                            f"audience {named[0]!r} is the authorization server {named[1]!r}, "
                            "which credless obtains this identity's tokens from: a JWT-SVID for "
                            "it would let the workload get tokens past credless's policy, DPoP "
                            "binding and audit. Call the MCP server through credless instead, or "
                            "set authorization_server_audience = true on the registration entry "
                            f"{ident.entry.id!r} if this workload must talk to it itself"
                        ),
                        audience=audience,
                        authorization_server=named[1],
                    )
            return ident, att, self.s.manager.jwt_svid(ident, audience)

        ident, att, svid = await self._authorized("FetchJWTSVID", stream, issue)
        self.s.audit_call(
            "svid.issued",
            ident,
            att,
            type="jwt",
            jti=svid.jti,
            kid=svid.kid,
            audience=list(svid.audience),
        )
        self._count("FetchJWTSVID", Status.OK)
        await stream.send_message(
            pb.JWTSVIDResponse(svids=[pb.JWTSVID(spiffe_id=str(ident.spiffe_id), svid=svid.token)])
        )

    async def ValidateJWTSVID(self, stream: RpcStream) -> None:
        request = await self._request("ValidateJWTSVID", stream)
        bundle = self.s.manager.bundle

        def validate(_ident: Identity, _att: Attestation) -> JwtSvid:
            if not request.audience or not request.svid:
                raise Denied(Status.INVALID_ARGUMENT, "audience and svid are required")
            b = bundle()
            try:
                return validate_jwt_svid(request.svid, request.audience, {b.trust_domain: b})
            except JwtSvidError as e:
                raise Denied(Status.INVALID_ARGUMENT, f"invalid JWT-SVID: {e}") from None

        svid = await self._authorized("ValidateJWTSVID", stream, validate)
        claims = struct_pb2.Struct()
        claims.update({k: v for k, v in svid.claims.items()})
        self._count("ValidateJWTSVID", Status.OK)
        await stream.send_message(
            pb.ValidateJWTSVIDResponse(spiffe_id=str(svid.spiffe_id), claims=claims)
        )
