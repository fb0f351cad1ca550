"""The SPIFFE Workload API, served on a unix socket to attested local processes.

Caller identity comes from the kernel, never from the caller: the socket's peer credentials
(SO_PEERCRED, pinned by SO_PEERPIDFD) name the process, the attestor says who it is, the
registration entries say which SPIFFE ID that earns. Every RPC re-checks: a process that
has exec'd another program since it connected, or has exited, gets PermissionDenied. (The
image is pinned when the agent accepts the connection, not at connect(2): a caller that
execs in between is attested as its new image; see issue 15 item 7.)

How the gRPC server knows who is calling
----------------------------------------
The gRPC server is grpclib, an asyncio HTTP/2 server, listening on the public unix socket
itself. Each accepted connection is wrapped (_Connection) before grpclib sees a byte of it:
reading is paused, the peer credentials are read from that very socket and the process is
attested, and only then is the connection handed to grpclib. A handler finds its caller by
the transport its request arrived on. There is no second socket, no address and no port
anywhere in the decision, so there is nothing for another process to bind, guess or relay.

What this replaced, and the options weighed (issue 15, item 1):
- grpcio behind a splice (the old design). gRPC Python exposes no peer credentials (grpc
  issue 15511; LocalServerCredentials(UDS) does not check them either, issue 28755), so a
  front splice read them and connected to a gRPC backend on 127.0.0.1, and the handler
  mapped context.peer()'s *port* back to the caller. Any local process could bind another
  loopback address with a live splice's port (visible in /proc/net/tcp) and be served as
  that splice's process, private key included. Rejected: trust in an address.
- grpcio behind a splice to a backend only root can reach (a unix socket in a 0700
  directory), each splice binding its end to a unique path there, matched against
  context.peer() ("unix:/path" on grpcio 1.85). Sound while the directory stays root-only,
  but it keeps the extra hop, a per-connection thread pool slot for every open stream, and
  rests on grpc core's formatting of unix peer names, which has regressed before (grpc
  issues 13938, 35006). Rejected: an address again, only better hidden.
- grpcio with a per-connection credential (the splice doing mTLS to a loopback backend
  with a per-caller client certificate): TLS on every byte of a local call, a key to
  manage, and still a network listener. Rejected.
- grpclib (chosen): the handler sees the caller's own socket. It costs one dependency
  (pure Python, on h2) and two reaches into its internals: grpclib 0.4 builds each
  connection's protocol in Server._protocol_factory (overridden here to wrap it) and
  gives handlers the connection's Peer, whose transport is Peer._transport. Both are
  pinned by the version range in pyproject.toml and fail closed: if either moved, no
  request would find a caller and every call would get PermissionDenied (the kernel
  tests would fail at once). Open streams are coroutines, not threads. py-spiffe (a
  grpcio client) talks to it unchanged.
  The price is pure-Python HTTP/2: on the 2-vCPU test VM, sequential FetchJWTSVID calls
  from one client went from about 450-600/s to about 280-330/s (python -m
  tests.bench.bench_workload_api), while a new connection's first X509-SVID arrives a
  little sooner (p50 about 6 ms, was about 7: one hop fewer). Workloads call the Workload
  API when they start and when their SVIDs rotate, not per request, so this is far from
  any limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from google.protobuf import struct_pb2
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server
from prometheus_client import Counter

from agent.identity.jwtsvid import JwtSvidError, validate_jwt_svid
from agent.identity.proto import workload_pb2 as pb
from agent.observe.logging import AuditLog, get_logger
from agent.peercred import PeerCred, peer_cred

log = get_logger("workload_api")

_HEADER = ("workload.spiffe.io", "true")

# The SPIFFE paths: /SpiffeWorkloadAPI/<Method> (see agent/identity/proto/workload.proto for
# why the generated, packaged service name is not used).
SERVICE = "SpiffeWorkloadAPI"
METHODS = {  # name: (streaming response, request type, response type)
    "FetchX509SVID": (True, pb.X509SVIDRequest, pb.X509SVIDResponse),
    "FetchX509Bundles": (True, pb.X509BundlesRequest, pb.X509BundlesResponse),
    "FetchJWTSVID": (False, pb.JWTSVIDRequest, pb.JWTSVIDResponse),
    "FetchJWTBundles": (True, pb.JWTBundlesRequest, pb.JWTBundlesResponse),
    "ValidateJWTSVID": (False, pb.ValidateJWTSVIDRequest, pb.ValidateJWTSVIDResponse),
}
_EARLY_BYTES = 1 << 20  # held per connection while its caller is being attested


def client_call(channel: grpc.Channel, method: str):
    """A multicallable for one Workload API method (for tools and tests)."""
    stream, req, resp = METHODS[method]
    make = channel.unary_stream if stream else channel.unary_unary
    return make(
        f"/{SERVICE}/{method}",
        request_serializer=req.SerializeToString,
        response_deserializer=resp.FromString,
    )


@dataclass
class Caller:
    cred: PeerCred
    attestation: Any  # agent.attest.selectors.Attestation | None


class _Denied(Exception):
    def __init__(self, code: Status, message: str):
        self.code, self.message = code, message


class _Refused(Exception):
    """A request refused after its caller was authorized (no workload_api.denied event)."""

    def __init__(self, code: Status, message: str):
        self.code, self.message = code, message


class _Connection(asyncio.Protocol):
    """One accepted connection: who is on the other end, then grpclib's HTTP/2 protocol.

    grpclib sees nothing of the connection until the caller is known: no request on it can
    be handled before its peer credentials were read and its process attested. Reading is
    paused meanwhile; whatever a loop still delivers is held (up to _EARLY_BYTES)."""

    def __init__(self, api: WorkloadApiServer, inner: asyncio.Protocol):
        self.api, self.inner = api, inner
        self.transport: asyncio.Transport | None = None
        self.caller: Caller | None = None
        self._task: asyncio.Task | None = None
        self._open = False  # inner has been given the connection
        self._early = bytearray()
        self._early_eof = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.pause_reading()
        self.api._connections.add(self)
        self._task = asyncio.get_running_loop().create_task(self._identify())

    async def _identify(self) -> None:
        transport = self.transport
        try:
            cred = peer_cred(transport.get_extra_info("socket"))
        except OSError:
            transport.abort()
            return
        try:
            att = await asyncio.get_running_loop().run_in_executor(
                self.api._pool, self.api.attestor.attest, cred.pid
            )
        except Exception:
            log.exception("attesting a Workload API caller failed", pid=cred.pid)
            cred.close()
            transport.abort()
            return
        except BaseException:
            cred.close()
            raise
        if att is not None and not cred.alive():
            att = None  # the pid was reused between SO_PEERCRED and attestation
        if transport.is_closing():
            cred.close()
            return
        self.caller = Caller(cred, att)
        self.api._callers[transport] = self.caller
        self.inner.connection_made(transport)
        self._open = True
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            self.inner.data_received(early)
        if self._early_eof:
            transport.close()
            return
        transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._open:
            self.inner.data_received(data)
            return
        self._early += data
        if len(self._early) > _EARLY_BYTES:
            self.transport.abort()

    def eof_received(self) -> bool | None:
        if self._open:
            return self.inner.eof_received()
        self._early_eof = True
        return True  # keep the transport until the caller is known

    def pause_writing(self) -> None:
        if self._open:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._open:
            self.inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.api._connections.discard(self)
        self.api._callers.pop(self.transport, None)
        if self._open:
            self.inner.connection_lost(exc)
        elif self._task is not None:
            self._task.cancel()
        if self.caller is not None:
            self.caller.cred.close()


class _Server(Server):
    """grpclib's server with every accepted connection wrapped in a _Connection."""

    def __init__(self, api: WorkloadApiServer, handlers):
        super().__init__(handlers)
        self._api = api

    def _protocol_factory(self):  # grpclib 0.4: the factory given to create_unix_server
        return _Connection(self._api, super()._protocol_factory())


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, case and default port normalised."""
    try:
        u = urlsplit(url.strip())
        if u.scheme.lower() not in ("http", "https") or not u.hostname:
            return None
        return (
            u.scheme.lower(),
            u.hostname.lower(),
            u.port or (443 if u.scheme.lower() == "https" else 80),
        )
    except ValueError:
        return None


def names_an_as(audience: Iterable[str], servers: Iterable[str]) -> tuple[str, str] | None:
    """The first (audience, authorization server) where the audience names that server: the
    same identifier, or any URL on its origin. Any endpoint counts, not only the issuer and
    the token endpoint: authorization servers accept the URL of the endpoint being called
    as an assertion's audience (oidc-provider does), so a JWT-SVID for any of them is a
    client assertion there."""
    servers = [(s, _origin(s)) for s in servers if s]
    for aud in audience:
        origin = _origin(aud)
        for server, server_origin in servers:
            if aud.rstrip("/") == server.rstrip("/") or (
                origin is not None and origin == server_origin
            ):
                return aud, server
    return None


def _transport_of(stream) -> Any:
    """The transport a request arrived on (grpclib 0.4: Stream.peer wraps it)."""
    return getattr(stream.peer, "_transport", None)


class WorkloadApiServer:
    name = "workload_api"

    def __init__(
        self,
        socket_path: str,
        manager: Any,
        attestor: Any,
        audit: AuditLog | None = None,
        registry: Any = None,
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
        self._callers: dict[Any, Caller] = {}  # transport -> who connected on it
        self._connections: set[_Connection] = set()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="workload-api")
        self._server: _Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._relay: threading.Thread | None = None
        self._changed: asyncio.Event | None = None  # set (and replaced) on each change
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
        self._thread = threading.Thread(
            target=self._run, args=(ready, errors), name="workload-api", daemon=True
        )
        self._thread.start()
        ready.wait(10)
        if errors:
            self._thread.join(5)
            self._pool.shutdown(wait=False)
            raise errors[0]
        self._relay = threading.Thread(
            target=self._relay_changes, name="workload-api-changes", daemon=True
        )
        self._relay.start()
        log.info("workload API listening", socket=str(self.socket_path))

    def _run(self, ready: threading.Event, errors: list) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)

        async def listen() -> None:
            self._changed = asyncio.Event()
            self._server = _Server(self, [_Servicer(self)])
            self.socket_path.parent.mkdir(parents=True, exist_ok=True)
            self.socket_path.unlink(missing_ok=True)
            await self._server.start(path=str(self.socket_path))
            os.chmod(self.socket_path, 0o666)  # noqa: S103 — anyone may ask; the kernel says who they are

        try:
            self._loop.run_until_complete(listen())
        except BaseException as e:  # noqa: BLE001 - reported to start()
            errors.append(e)
            ready.set()
            self._loop.close()
            return
        ready.set()
        self._loop.run_forever()
        self._loop.close()

    def stop(self) -> None:
        self._stopping.set()
        with self.manager.changed:
            self.manager.changed.notify_all()  # the change relay wakes and sees _stopping
        if self._relay is not None:
            self._relay.join(5)
        if self._loop is not None and self._server is not None and self._loop.is_running():

            async def close() -> None:
                self._server.close()  # no new connections; running RPCs cancelled
                for conn in list(self._connections):
                    conn.transport.abort()
                await asyncio.wait_for(self._server.wait_closed(), 5)

            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.socket_path.unlink(missing_ok=True)
        for caller in list(self._callers.values()):
            caller.cred.close()
        self._callers.clear()

    def _relay_changes(self) -> None:
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
                    self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _run_blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ------------------------------------------------------------ authorisation
    def authorize(self, caller: Caller | None, metadata: Any) -> Any:
        """The caller's identity, or _Denied with the status to return. Blocks (attests)."""
        if metadata is None or metadata.get(_HEADER[0]) != _HEADER[1]:
            raise _Denied(
                Status.INVALID_ARGUMENT,
                "security header missing from request: send metadata workload.spiffe.io: true",
            )
        if caller is None:
            raise _Denied(
                Status.PERMISSION_DENIED,
                f"connect through the Workload API socket {self.socket_path}",
            )
        att = caller.attestation
        if att is None or not caller.cred.alive():
            raise _Denied(
                Status.PERMISSION_DENIED,
                "no identity issued: the calling process could not be attested",
            )
        now = self.attestor.attest(att.tgid, timeout=0.5)
        if now is None or now.exec_ns != att.exec_ns:
            raise _Denied(
                Status.PERMISSION_DENIED,
                "no identity issued: the calling process has exec'd or exited "
                "since it connected; reconnect",
            )
        ident = self.manager.resolve(att)
        if ident is None:
            raise _Denied(
                Status.PERMISSION_DENIED,
                "no identity issued: no registration entry matches this process",
            )
        self.manager.note_use(ident, att)
        return ident, att


