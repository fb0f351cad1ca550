"""SVIDs from a SPIRE agent, through SPIRE's Delegated Identity API (SPEC-NOTES §2.3).

When SPIRE is the SVID source, credless does not mint SVIDs: it attests each workload itself
and asks the node's SPIRE agent for that workload's SVIDs, on the agent's *admin* socket.
Built from the public API definition (spire-api-sdk, `proto/spire/api/agent/
delegatedidentity/v1`); the tests run it against an in-test fake, never a real SPIRE agent.

SPIRE agent settings (agent block of agent.conf; see docs/spire.md):

    admin_socket_path    = "/run/spire/agent/private/admin.sock"   # off by default; not in
                                                                    # socket_path's directory
    authorized_delegates = ["spiffe://<td>/credless-agent"]

plus a registration entry that gives the credless agent itself that SPIFFE ID (SPIRE attests
the *caller* through the socket's peer credentials, then requires one of the caller's entry
IDs to be in `authorized_delegates`), and entries for the workloads credless will name.

**Security**: an authorized delegate can obtain the SVIDs of every workload whose selectors
it can name, i.e. impersonate every workload registered to this node. Treat the credless
agent's SPIFFE ID (and the host root it runs as) like the SPIRE agent itself.

Selectors, not PIDs: the API also accepts a `pid`, which makes SPIRE attest the process
itself. credless does not use it. It has already attested the process (eBPF exec events +
/proc, keyed by exec time, so a recycled PID is a different process image), and a PID is only
a name for a process until it exits: between credless deciding "this connection is PID 4242"
and SPIRE reading /proc/4242, the PID can be reused by another process, which would then get
the first one's identity. SPIRE documents that the delegate must prevent this (hold a pidfd
for the whole call or stream and discard results if the PID was recycled); passing the
selectors credless attested removes the race instead, and keeps one attestation (credless's)
behind both the embedded-CA and SPIRE sources.

Error semantics (SPEC-NOTES §2.1): InvalidArgument is not retried; Unavailable and
PermissionDenied (e.g. registration entries not synced yet) are retried with backoff — see
`retry()`. Streams carry the complete state in every message; when one ends, resubscribe.
Tokens and private keys never appear in repr(), str() or exception messages.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.identity.bundle import BundleError, TrustBundle, _reject_duplicate_members
from agent.identity.ca import PrivateKey
from agent.identity.proto import delegatedidentity_pb2 as pb
from agent.identity.proto import delegatedidentity_pb2_grpc as pb_grpc
from agent.identity.proto import spire_types_pb2 as types_pb
from agent.identity.spiffeid import InvalidSpiffeId, SpiffeId, TrustDomain

T = TypeVar("T")
DEFAULT_TIMEOUT = 10.0
# Harmless on the admin socket (SPIRE enforces it only for /SpiffeWorkloadAPI/ methods), and it
# keeps the client working if an operator fronts both APIs with one proxy.
_METADATA = (("workload.spiffe.io", "true"),)


# ------------------------------------------------------------------------------ errors
class SpireError(Exception):
    """A Delegated Identity call failed; the message says what to do. Never holds secrets."""

    retryable = False

    def __init__(
        self, message: str, *, rpc: str = "", code: grpc.StatusCode | None = None, details: str = ""
    ):
        super().__init__(message)
        self.rpc, self.code, self.details = rpc, code, details


class SpireNotAuthorized(SpireError):
    """PermissionDenied: not an authorized delegate, or no identity issued (yet)."""

    retryable = True


class SpireUnavailable(SpireError):
    """The SPIRE agent cannot be reached or cannot serve the request now."""

    retryable = True


class SpireInvalidRequest(SpireError):
    """The request is malformed (here or as judged by the SPIRE agent); retrying won't help."""


class SpireProtocolError(SpireError):
    """The SPIRE agent sent something that is not a valid SVID or bundle."""


def _clean(details: str | None) -> str:
    # Server text goes into our messages: keep it one short line.
    text = " ".join((details or "").split())
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------ results
@dataclass(frozen=True, repr=False)
class SpireJwtSvid:
    """A JWT-SVID from SPIRE. `expires_at` / `issued_at` are Unix seconds."""

    spiffe_id: SpiffeId
    token: str
    expires_at: int
    issued_at: int
    hint: str = ""

    def __repr__(self) -> str:  # the token is a credential: never shown
        return (
            f"SpireJwtSvid(spiffe_id={str(self.spiffe_id)!r}, expires_at={self.expires_at}, "
            f"issued_at={self.issued_at}, hint={self.hint!r})"
        )

    __str__ = __repr__


