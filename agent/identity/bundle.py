"""The SPIFFE trust bundle of one trust domain and its JWKS document.

Spec: SPIFFE_Trust_Domain_and_Bundle.md §4 (SPEC-NOTES §1.4).

A `TrustBundle` is immutable: readers (Workload API streams, the bundle endpoint) can hold a
reference without locks, and every change goes through `updated()`, which is the one place
that bumps `spiffe_sequence` — so the sequence changes exactly when the content does.

Bundles of different trust domains are never merged: each bundle is bound to the trust domain
it was configured or created for, never one inferred from its content.

Hand-written, not py-spiffe's `X509Bundle` / `JwtBundle`, because py-spiffe 0.3 has no SPIFFE
bundle document at all (tests/unit/test_identity_py_spiffe.py shows each point):
`JwtBundle.parse` reads a plain JWKS, so it ignores `use` (an x509-svid key becomes a JWT
authority, and any document holding a CA fails for lack of a `kid`), keeps no
`spiffe_sequence` / `spiffe_refresh_hint`, drops a malformed key silently while keeping the
rest, and lets a repeated kid or JSON member overwrite the first; `X509Bundle` is a mutable,
unordered set. What py-spiffe reads is produced here: `x509_der()` and `jwt_jwks_json()` are
the Workload API encodings its `X509Bundle.parse_raw` and `JwtBundle.parse` consume.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from agent import jsondoc
from agent.identity.spiffeid import TrustDomain

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

USE_X509 = "x509-svid"
USE_JWT = "jwt-svid"
DEFAULT_REFRESH_HINT = 300  # seconds; what consumers assume when the hint is absent (§4.1.2)

# RFC 7638 §3.2: the required members, per kty, that make up the thumbprint input.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}
# Members that only a *private* JWK carries (RFC 7518 §6.2.2, §6.3.2). A bundle is public.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class BundleError(ValueError):
    """A bundle document is malformed or breaks the SPIFFE bundle rules."""


def public_key_to_jwk(key: PublicKey) -> dict[str, str]:
    """The public JWK members (kty + key parameters) of an EC or RSA public key."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ECAlgorithm.to_jwk(key, as_dict=True)
    if isinstance(key, rsa.RSAPublicKey):
        return RSAAlgorithm.to_jwk(key, as_dict=True)
    raise BundleError(f"unsupported public key type {type(key).__name__}; use an EC or RSA key")