class _Servicer:
    def __init__(self, server: WorkloadApiServer):
        self.s = server

    def __mapping__(self) -> dict[str, Handler]:
        out = {}
        for name, (streaming, req, resp) in METHODS.items():
            out[f"/{SERVICE}/{name}"] = Handler(
                self._guarded(name, getattr(self, name)),
                Cardinality.UNARY_STREAM if streaming else Cardinality.UNARY_UNARY,
                req,
                resp,
            )
        return out

    def _guarded(self, method: str, fn):
        async def handle(stream) -> None:
            if self.s.active >= self.s.max_streams:
                self._count(method, Status.RESOURCE_EXHAUSTED)
                raise GRPCError(
                    Status.RESOURCE_EXHAUSTED,
                    f"more than {self.s.max_streams} Workload API calls open",
                )
            self.s.active += 1
            try:
                await fn(stream)
            finally:
                self.s.active -= 1

        return handle

    def _count(self, method: str, code: Status) -> None:
        self.s.m_calls.labels(method, code.name).inc()

    def _refuse(self, method: str, code: Status, message: str) -> GRPCError:
        self._count(method, code)
        return GRPCError(code, message)

    async def _authorized(self, method: str, stream, then=None) -> Any:
        """Authorize the caller, then (in the same trip to a worker thread, as both block)
        run then(identity, attestation): its result, or (identity, attestation)."""
        caller = self.s._callers.get(_transport_of(stream))
        metadata = stream.metadata

        def work():
            ident, att = self.s.authorize(caller, metadata)
            return (ident, att) if then is None else then(ident, att)

        try:
            return await self.s._run_blocking(work)
        except _Denied as d:
            if d.code == Status.PERMISSION_DENIED and self.s.audit:
                self.s.audit.emit("workload_api.denied", method=method, reason=d.message)
            raise self._refuse(method, d.code, d.message) from None

    async def _watch(self, method: str, stream, render) -> None:
        """Stream the complete state now and again whenever it changes (SPEC §4), checking
        the caller again at least every second."""
        await stream.recv_message()
        mgr = self.s.manager
        last = None
        while not self.s._stopping.is_set():
            changed = self.s._changed
            gen = mgr.generation
            msg, state = await self._authorized(method, stream, lambda ident, _att: render(ident))
            if state != last:
                self._count(method, Status.OK)
                await stream.send_message(msg)
                last = state
            if mgr.generation == gen:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), 1.0)

    async def FetchX509SVID(self, stream) -> None:
        mgr = self.s.manager

        def render(ident):
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

    async def FetchX509Bundles(self, stream) -> None:
        mgr = self.s.manager

        def render(_ident):
            b = mgr.bundle()
            return (
                pb.X509BundlesResponse(bundles={b.trust_domain.id_string(): b.x509_der()}),
                b.sequence,
            )

        await self._watch("FetchX509Bundles", stream, render)

    async def FetchJWTBundles(self, stream) -> None:
        mgr = self.s.manager

        def render(_ident):
            b = mgr.bundle()
            return (
                pb.JWTBundlesResponse(
                    bundles={b.trust_domain.id_string(): b.jwt_jwks_json().encode()}
                ),
                b.sequence,
            )

        await self._watch("FetchJWTBundles", stream, render)

    async def FetchJWTSVID(self, stream) -> None:
        request = await stream.recv_message()
        audience = list(request.audience)

        def issue(ident, att):
            if not audience or not all(audience):
                raise _Refused(Status.INVALID_ARGUMENT, "audience must be specified")
            if request.spiffe_id and request.spiffe_id != str(ident.spiffe_id):
                raise _Refused(
                    Status.PERMISSION_DENIED,
                    f"no identity issued for {request.spiffe_id} to this process",
                )
            if not ident.entry.authorization_server_audience:
                named = names_an_as(audience, self.s.authorization_servers())
                if named is not None:
                    if self.s.audit:
                        self.s.audit.emit(
                            "workload_api.denied",
                            method="FetchJWTSVID",
                            spiffe_id=str(ident.spiffe_id),
                            pid=att.tgid,
                            exe=att.exe,
                            audience=audience,
                            reason="audience is an authorization server credless uses",
                        )
                    raise _Refused(
                        Status.PERMISSION_DENIED,
                        (
                            f"audience {named[0]!r} is the authorization server {named[1]!r}, "
                            "which credless obtains this identity's tokens from: a JWT-SVID for "
                            "it would let the workload get tokens past credless's policy, DPoP "
                            "binding and audit. Call the MCP server through credless instead, or "
                            "set authorization_server_audience = true on the registration entry "
                            f"{ident.entry.id!r} if this workload must talk to it itself"
                        ),
                    )
            return ident, att, self.s.manager.jwt_svid(ident, audience)

        try:
            ident, att, svid = await self._authorized("FetchJWTSVID", stream, issue)
        except _Refused as r:
            raise self._refuse("FetchJWTSVID", r.code, r.message) from None
        if self.s.audit:
            self.s.audit.emit(
                "svid.issued",
                type="jwt",
                spiffe_id=str(ident.spiffe_id),
                jti=svid.jti,
                kid=svid.kid,
                audience=list(svid.audience),
                pid=att.tgid,
                exe=att.exe,
            )
        self._count("FetchJWTSVID", Status.OK)
        await stream.send_message(
            pb.JWTSVIDResponse(svids=[pb.JWTSVID(spiffe_id=str(ident.spiffe_id), svid=svid.token)])
        )

    async def ValidateJWTSVID(self, stream) -> None:
        request = await stream.recv_message()
        bundle = self.s.manager.bundle

        def validate(_ident, _att):
            if not request.audience or not request.svid:
                raise _Refused(Status.INVALID_ARGUMENT, "audience and svid are required")
            b = bundle()
            try:
                return validate_jwt_svid(request.svid, request.audience, {b.trust_domain: b})
            except JwtSvidError as e:
                raise _Refused(Status.INVALID_ARGUMENT, f"invalid JWT-SVID: {e}") from None

        try:
            svid = await self._authorized("ValidateJWTSVID", stream, validate)
        except _Refused as r:
            raise self._refuse("ValidateJWTSVID", r.code, r.message) from None
        claims = struct_pb2.Struct()
        claims.update({k: v for k, v in svid.claims.items()})
        self._count("ValidateJWTSVID", Status.OK)
        await stream.send_message(
            pb.ValidateJWTSVIDResponse(spiffe_id=str(svid.spiffe_id), claims=claims)
        )