@dataclass(frozen=True, repr=False)
class SpireX509Svid:
    """An X509-SVID from SPIRE: chain leaf first; the key is parsed from PKCS#8 DER."""

    spiffe_id: SpiffeId
    cert_chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey = field(compare=False)
    expires_at: int
    hint: str = ""

    @property
    def leaf(self) -> x509.Certificate:
        return self.cert_chain[0]

    @property
    def fingerprint(self) -> str:
        return self.leaf.fingerprint(hashes.SHA256()).hex()

    def __repr__(self) -> str:
        return (
            f"SpireX509Svid(spiffe_id={str(self.spiffe_id)!r}, "
            f"leaf_sha256={self.fingerprint[:16]}, expires_at={self.expires_at}, "
            f"hint={self.hint!r})"
        )

    __str__ = __repr__


@dataclass(frozen=True)
class SpireX509Update(Sequence[SpireX509Svid]):
    """One SubscribeToX509SVIDs message: the workload's complete set of X509-SVIDs (a list-like
    sequence; empty means "no identity now": drop what you held) and the trust domains it
    federates with (names, normalised)."""

    svids: tuple[SpireX509Svid, ...]
    federates_with: tuple[str, ...] = ()

    def __getitem__(self, i):  # type: ignore[override]
        return self.svids[i]

    def __len__(self) -> int:
        return len(self.svids)


# ------------------------------------------------------------------------------ parsing
def parse_selector(text: str) -> types_pb.Selector:
    """`type:value` → Selector, split at the *first* colon (`unix:uid:1000` → unix / uid:1000)."""
    if not isinstance(text, str):
        raise SpireInvalidRequest(f"a selector must be a string, not {type(text).__name__}")
    kind, sep, value = text.partition(":")
    if not sep or not kind or not value or any(c.isspace() for c in kind):
        raise SpireInvalidRequest(
            f"invalid selector {text!r}: expected 'type:value', e.g. "
            "'unix:uid:1000' or 'k8s:ns:prod'"
        )
    return types_pb.Selector(type=kind, value=value)


def _selectors(rpc: str, selectors: Iterable[str]) -> list[types_pb.Selector]:
    if isinstance(selectors, str):
        selectors = [selectors]
    out = list(dict.fromkeys(selectors))  # a set in SPIRE's eyes: drop repeats, keep order
    if not out:
        raise SpireInvalidRequest(
            f"{rpc}: at least one selector is required (an empty set would name no workload)",
            rpc=rpc,
        )
    return [parse_selector(s) for s in out]


def _text(sels: Iterable[types_pb.Selector]) -> list[str]:
    return [f"{s.type}:{s.value}" for s in sels]


def _spiffe_id(msg: types_pb.SPIFFEID, what: str) -> SpiffeId:
    path = msg.path
    if path and not path.startswith("/"):  # SPIRE sends "/x"; tolerate a bare "x"
        path = "/" + path
    try:
        return SpiffeId.parse(f"spiffe://{msg.trust_domain}{path}")
    except InvalidSpiffeId as e:
        raise SpireProtocolError(
            f"{what}: the SPIRE agent sent an invalid SPIFFE ID ({e})"
        ) from None


def _trust_domain(key: str, what: str) -> str:
    """A bundle map key: `example.org` (documented) or `spiffe://example.org` (SPIRE's code)."""
    try:
        return TrustDomain.parse(key).name
    except InvalidSpiffeId as e:
        raise SpireProtocolError(f"{what}: bundle key is not a trust domain ({e})") from None