def jwk_thumbprint(key: PublicKey) -> str:
    """RFC 7638 JWK SHA-256 thumbprint, base64url without padding (used as the JWT `kid`)."""
    jwk = public_key_to_jwk(key)
    members = {m: jwk[m] for m in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    digest = hashlib.sha256(canonical).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _jwk_to_public_key(jwk: Mapping[str, Any], where: str) -> PublicKey:
    key: object
    try:
        if jwk["kty"] == "EC":
            key = ECAlgorithm.from_jwk(dict(jwk))
        else:
            key = RSAAlgorithm.from_jwk(dict(jwk))
    except Exception as e:  # noqa: BLE001 — PyJWT raises several types for malformed parameters
        raise BundleError(f"{where}: invalid {jwk['kty']} key parameters ({e})") from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise BundleError(f"{where}: expected a public key")
    return key


def reject_duplicate_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads` object hook: a repeated member is a `BundleError`, not "the last one wins"."""
    # A JSON object with a repeated member is ambiguous (parsers disagree on which wins),
    # which is exactly the kind of ambiguity an attacker-supplied bundle would exploit.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise BundleError(f"duplicate JSON member {k!r}")
        out[k] = v
    return out


@dataclass(frozen=True, eq=False)
class TrustBundle:
    """The X.509 and JWT authorities of one trust domain.

    ``x509_authorities`` are CA certificates (trust anchors for X509-SVIDs);
    ``jwt_authorities`` maps ``kid`` to the public key that verifies JWT-SVIDs.
    Compare bundles with `same_content()` (``==`` is identity).
    """

    trust_domain: TrustDomain
    x509_authorities: Sequence[x509.Certificate] = ()
    jwt_authorities: Mapping[str, PublicKey] = field(default_factory=dict)
    sequence: int = 0
    refresh_hint: int = DEFAULT_REFRESH_HINT

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            object.__setattr__(self, "trust_domain", TrustDomain.parse(str(self.trust_domain)))
        object.__setattr__(self, "x509_authorities", tuple(self.x509_authorities))
        object.__setattr__(self, "jwt_authorities", MappingProxyType(dict(self.jwt_authorities)))
        if not isinstance(self.sequence, int) or self.sequence < 0:
            raise BundleError(f"sequence must be a non-negative integer, got {self.sequence!r}")
        if not isinstance(self.refresh_hint, int) or self.refresh_hint <= 0:
            raise BundleError(
                f"refresh_hint must be a positive number of seconds, got {self.refresh_hint!r}"
            )
        for kid in self.jwt_authorities:
            if not isinstance(kid, str) or not kid:
                raise BundleError("every JWT authority needs a non-empty string kid (§4.2.2)")

    @classmethod
    def new(
        cls,
        trust_domain: TrustDomain,
        x509_authorities: Sequence[x509.Certificate] = (),
        jwt_authorities: Mapping[str, PublicKey] | None = None,
        refresh_hint: int = DEFAULT_REFRESH_HINT,
        now: float | None = None,
    ) -> TrustBundle:
        """A first bundle whose sequence is seeded from the clock (Unix seconds).

        Why: the sequence must only ever grow, and this module keeps no state on disk. Seeding
        from the clock keeps a restarted agent's bundle "newer" than the one it published before
        (as long as the clock does not step back and updates average under one per second).
        """
        seq = int(time.time() if now is None else now)
        return cls(trust_domain, x509_authorities, jwt_authorities or {}, seq, refresh_hint)

    # ---------------------------------------------------------------- content and updates
    def _content_key(self) -> tuple:
        return (
            tuple(c.public_bytes(serialization.Encoding.DER) for c in self.x509_authorities),
            tuple(sorted((k, _spki(v)) for k, v in self.jwt_authorities.items())),
            self.refresh_hint,
        )

    def same_content(self, other: TrustBundle) -> bool:
        return (
            self.trust_domain == other.trust_domain and self._content_key() == other._content_key()
        )

    def updated(
        self,
        *,
        x509_authorities: Sequence[x509.Certificate] | None = None,
        jwt_authorities: Mapping[str, PublicKey] | None = None,
        refresh_hint: int | None = None,
    ) -> TrustBundle:
        """The bundle with the given parts replaced and ``sequence + 1``.

        Returns ``self`` (same sequence) when nothing actually changed.
        """
        candidate = TrustBundle(
            self.trust_domain,
            self.x509_authorities if x509_authorities is None else x509_authorities,
            self.jwt_authorities if jwt_authorities is None else jwt_authorities,
            self.sequence,
            self.refresh_hint if refresh_hint is None else refresh_hint,
        )
        if candidate.same_content(self):
            return self
        object.__setattr__(candidate, "sequence", self.sequence + 1)
        return candidate

    # ---------------------------------------------------------------- encodings
    def x509_der(self) -> bytes:
        """CA certificates as concatenated DER (the Workload API's `bundle` field)."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.x509_authorities)

    def _jwks(self, x509_keys: bool, jwt_keys: bool, spiffe_fields: bool) -> dict[str, Any]:
        keys: list[dict[str, Any]] = []
        if x509_keys:
            for cert in self.x509_authorities:
                jwk: dict[str, Any] = dict(public_key_to_jwk(cert.public_key()))  # type: ignore[arg-type]
                jwk["use"] = USE_X509
                # Standard base64 (not base64url), RFC 7517 §4.7; exactly one cert and no kid
                # (§4.2.1).
                der = cert.public_bytes(serialization.Encoding.DER)
                jwk["x5c"] = [base64.b64encode(der).decode()]
                keys.append(jwk)
        if jwt_keys:
            for kid, key in self.jwt_authorities.items():
                jwk = public_key_to_jwk(key)
                jwk["use"] = USE_JWT
                jwk["kid"] = kid
                keys.append(jwk)
        doc: dict[str, Any] = {"keys": keys}
        if spiffe_fields:
            doc = {
                "spiffe_sequence": self.sequence,
                "spiffe_refresh_hint": self.refresh_hint,
                **doc,
            }
        return doc

    def to_jwks_json(self) -> str:
        """The SPIFFE bundle document (for the bundle endpoint and federation), §4."""
        return json.dumps(self._jwks(True, True, True), separators=(",", ":"))

    def jwt_jwks_json(self) -> str:
        """Only the JWT authorities, as a plain JWKS: the per-trust-domain value of the Workload
        API's FetchJWTBundles (clients such as py-spiffe require a kid on every key there)."""
        return json.dumps(self._jwks(False, True, False), separators=(",", ":"))

    @classmethod
    def from_jwks_json(cls, trust_domain: TrustDomain, data: str | bytes) -> TrustBundle:
        """Parse a SPIFFE bundle document for `trust_domain` (supplied, never inferred).

        Keys with an unknown or missing ``use`` or an unknown ``kty`` are ignored, as §4.2
        requires. An ``x509-svid`` key must carry exactly one ``x5c`` certificate matching the
        key parameters and no ``kid``; a ``jwt-svid`` key must carry a unique ``kid``.
        """
        try:
            doc = jsondoc.loads(data, object_pairs_hook=reject_duplicate_members)
        except (ValueError, UnicodeDecodeError) as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"bundle for {trust_domain} is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise BundleError(
                f"bundle for {trust_domain} must be a JSON object with a 'keys' array"
            )
        seq = doc.get("spiffe_sequence", 0)
        hint = doc.get("spiffe_refresh_hint", DEFAULT_REFRESH_HINT)
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise BundleError(f"spiffe_sequence must be a non-negative integer, got {seq!r}")
        if isinstance(hint, bool) or not isinstance(hint, int) or hint <= 0:
            raise BundleError(f"spiffe_refresh_hint must be a positive integer, got {hint!r}")

        cas: list[x509.Certificate] = []
        jwt_keys: dict[str, PublicKey] = {}
        for i, jwk in enumerate(doc["keys"]):
            where = f"bundle for {trust_domain}, keys[{i}]"
            if not isinstance(jwk, dict):
                raise BundleError(f"{where}: a key must be a JSON object")
            if not isinstance(jwk.get("kty"), str):
                raise BundleError(f"{where}: 'kty' is required (RFC 7517 §4.1)")
            use = jwk.get("use")
            if use not in (USE_X509, USE_JWT) or jwk["kty"] not in _THUMBPRINT_MEMBERS:
                continue  # §4.2: ignore unknown use (incl. wit-svid) and unknown kty
            leaked = _PRIVATE_MEMBERS & jwk.keys()
            if leaked:
                raise BundleError(
                    f"{where}: contains private key members {sorted(leaked)}; a "
                    "bundle must only hold public keys (rotate the leaked key)"
                )
            key = _jwk_to_public_key(jwk, where)
            if use == USE_X509:
                if "kid" in jwk:
                    raise BundleError(f"{where}: an x509-svid key must not have a 'kid' (§4.2.1)")
                x5c = jwk.get("x5c")
                if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
                    raise BundleError(
                        f"{where}: an x509-svid key must have 'x5c' with exactly one "
                        "base64 DER certificate"
                    )
                try:
                    cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
                except ValueError as e:
                    raise BundleError(
                        f"{where}: x5c[0] is not a base64 DER certificate ({e})"
                    ) from None
                if _spki(cert.public_key()) != _spki(key):  # type: ignore[arg-type]
                    raise BundleError(
                        f"{where}: the key parameters do not match the x5c certificate"
                    )
                cas.append(cert)
            else:
                kid = jwk.get("kid")
                if not isinstance(kid, str) or not kid:
                    raise BundleError(
                        f"{where}: a jwt-svid key must have a non-empty 'kid' (§4.2.2)"
                    )
                if kid in jwt_keys:
                    raise BundleError(f"{where}: duplicate kid {kid!r}")
                jwt_keys[kid] = key
        return cls(trust_domain, cas, jwt_keys, seq, hint)
