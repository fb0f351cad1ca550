"""FakeSpireAgent: an in-test gRPC server of the Delegated Identity API on a unix socket.

This is a FAKE, not SPIRE. A SPIRE agent cannot run on the test machines, so the server is
built from the same generated code as the client (agent/identity/proto/delegatedidentity*)
and mints with credless's own CA and JWT keys (agent/identity/ca.py, x509svid.py,
jwtsvid.py). It mirrors the behaviour of SPIRE's `pkg/agent/api/delegatedidentity/v1`
as far as the public code shows it:

- the caller is checked first (`caller_registered` / `caller_authorized` flags stand in for
  peer-credential attestation), and again before every stream update;
- selectors XOR pid, else InvalidArgument; pid = 0 is unset; a pid is "attested" through
  the `pids` table, an unknown pid gives Unavailable (attestation failure);
- FetchJWTSVIDs: empty audience → InvalidArgument (checked before the caller, as SPIRE
  does); no matching entry → PermissionDenied "no identity issued";
- SubscribeToX509SVIDs with selectors that match nothing streams an *empty* set (SPIRE
  subscribes to cache changes and sends whatever matches), not an error;
- an entry matches when all its selectors are among the request's selectors;
- bundle maps and federates_with are keyed `spiffe://<td>` (SPIRE's td.IDString()); with
  `bundle_key_form="name"` they use the bare name the proto comments promise;
- JWT bundles are plain JWKS without `use` (SPIRE's bundleutil.StandardJWKS()).

Streams send the complete state at once and again after each `rotate()`.
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
import threading
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.serialization import Encoding

from agent.identity.bundle import TrustBundle
from agent.identity.ca import SigningCA
from agent.identity.jwt_rotation import JwtSigningKeys
from agent.identity.jwtsvid import mint_jwt_svid
from agent.identity.proto import delegatedidentity_pb2 as pb
from agent.identity.proto import delegatedidentity_pb2_grpc as pb_grpc
from agent.identity.proto import spire_types_pb2 as types_pb
from agent.identity.spiffeid import SpiffeId, TrustDomain
from agent.identity.x509svid import X509Svid, mint_x509_svid


@dataclass
class FakeEntry:
    selectors: frozenset[str]
    spiffe_id: SpiffeId
    hint: str = ""
    federates_with: tuple[str, ...] = ()
    svid: X509Svid | None = None


@dataclass(frozen=True)
class RecordedCall:
    method: str
    selectors: tuple[tuple[str, str], ...]  # (type, value) exactly as received
    pid: int
    audience: tuple[str, ...]
    metadata: dict[str, str] = field(default_factory=dict)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        self.code, self.message = code, message


def _status(method):
    """Turn an _Abort raised by a handler (unary or streaming) into a gRPC status."""
    if inspect.isgeneratorfunction(method):

        def streaming(self, request, context):
            try:
                yield from method(self, request, context)
            except _Abort as a:
                context.abort(a.code, a.message)

        return streaming

    def unary(self, request, context):
        try:
            return method(self, request, context)
        except _Abort as a:
            context.abort(a.code, a.message)

    return unary


class FakeSpireAgent(pb_grpc.DelegatedIdentityServicer):
    """A FAKE Delegated Identity server; use as a context manager (always stops)."""

    def __init__(
        self,
        trust_domain: str = "example.org",
        federated_trust_domain: str = "partner.example",
        *,
        bundle_key_form: str = "id",
        x509_ttl: int = 3600,
        jwt_ttl: int = 300,
    ):
        if bundle_key_form not in ("id", "name"):
            raise ValueError("bundle_key_form is 'id' (spiffe://td, as SPIRE's code) or 'name'")
        self.trust_domain = TrustDomain(trust_domain)
        self.federated_trust_domain = TrustDomain(federated_trust_domain)
        self.bundle_key_form = bundle_key_form
        self.x509_ttl, self.jwt_ttl = x509_ttl, jwt_ttl
        self.ca = SigningCA.generate(self.trust_domain)
        self.jwt_keys = JwtSigningKeys()
        self.federated_ca = SigningCA.generate(self.federated_trust_domain)
        self.federated_jwt_keys = JwtSigningKeys()
        self.caller_registered = True
        self.caller_authorized = True
        self.pids: dict[int, list[str]] = {}
        self.calls: list[RecordedCall] = []
        # Tests may corrupt what is sent: response_hook(type name, message) -> message.
        self.response_hook = None
        self._entries: list[FakeEntry] = []
        self._failures: list[tuple[grpc.StatusCode, str]] = []
        self._generation = 0
        self._cond = threading.Condition()
        self._stopping = False
        # A short path under /tmp: unix socket paths are limited to 107 bytes.
        self._dir = Path(tempfile.mkdtemp(prefix="credless-fake-spire-"))
        self.socket_path = str(self._dir / "admin.sock")
        self._server: grpc.Server | None = None

    # ---------------------------------------------------------------- test controls
    def register(
        self,
        selectors: Iterable[str],
        spiffe_id: str,
        *,
        hint: str = "",
        federates_with: Iterable[str] = (),
    ) -> None:
        """Add a registration entry (selectors → SPIFFE ID) and push it to streams."""
        sid = SpiffeId.parse(spiffe_id)
        entry = FakeEntry(frozenset(selectors), sid, hint, tuple(federates_with))
        entry.svid = mint_x509_svid(self.ca, sid, ttl=self.x509_ttl)
        with self._cond:
            self._entries.append(entry)
            self._bump()

    def rotate(self) -> None:
        """Re-issue every X509-SVID and rotate the JWT signing key; streams push new state."""
        with self._cond:
            for e in self._entries:
                e.svid = mint_x509_svid(self.ca, e.spiffe_id, ttl=self.x509_ttl)
            self.jwt_keys.rotate()
            self._bump()

    def fail_next(self, count: int, code: grpc.StatusCode, message: str) -> None:
        """Make the next `count` calls fail with `code` (e.g. an upstream outage)."""
        with self._cond:
            self._failures.extend([(code, message)] * count)

    def local_bundle(self) -> TrustBundle:
        return TrustBundle(self.trust_domain, self.ca.roots, self.jwt_keys.published())

    def federated_bundle(self) -> TrustBundle:
        return TrustBundle(
            self.federated_trust_domain,
            self.federated_ca.roots,
            self.federated_jwt_keys.published(),
        )

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> FakeSpireAgent:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        pb_grpc.add_DelegatedIdentityServicer_to_server(self, self._server)
        self._server.add_insecure_port("unix:" + self.socket_path)
        self._server.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> FakeSpireAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- internals
    def _bump(self) -> None:
        self._generation += 1
        self._cond.notify_all()

    def _key(self, td: TrustDomain) -> str:
        return td.id_string() if self.bundle_key_form == "id" else td.name

    def _record(self, method: str, request, context) -> None:
        sels = tuple((s.type, s.value) for s in getattr(request, "selectors", ()))
        self.calls.append(
            RecordedCall(
                method,
                sels,
                getattr(request, "pid", 0),
                tuple(getattr(request, "audience", ())),
                {m.key: m.value for m in context.invocation_metadata()},
            )
        )
        with self._cond:
            if self._failures:
                raise _Abort(*self._failures.pop(0))

    def _check_caller(self) -> None:
        if not self.caller_registered:
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        if not self.caller_authorized:
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED, "caller not configured as an authorized delegate"
            )

    def _workload_selectors(self, selectors, pid: int) -> frozenset[str]:
        if bool(selectors) == bool(pid):  # both or neither; pid 0 means unset
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "must provide either selectors or non-zero PID, but not both",
            )
        if pid:
            if pid not in self.pids:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, f"could not attest PID {pid}")
            return frozenset(self.pids[pid])
        if any(not s.type or not s.value for s in selectors):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "could not parse provided selectors")
        return frozenset(f"{s.type}:{s.value}" for s in selectors)

    def _matching(self, workload: frozenset[str]) -> list[FakeEntry]:
        return [e for e in self._entries if e.selectors <= workload]

    def _hooked(self, msg):
        return self.response_hook(type(msg).__name__, msg) if self.response_hook else msg

    @staticmethod
    def _id(sid: SpiffeId) -> types_pb.SPIFFEID:
        return types_pb.SPIFFEID(trust_domain=sid.trust_domain.name, path=sid.path)

    def _stream(self, context, build):
        """Send build() now and after every change, re-checking the caller each time."""
        sent = None
        while True:
            with self._cond:
                while self._generation == sent and not self._stopping and context.is_active():
                    self._cond.wait(0.05)
                if self._stopping or not context.is_active():
                    return
                sent = self._generation
                self._check_caller()
                msg = self._hooked(build())
            yield msg

    # ---------------------------------------------------------------- the API
    @_status
    def FetchJWTSVIDs(self, request, context):
        self._record("FetchJWTSVIDs", request, context)
        if not request.audience:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        self._check_caller()
        workload = self._workload_selectors(request.selectors, request.pid)
        with self._cond:
            entries = self._matching(workload)
            if not entries:
                raise _Abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
            svids = []
            for e in entries:
                j = mint_jwt_svid(
                    self.jwt_keys, e.spiffe_id, list(request.audience), ttl=self.jwt_ttl
                )
                svids.append(
                    types_pb.JWTSVID(
                        token=j.token,
                        id=self._id(e.spiffe_id),
                        expires_at=j.expires_at,
                        issued_at=j.issued_at,
                        hint=e.hint,
                    )
                )
        return self._hooked(pb.FetchJWTSVIDsResponse(svids=svids))

    @_status
    def SubscribeToX509SVIDs(self, request, context):
        self._record("SubscribeToX509SVIDs", request, context)
        self._check_caller()
        workload = self._workload_selectors(request.selectors, request.pid)

        def build():
            entries = self._matching(workload)
            feds = sorted(
                {TrustDomain.parse(t) for e in entries for t in e.federates_with}, key=str
            )
            return pb.SubscribeToX509SVIDsResponse(
                x509_svids=[
                    pb.X509SVIDWithKey(
                        x509_svid=types_pb.X509SVID(
                            cert_chain=[c.public_bytes(Encoding.DER) for c in e.svid.cert_chain],
                            id=self._id(e.spiffe_id),
                            expires_at=int(e.svid.not_after.timestamp()),
                            hint=e.hint,
                        ),
                        x509_svid_key=e.svid.key_pkcs8_der(),
                    )
                    for e in entries
                ],
                federates_with=[self._key(t) for t in feds],
            )

        yield from self._stream(context, build)

    @_status
    def SubscribeToX509Bundles(self, request, context):
        self._record("SubscribeToX509Bundles", request, context)
        self._check_caller()

        def build():
            return pb.SubscribeToX509BundlesResponse(
                ca_certificates={
                    self._key(b.trust_domain): b.x509_der()
                    for b in (self.local_bundle(), self.federated_bundle())
                }
            )

        yield from self._stream(context, build)

    @_status
    def SubscribeToJWTBundles(self, request, context):
        self._record("SubscribeToJWTBundles", request, context)
        self._check_caller()

        def build():
            out = {}
            for b in (self.local_bundle(), self.federated_bundle()):
                doc = json.loads(b.jwt_jwks_json())
                for key in doc["keys"]:
                    key.pop("use", None)  # StandardJWKS: no SPIFFE-specific members
                out[self._key(b.trust_domain)] = json.dumps(doc).encode()
            return pb.SubscribeToJWTBundlesResponse(bundles=out)

        yield from self._stream(context, build)