def split_der(data: bytes) -> list[bytes]:
    """Split concatenated DER structures (certificates) using their ASN.1 length headers."""
    out, i = [], 0
    while i < len(data):
        if data[i] != 0x30 or i + 2 > len(data):
            raise ValueError(f"byte {i}: not the start of a DER SEQUENCE")
        n = data[i + 1]
        if n < 0x80:
            start, length = i + 2, n
        else:
            k = n & 0x7F
            if not 1 <= k <= 4 or i + 2 + k > len(data):
                raise ValueError(f"byte {i}: unsupported DER length encoding")
            start, length = i + 2 + k, int.from_bytes(data[i + 2 : i + 2 + k], "big")
        if start + length > len(data):
            raise ValueError(f"byte {i}: DER structure runs past the end of the data")
        out.append(data[i : start + length])
        i = start + length
    return out


def _certs(blobs: Iterable[bytes], what: str) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_der_x509_certificate(d) for b in blobs for d in split_der(b))
    except ValueError as e:
        raise SpireProtocolError(f"{what}: not DER certificates ({e})") from None


def _first_per_hint(svids: list[Any]) -> list[Any]:
    # SPEC: hints are unique per response; if duplicates appear, take the first.
    seen: set[str] = set()
    out = []
    for svid in svids:
        if not (svid.hint and svid.hint in seen):
            seen.add(svid.hint)
            out.append(svid)
    return out


def _x509_svid(m: pb.X509SVIDWithKey) -> SpireX509Svid:
    sid = _spiffe_id(m.x509_svid.id, "X509-SVID")
    what = f"X509-SVID {sid}"
    chain = _certs(m.x509_svid.cert_chain, what)
    if not chain:
        raise SpireProtocolError(f"{what}: empty certificate chain")
    try:
        san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris != [str(sid)]:
        raise SpireProtocolError(f"{what}: the leaf certificate names {uris}, not {sid}")
    try:
        key = serialization.load_der_private_key(m.x509_svid_key, password=None)
    except (ValueError, TypeError):
        # Never echo key bytes, not even a prefix.
        raise SpireProtocolError(f"{what}: the private key is not unencrypted PKCS#8 DER") from None
    if (
        not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))
        or key.public_key() != chain[0].public_key()
    ):
        raise SpireProtocolError(f"{what}: the private key does not match the leaf certificate")
    return SpireX509Svid(sid, chain, key, int(m.x509_svid.expires_at), m.x509_svid.hint)


def _jwt_svid(m: types_pb.JWTSVID) -> SpireJwtSvid:
    sid = _spiffe_id(m.id, "JWT-SVID")
    try:
        sub = jwt.decode(m.token, options={"verify_signature": False}).get("sub")
    except jwt.PyJWTError:
        sub = None
    if sub != str(sid):  # cheap consistency check; signature validation is the caller's job
        raise SpireProtocolError(
            f"JWT-SVID for {sid}: the token is malformed or its sub does not match the SPIFFE ID"
        )
    return SpireJwtSvid(sid, m.token, int(m.expires_at), int(m.issued_at), m.hint)


def _jwt_bundle(td: str, data: bytes) -> TrustBundle:
    # SPIRE marshals these with bundleutil.StandardJWKS(): a plain JWKS of JWT authorities with
    # no "use" member, which a SPIFFE-bundle parser would ignore. Mark such keys jwt-svid.
    try:
        doc = json.loads(data, object_pairs_hook=_reject_duplicate_members)
        for key in doc.get("keys", []) if isinstance(doc, dict) else []:
            if isinstance(key, dict) and "use" not in key:
                key["use"] = "jwt-svid"
        return TrustBundle.from_jwks_json(TrustDomain(td), json.dumps(doc))
    except (ValueError, BundleError) as e:
        raise SpireProtocolError(f"JWT bundle for {td}: {e}") from None


def _bundle_map(entries: Any, what: str, convert: Callable[[str, bytes], T]) -> dict[str, T]:
    out: dict[str, T] = {}
    for key, value in entries.items():
        td = _trust_domain(key, what)
        if td in out:  # both "td" and "spiffe://td": ambiguous, refuse rather than pick one
            raise SpireProtocolError(f"{what}: trust domain {td} appears twice")
        out[td] = convert(td, value)
    return out


