"""The Workload API's calls: the SPIFFE method table (each method's path and message
types, which client_call uses too) and the handler of each call (WorkloadApiServicer), which
answers from the identity manager once the server (agent/identity/workload_api.py: the
socket, the callers, the authorisation) has authorized the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from agent.attest.selectors import Attestation
from agent.identity.bundle import TrustBundle
from agent.identity.jwtsvid import JwtSvid, JwtSvidError, validate_jwt_svid
from agent.identity.manager import Identity
from agent.identity.proto import workload_pb2 as pb
from agent.identity.workload_callers import Caller, transport_of
from agent.identity.workload_denials import Denied, audit_denial
from agent.observe.logging import get_logger

if TYPE_CHECKING:
    from agent.identity.workload_api import WorkloadApiServer

log = get_logger("workload_api")

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


def client_call(channel: grpc.Channel, method: str) -> Any:
    """A multicallable for one Workload API method (for tools and tests)."""
    stream, req, resp = METHODS[method]
    make = channel.unary_stream if stream else channel.unary_unary
    return make(
        f"/{SERVICE}/{method}",
        request_serializer=req.SerializeToString,
        response_deserializer=resp.FromString,
    )


class WorkloadApiServicer:
    """The handlers of the Workload API's calls, for grpclib (__mapping__): each call
    authorized by the server (WorkloadApiServer.authorize, again at every answer of a
    stream), its refusal counted and audited, its answer counted."""

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
            try:  # before it takes a place: a caller refused at once holds none
                att = self.s.admit(self._caller(stream), stream.metadata)
                self.s.take_place(att)
            except Denied as d:
                raise self._refuse(method, stream, d) from None
            try:
                await fn(stream)
            except Denied as d:
                raise self._refuse(method, stream, d) from None
            finally:
                self.s.give_place(att)

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

        return await self.s.run_blocking(work)

    async def _watch(
        self,
        method: str,
        stream: RpcStream,
        render: Callable[[Identity], tuple[Message, Hashable]],
    ) -> None:
        """Stream the complete state now and again whenever it changes (SPEC §4), checking
        the caller again at least every second."""
        await self._receive(stream)
        mgr = self.s.manager
        last: Hashable = None
        while not self.s.stopping:
            changed = self.s.changes
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

    async def _receive(self, stream: RpcStream) -> Any:
        """The call's request message, within request_wait: a call holds a place among
        max_streams until it ends, and one whose request never comes would hold it for good
        (enough of them and no new caller is answered)."""
        try:
            async with asyncio.timeout(self.s.request_wait):
                return await stream.recv_message()
        except TimeoutError:
            raise Denied(
                Status.DEADLINE_EXCEEDED,
                f"no request message within {self.s.request_wait:g} s of the call: send it "
                "with the call",
            ) from None

    async def _request(self, method: str, stream: RpcStream) -> Any:
        """A unary call's request message."""
        request = await self._receive(stream)
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
                self.s.refuse_authorization_server_audience(audience, ident.entry.id)
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
