"""The SPIFFE Workload API, served on a unix socket to attested local processes.

Caller identity comes from the kernel, never from the caller: the socket's peer credentials
(SO_PEERCRED, pinned by SO_PEERPIDFD) name the process, the attestor says who it is, the
registration entries say which SPIFFE ID that earns. Every RPC re-checks: a process that
has exec'd another program since it connected, or has exited, gets PermissionDenied.

Why a front socket: gRPC Python exposes no peer credentials for unix sockets. So the public
socket is served by a small splice loop that reads the peer credentials at accept, connects
to the gRPC server on a private loopback port, records "this local port is that process",
and then copies bytes both ways. The gRPC handler maps context.peer()'s port back to the
process. A connection straight to the private port has no record and is refused.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
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


def _generic_handler(servicer: Any) -> grpc.GenericRpcHandler:
    handlers = {}
    for name, (stream, req, resp) in METHODS.items():
        make = grpc.unary_stream_rpc_method_handler if stream else \
            grpc.unary_unary_rpc_method_handler
        handlers[name] = make(getattr(servicer, name), request_deserializer=req.FromString,
                              response_serializer=resp.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def client_call(channel: grpc.Channel, method: str):
    """A multicallable for one Workload API method (for tools and tests)."""
    stream, req, resp = METHODS[method]
    make = channel.unary_stream if stream else channel.unary_unary
    return make(f"/{SERVICE}/{method}", request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString)


@dataclass
class Caller:
    cred: PeerCred
    attestation: Any           # agent.attest.selectors.Attestation | None


class _Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        self.code, self.message = code, message


class WorkloadApiServer:
    name = "workload_api"

    def __init__(self, socket_path: str, manager: Any, attestor: Any,
                 audit: AuditLog | None = None, registry: Any = None, max_streams: int = 256):
        self.socket_path = Path(socket_path)
        self.manager = manager
        self.attestor = attestor
        self.audit = audit
        self._callers: dict[int, Caller] = {}
        self._grpc: grpc.Server | None = None
        self._max_streams = max_streams
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._front: asyncio.AbstractServer | None = None
        self._stopping = threading.Event()
        self.m_calls = Counter("credless_workload_api_calls", "Workload API calls by outcome",
                               ["method", "code"], registry=registry)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_streams,
                                                            thread_name_prefix="workload-api"))
        self._grpc.add_generic_rpc_handlers((_generic_handler(_Servicer(self)),))
        self._backend_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run_front, args=(ready, errors),
                                        name="workload-api-front", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            self._grpc.stop(0)
            raise errors[0]
        log.info("workload API listening", socket=str(self.socket_path))

    def _run_front(self, ready: threading.Event, errors: list) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self.socket_path.parent.mkdir(parents=True, exist_ok=True)
            self.socket_path.unlink(missing_ok=True)
            self._front = self._loop.run_until_complete(
                asyncio.start_unix_server(self._accept, path=str(self.socket_path)))
            os.chmod(self.socket_path, 0o666)  # anyone may ask; the kernel says who they are
        except BaseException as e:  # noqa: BLE001 - reported to start()
            errors.append(e)
            ready.set()
            return
        ready.set()
        self._loop.run_forever()
        self._loop.close()

    def stop(self) -> None:
        self._stopping.set()
        if self._loop is not None and self._front is not None:
            async def close():
                self._front.close()
                # end the splices still open, here, while the loop runs: left to the garbage
                # collector they would close their sockets on a closed loop
                splices = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in splices:
                    t.cancel()
                await asyncio.gather(*splices, return_exceptions=True)
                await self._front.wait_closed()
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        if self._grpc is not None:
            self._grpc.stop(grace=1).wait(5)
        self.socket_path.unlink(missing_ok=True)
        for caller in list(self._callers.values()):
            caller.cred.close()
        self._callers.clear()

    # ------------------------------------------------------------ front splice
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        cred = peer_cred(writer.get_extra_info("socket"))
        loop = asyncio.get_running_loop()
        att = await loop.run_in_executor(None, self.attestor.attest, cred.pid)
        if att is not None and not cred.alive():
            att = None  # the pid was reused between SO_PEERCRED and attestation
        try:
            b_reader, b_writer = await asyncio.open_connection("127.0.0.1", self._backend_port)
        except OSError:
            cred.close()
            writer.close()
            return
        port = b_writer.get_extra_info("sockname")[1]
        self._callers[port] = Caller(cred, att)
        try:
            await asyncio.gather(_pipe(reader, b_writer), _pipe(b_reader, writer))
        finally:
            self._callers.pop(port, None)
            cred.close()
            for w in (writer, b_writer):
                w.close()

    # ------------------------------------------------------------ authorisation
    def authorize(self, context: grpc.ServicerContext) -> Any:
        """The caller's identity, or _Denied with the status to return."""
        md = dict(context.invocation_metadata())
        if md.get(_HEADER[0]) != _HEADER[1]:
            raise _Denied(grpc.StatusCode.INVALID_ARGUMENT,
                          "security header missing from request: send metadata "
                          "workload.spiffe.io: true")
        peer = context.peer()  # "ipv4:127.0.0.1:PORT"
        caller = self._callers.get(int(peer.rsplit(":", 1)[1])) if peer.startswith("ipv4:") \
            else None
        if caller is None:
            raise _Denied(grpc.StatusCode.PERMISSION_DENIED,
                          f"connect through the Workload API socket {self.socket_path}")
        att = caller.attestation
        if att is None or not caller.cred.alive():
            raise _Denied(grpc.StatusCode.PERMISSION_DENIED,
                          "no identity issued: the calling process could not be attested")
        now = self.attestor.attest(att.tgid, timeout=0.5)
        if now is None or now.exec_ns != att.exec_ns:
            raise _Denied(grpc.StatusCode.PERMISSION_DENIED,
                          "no identity issued: the calling process has exec'd or exited "
                          "since it connected; reconnect")
        ident = self.manager.resolve(att)
        if ident is None:
            raise _Denied(grpc.StatusCode.PERMISSION_DENIED,
                          "no identity issued: no registration entry matches this process")
        self.manager.note_use(ident, att)
        return ident, att


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            dst.write_eof()
        except (OSError, RuntimeError):
            pass


