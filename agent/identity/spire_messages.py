"""The Delegated Identity API's messages as credless types, checked; no I/O.

Requests: selectors as SPIRE's `type:value` pairs. Responses: SVIDs whose SPIFFE ID, chain and
key agree with each other, and bundle maps keyed by trust domain name. Anything malformed is a
SpireProtocolError (fail closed); nothing here echoes a token or key bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent import jsondoc
from agent.identity.bundle import BundleError, TrustBundle, reject_duplicate_members
from agent.identity.proto import delegatedidentity_pb2 as pb
from agent.identity.proto import spire_types_pb2 as types_pb
from agent.identity.spiffeid import InvalidSpiffeId, SpiffeId, TrustDomain
from agent.identity.spire_errors import SpireInvalidRequest, SpireProtocolError
from agent.identity.x509svid import X509Svid

T = TypeVar("T")


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
class SpireX509Svid(X509Svid):
    """An X509-SVID from SPIRE: chain leaf first; the key is parsed from PKCS#8 DER.
    `expires_at` is what SPIRE said (Unix seconds), `not_after` what the leaf says."""

    expires_at: int = 0
    hint: str = ""

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

    @overload
    def __getitem__(self, i: int) -> SpireX509Svid: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[SpireX509Svid, ...]: ...
    def __getitem__(self, i: int | slice) -> SpireX509Svid | tuple[SpireX509Svid, ...]:
        return self.svids[i]

    def __len__(self) -> int:
        return len(self.svids)


# ------------------------------------------------------------------------------ requests
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


def selector_messages(rpc: str, selectors: Iterable[str]) -> list[types_pb.Selector]:
    if isinstance(selectors, str):
        selectors = [selectors]
    out = list(dict.fromkeys(selectors))  # a set in SPIRE's eyes: drop repeats, keep order
    if not out:
        raise SpireInvalidRequest(
            f"{rpc}: at least one selector is required (an empty set would name no workload)",
            rpc=rpc,
        )
    return [parse_selector(s) for s in out]


def selector_texts(sels: Iterable[types_pb.Selector]) -> list[str]:
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
    leaf = chain[0]
    return SpireX509Svid(
        sid,
        chain,
        key,
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
        int(m.x509_svid.expires_at),
        m.x509_svid.hint,
    )


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
        doc = jsondoc.loads(data, object_pairs_hook=reject_duplicate_members)
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


# ------------------------------------------------------------------------------ responses
def x509_update(msg: pb.SubscribeToX509SVIDsResponse) -> SpireX509Update:
    svids = _first_per_hint([_x509_svid(m) for m in msg.x509_svids])
    feds = tuple(_trust_domain(t, "federates_with") for t in msg.federates_with)
    return SpireX509Update(tuple(svids), feds)


def jwt_svids(msg: pb.FetchJWTSVIDsResponse) -> list[SpireJwtSvid]:
    return _first_per_hint([_jwt_svid(s) for s in msg.svids])


def x509_bundles(msg: pb.SubscribeToX509BundlesResponse) -> dict[str, TrustBundle]:
    return _bundle_map(
        msg.ca_certificates,
        "X.509 bundles",
        lambda td, der: TrustBundle(TrustDomain(td), _certs([der], f"X.509 bundle for {td}")),
    )


def jwt_bundles(msg: pb.SubscribeToJWTBundlesResponse) -> dict[str, TrustBundle]:
    return _bundle_map(msg.bundles, "JWT bundles", _jwt_bundle)