# ------------------------------------------------------------------------------ client
class Subscription(Iterator[T]):
    """A server stream as an iterator. `cancel()` is safe from another thread; iteration then
    stops (StopIteration) instead of raising."""

    def __init__(
        self,
        start: Callable[[], Any],
        convert: Callable[[Any], T],
        on_error: Callable[[grpc.RpcError], SpireError],
    ):
        self._start, self._convert, self._on_error = start, convert, on_error
        self._call: Any = None
        self._cancelled = False

    def __next__(self) -> T:
        if self._cancelled:
            raise StopIteration
        if self._call is None:
            self._call = self._start()
        try:
            msg = next(self._call)
        except grpc.RpcError as e:
            if self._cancelled:
                raise StopIteration from None
            raise self._on_error(e) from None
        try:
            return self._convert(msg)
        except SpireError:
            self.cancel()  # fail closed: a bad message ends the subscription
            raise

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    close = cancel

    def __enter__(self) -> Subscription[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class SpireDelegatedIdentityClient:
    """A client of SPIRE's Delegated Identity API on the agent's admin socket."""

    def __init__(self, admin_socket_path: str, *, timeout: float = DEFAULT_TIMEOUT):
        path = admin_socket_path
        for prefix in ("unix://", "unix:"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
                break
        if not path.startswith("/"):
            raise ValueError(
                f"admin_socket_path must be an absolute path to the SPIRE agent's "
                f"admin socket, got {admin_socket_path!r}"
            )
        self.socket_path = path
        self.timeout = timeout
        self._channel = grpc.insecure_channel("unix:" + path)
        self._stub = pb_grpc.DelegatedIdentityStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SpireDelegatedIdentityClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- error mapping
    def _check_socket(self, rpc: str) -> None:
        # A deterministic, actionable message for the commonest misconfiguration, instead of
        # gRPC's "failed to connect to all addresses".
        if not os.path.exists(self.socket_path):
            raise SpireUnavailable(
                f"{rpc}: no SPIRE agent admin socket at {self.socket_path}; is the SPIRE agent "
                f'running with admin_socket_path = "{self.socket_path}"? (will retry)',
                rpc=rpc,
                code=grpc.StatusCode.UNAVAILABLE,
            )

    def _error(self, rpc: str, err: grpc.RpcError, selectors: Iterable[str] = ()) -> SpireError:
        code, details = err.code(), _clean(err.details())
        where = f"the SPIRE agent at {self.socket_path}"
        kw = {"rpc": rpc, "code": code, "details": details}
        if code == grpc.StatusCode.PERMISSION_DENIED:
            fix = (
                "add this agent's SPIFFE ID to authorized_delegates in the SPIRE agent config "
                "(and register an entry for this agent itself)"
            )
            if "authorized delegate" not in details:  # "no identity issued" is ambiguous
                fix = (
                    f"either {fix}, or no registration entry for this node matches the "
                    f"selectors {sorted(selectors)}"
                )
            return SpireNotAuthorized(f"{rpc} denied by {where} ({details}): {fix}", **kw)
        if code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.CANCELLED,
        ):  # CANCELLED here: by the server, not by us
            return SpireUnavailable(
                f"{rpc}: {where} is unavailable ({details}); is the SPIRE agent running with "
                f'admin_socket_path = "{self.socket_path}"? (will retry)',
                **kw,
            )
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return SpireInvalidRequest(
                f"{rpc} rejected by {where} as invalid ({details}); "
                "check the selectors and audience, retrying won't help",
                **kw,
            )
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return SpireError(
                f"{rpc}: {where} does not serve the Delegated Identity API; "
                "admin_socket_path must name the admin socket, not the Workload "
                "API socket_path",
                **kw,
            )
        return SpireError(f"{rpc} failed at {where}: {code.name} ({details})", **kw)

    # -------------------------------------------------------------- RPCs
    def _subscribe(
        self,
        rpc: str,
        method: Any,
        req: Any,
        convert: Callable[[Any], T],
        sels: list[types_pb.Selector] = (),
    ) -> Subscription[T]:
        self._check_socket(rpc)  # eagerly, so a missing socket is reported at once
        return Subscription(
            lambda: method(req, metadata=_METADATA),
            convert,
            lambda e: self._error(rpc, e, _text(sels)),
        )

    def fetch_jwt_svids(
        self, selectors: Iterable[str], audience: Iterable[str] | str
    ) -> list[SpireJwtSvid]:
        """JWT-SVIDs for the workload described by `selectors`, for `audience` (≥ 1 value)."""
        rpc = "FetchJWTSVIDs"
        sels = _selectors(rpc, selectors)
        auds = [audience] if isinstance(audience, str) else list(audience)
        if not auds or not all(isinstance(a, str) and a for a in auds):
            raise SpireInvalidRequest(
                f"{rpc}: audience must be one or more non-empty strings (e.g. the OAuth issuer)",
                rpc=rpc,
            )
        self._check_socket(rpc)
        req = pb.FetchJWTSVIDsRequest(audience=auds, selectors=sels)
        try:
            resp = self._stub.FetchJWTSVIDs(req, timeout=self.timeout, metadata=_METADATA)
        except grpc.RpcError as e:
            raise self._error(rpc, e, _text(sels)) from None
        return _first_per_hint([_jwt_svid(s) for s in resp.svids])

    def subscribe_x509_svids(self, selectors: Iterable[str]) -> Subscription[SpireX509Update]:
        """Every message: the workload's complete set of X509-SVIDs (see SpireX509Update)."""
        rpc = "SubscribeToX509SVIDs"
        sels = _selectors(rpc, selectors)
        req = pb.SubscribeToX509SVIDsRequest(selectors=sels)

        def convert(msg: pb.SubscribeToX509SVIDsResponse) -> SpireX509Update:
            svids = _first_per_hint([_x509_svid(m) for m in msg.x509_svids])
            feds = tuple(_trust_domain(t, "federates_with") for t in msg.federates_with)
            return SpireX509Update(tuple(svids), feds)

        return self._subscribe(rpc, self._stub.SubscribeToX509SVIDs, req, convert, sels)

    def subscribe_x509_bundles(self) -> Subscription[dict[str, TrustBundle]]:
        """Every message: trust domain name → bundle (X.509 authorities only), local and
        federated."""
        rpc = "SubscribeToX509Bundles"

        def convert(msg: pb.SubscribeToX509BundlesResponse) -> dict[str, TrustBundle]:
            return _bundle_map(
                msg.ca_certificates,
                "X.509 bundles",
                lambda td, der: TrustBundle(
                    TrustDomain(td), _certs([der], f"X.509 bundle for {td}")
                ),
            )

        return self._subscribe(
            rpc, self._stub.SubscribeToX509Bundles, pb.SubscribeToX509BundlesRequest(), convert
        )

    def subscribe_jwt_bundles(self) -> Subscription[dict[str, TrustBundle]]:
        """Every message: trust domain name → bundle (JWT authorities only)."""
        return self._subscribe(
            "SubscribeToJWTBundles",
            self._stub.SubscribeToJWTBundles,
            pb.SubscribeToJWTBundlesRequest(),
            lambda msg: _bundle_map(msg.bundles, "JWT bundles", _jwt_bundle),
        )


# ------------------------------------------------------------------------------ retry
def backoff_delays(
    initial: float = 0.5,
    maximum: float = 30.0,
    multiplier: float = 2.0,
    rand: Callable[[], float] = random.random,
) -> Iterator[float]:
    """Exponential backoff with "equal jitter": each delay is in [d/2, d] for d = initial ·
    multiplier^n capped at `maximum`. The floor keeps a herd of agents restarted together from
    hammering a recovering SPIRE agent; the jitter spreads them out."""
    d = initial
    while True:
        yield d / 2 + rand() * d / 2
        d = min(maximum, d * multiplier)


def retry(
    fn: Callable[[], T],
    *,
    attempts: int = 6,
    initial: float = 0.5,
    maximum: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    rand: Callable[[], float] = random.random,
    on_retry: Callable[[SpireError, float], None] | None = None,
) -> T:
    """Call `fn`, retrying retryable SpireErrors (Unavailable, PermissionDenied) with backoff.

    Anything else (InvalidArgument, protocol errors) propagates at once; after `attempts`
    tries the last error propagates. `sleep` and `rand` are injectable for tests.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    delays = backoff_delays(initial, maximum, rand=rand)
    for n in range(1, attempts + 1):
        try:
            return fn()
        except SpireError as e:
            if not e.retryable or n == attempts:
                raise
            delay = next(delays)
            if on_retry is not None:
                on_retry(e, delay)
            sleep(delay)
    raise AssertionError("unreachable")