class _Servicer:
    def __init__(self, server: WorkloadApiServer):
        self.s = server

    def _authorize(self, method: str, context) -> Any:
        try:
            return self.s.authorize(context)
        except _Denied as d:
            self.s.m_calls.labels(method, d.code.name).inc()
            if d.code == grpc.StatusCode.PERMISSION_DENIED and self.s.audit:
                self.s.audit.emit("workload_api.denied", method=method, reason=d.message)
            context.abort(d.code, d.message)

    def _ok(self, method: str) -> None:
        self.s.m_calls.labels(method, "OK").inc()

    def _watch(self, method: str, context, render):
        """Stream the complete state now and again whenever it changes (SPEC §4)."""
        mgr = self.s.manager
        last = None
        while context.is_active() and not self.s._stopping.is_set():
            gen = mgr.generation
            ident, _att = self._authorize(method, context)
            msg, state = render(ident)
            if state != last:
                self._ok(method)
                yield msg
                last = state
            with mgr.changed:
                if mgr.generation == gen:
                    mgr.changed.wait(timeout=1.0)

    def FetchX509SVID(self, request, context):  # noqa: N802 (gRPC naming)
        mgr = self.s.manager

        def render(ident):
            svid = mgr.x509_svid(ident)
            bundle = mgr.bundle()
            msg = pb.X509SVIDResponse(svids=[pb.X509SVID(
                spiffe_id=str(ident.spiffe_id), x509_svid=svid.chain_der(),
                x509_svid_key=svid.key_pkcs8_der(), bundle=bundle.x509_der())])
            return msg, (svid.fingerprint, bundle.sequence)
        yield from self._watch("FetchX509SVID", context, render)

    def FetchX509Bundles(self, request, context):  # noqa: N802
        mgr = self.s.manager

        def render(_ident):
            b = mgr.bundle()
            return (pb.X509BundlesResponse(bundles={b.trust_domain.id_string(): b.x509_der()}),
                    b.sequence)
        yield from self._watch("FetchX509Bundles", context, render)

    def FetchJWTBundles(self, request, context):  # noqa: N802
        mgr = self.s.manager

        def render(_ident):
            b = mgr.bundle()
            return (pb.JWTBundlesResponse(
                bundles={b.trust_domain.id_string(): b.jwt_jwks_json().encode()}), b.sequence)
        yield from self._watch("FetchJWTBundles", context, render)

    def FetchJWTSVID(self, request, context):  # noqa: N802
        ident, att = self._authorize("FetchJWTSVID", context)
        if not request.audience or not all(request.audience):
            self.s.m_calls.labels("FetchJWTSVID", "INVALID_ARGUMENT").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if request.spiffe_id and request.spiffe_id != str(ident.spiffe_id):
            self.s.m_calls.labels("FetchJWTSVID", "PERMISSION_DENIED").inc()
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"no identity issued for {request.spiffe_id} to this process")
        svid = self.s.manager.jwt_svid(ident, list(request.audience))
        if self.s.audit:
            self.s.audit.emit("svid.issued", type="jwt", spiffe_id=str(ident.spiffe_id),
                              jti=svid.jti, kid=svid.kid, audience=list(svid.audience),
                              pid=att.tgid, exe=att.exe)
        self._ok("FetchJWTSVID")
        return pb.JWTSVIDResponse(svids=[pb.JWTSVID(spiffe_id=str(ident.spiffe_id),
                                                    svid=svid.token)])

    def ValidateJWTSVID(self, request, context):  # noqa: N802
        self._authorize("ValidateJWTSVID", context)
        if not request.audience or not request.svid:
            self.s.m_calls.labels("ValidateJWTSVID", "INVALID_ARGUMENT").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience and svid are required")
        bundle = self.s.manager.bundle()
        try:
            svid = validate_jwt_svid(request.svid, request.audience, {bundle.trust_domain: bundle})
        except JwtSvidError as e:
            self.s.m_calls.labels("ValidateJWTSVID", "INVALID_ARGUMENT").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid JWT-SVID: {e}")
        claims = struct_pb2.Struct()
        claims.update({k: v for k, v in svid.claims.items()})
        self._ok("ValidateJWTSVID")
        return pb.ValidateJWTSVIDResponse(spiffe_id=str(svid.spiffe_id), claims=claims)
