"""JWT-SVIDs (JWT-SVID.md): minting and validation.

The keys that sign them, and their rotation, are agent/identity/jwt_rotation.py; minting
enforces `ttl <= max_jwt_ttl`, which is what keeps a retired key published long enough for
every token it signed.

Claims: `sub`, `aud`, `exp`, `iat`, `iss` (default: the SPIFFE ID — OIDC `private_key_jwt`
servers such as oidc-provider require iss == client_id == sub) and `jti` (required there too).
`aud` is a JSON string when there is one audience and an array otherwise: RFC 7519 §4.1.3
allows both, SPIRE/go-jose serialise a single audience as a string, rfc7523bis wants the AS
issuer as the *sole* value, and py-spiffe's validator and oidc-provider accept either form.

Tokens are credentials: they never appear in repr(), logs or exception messages; use `jti`
and `kid` to refer to them.

Minting is hand-written because py-spiffe only reads JWT-SVIDs. Validation is too, not
py-spiffe's `JwtSvid.parse_and_validate`, because that (py-spiffe 0.3; each shown in
tests/unit/test_identity_py_spiffe.py) accepts header parameters the spec forbids (`jku`,
`x5u`, `cty`), checks `exp` only against the wall clock (no injectable `now`, no leeway),
takes its SPIFFE ID parser's view of `sub` (a trailing newline, upper case), and costs more
per token (it re-encodes the key as PEM and PyJWT re-parses it). Here the token is parsed
once and the signature checked with PyJWT's algorithm for the header's `alg`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.types import Options

from agent.identity.bundle import PublicKey, TrustBundle
from agent.identity.spiffeid import InvalidSpiffeId, SpiffeId, TrustDomain

if TYPE_CHECKING:  # jwt_rotation imports JwtSvidError from here
    from agent.identity.jwt_rotation import JwtSigningKeys

# JWT-SVID.md §3: the only algorithms a JWT-SVID may use; anything else (none, HS*, EdDSA) is
# refused.
ALLOWED_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
_ALLOWED_HEADER = frozenset({"alg", "kid", "typ"})
_EC_CURVE = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
DEFAULT_JWT_SVID_TTL = 300


class JwtSvidError(ValueError):
    """A JWT-SVID is invalid, or cannot be minted as requested. Never contains the token."""


@dataclass(frozen=True, repr=False)
class JwtSvid:
    """A JWT-SVID. `issued_at` / `expires_at` are JWT NumericDates (Unix seconds)."""

    token: str
    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    jti: str | None
    issued_at: int
    expires_at: int
    kid: str = ""
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __repr__(self) -> str:
        return (
            f"JwtSvid(spiffe_id={str(self.spiffe_id)!r}, audience={list(self.audience)!r}, "
            f"jti={self.jti!r}, kid={self.kid!r}, expires_at={self.expires_at})"
        )

    __str__ = __repr__


_RESERVED = frozenset({"sub", "aud", "exp", "iat", "jti", "iss"})


def mint_jwt_svid(
    keys: JwtSigningKeys,
    spiffe_id: SpiffeId | str,
    audience: Iterable[str] | str,
    ttl: int = DEFAULT_JWT_SVID_TTL,
    iss: str | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    jti: bool | str = True,
) -> JwtSvid:
    """Sign a JWT-SVID for `spiffe_id` with the current key of `keys`."""
    sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
    if sid.is_root:
        raise JwtSvidError(f"{sid} names a trust domain, not a workload; use an ID with a path")
    auds = (audience,) if isinstance(audience, str) else tuple(audience)
    if not auds or not all(isinstance(a, str) and a for a in auds):
        raise JwtSvidError("audience must be one or more non-empty strings (JWT-SVID.md §3.2)")
    if not 0 < ttl <= keys.max_jwt_ttl:
        raise JwtSvidError(
            f"ttl must be between 1 and max_jwt_ttl ({keys.max_jwt_ttl:g}s), got "
            f"{ttl}; a longer-lived token would outlive its key's publication"
        )
    now = keys.clock()
    key = keys.current(now)
    sub = str(sid)
    iat = int(now)
    exp = iat + int(ttl)
    token_id = secrets.token_urlsafe(16) if jti is True else (jti or None)
    claims: dict[str, Any] = {
        "sub": sub,
        "aud": auds[0] if len(auds) == 1 else list(auds),
        "exp": exp,
        "iat": iat,
        "iss": iss if iss is not None else sub,
    }
    if token_id:
        claims["jti"] = token_id
    if extra_claims:
        clash = _RESERVED & extra_claims.keys()
        if clash:
            raise JwtSvidError(f"extra_claims must not set {sorted(clash)}; use the parameters")
        claims.update(extra_claims)
    # PyJWT does the JWS work; alg + the cached {kid, typ} are the only header members (§2.2).
    token = jwt.encode(claims, key.private_key, algorithm=key.alg, headers=key.headers)  # type: ignore[arg-type]
    return JwtSvid(token, sid, auds, token_id, iat, exp, key.kid, claims)


# PyJWT's decode without a key: parse and check the JOSE structure only.
_UNVERIFIED: Options = {"verify_signature": False}
_VERIFIERS = {alg: jwt.get_algorithm_by_name(alg) for alg in ALLOWED_ALGS}


def _key_fits(alg: str, key: Any) -> bool:
    if alg.startswith("ES"):
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _EC_CURVE[alg]
    return isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048


def _lookup(bundle_keys: Mapping[Any, Any], td: TrustDomain) -> Mapping[str, PublicKey] | None:
    found = bundle_keys.get(td, bundle_keys.get(td.name))
    if isinstance(found, TrustBundle):
        return found.jwt_authorities
    return found


def validate_jwt_svid(
    token: str,
    audience: str,
    bundle_keys: Mapping[TrustDomain | str, TrustBundle | Mapping[str, PublicKey]],
    *,
    now: float | None = None,
    leeway: float = 0,
) -> JwtSvid:
    """Validate a JWT-SVID per JWT-SVID.md §3-§5 and return it.

    `bundle_keys` maps a trust domain (or its name) to its bundle or to its jwt-svid keys
    (kid → public key); the token is checked only against the keys of the trust domain named
    in its `sub`. A `kid` is required, as in go-spiffe and py-spiffe.
    """
    if not isinstance(token, str) or token.count(".") != 2:
        raise JwtSvidError("not a JWS compact serialization (JWT-SVID.md §2.1)")
    try:
        # One parse for header, claims and signature; the signature is checked below, once
        # the key is chosen. Every claim check is ours, against the injectable clock.
        parsed = jwt.decode_complete(token, options=_UNVERIFIED)
    except jwt.PyJWTError as e:
        raise JwtSvidError(f"malformed JWT: {e}") from None
    header, claims = parsed["header"], parsed["payload"]
    extra = set(header) - _ALLOWED_HEADER
    if extra:
        raise JwtSvidError(f"header parameters {sorted(extra)} are not allowed in a JWT-SVID (§2)")
    alg = header.get("alg")
    if alg not in ALLOWED_ALGS:
        raise JwtSvidError(
            f"alg {alg!r} is not allowed; a JWT-SVID uses one of {sorted(ALLOWED_ALGS)}"
        )
    if "typ" in header and header["typ"] not in ("JWT", "JOSE"):
        raise JwtSvidError(f"typ {header['typ']!r} is not allowed; only 'JWT' or 'JOSE' (§2.3)")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwtSvidError("the header has no kid, so no bundle key can be chosen")
    sub = claims.get("sub")
    if not isinstance(sub, str):
        raise JwtSvidError("the sub claim is missing; a JWT-SVID's sub is its SPIFFE ID (§3.1)")
    try:
        sid = SpiffeId.parse(sub)
    except InvalidSpiffeId as e:
        raise JwtSvidError(f"the sub claim is not a SPIFFE ID: {e}") from None
    keys = _lookup(bundle_keys, sid.trust_domain)
    if keys is None:
        raise JwtSvidError(f"no bundle for trust domain {sid.trust_domain} (from sub {sub})")
    key = keys.get(kid)
    if key is None:
        raise JwtSvidError(
            f"kid {kid!r} is not in the jwt-svid keys of {sid.trust_domain}; "
            "the bundle may be stale (refresh it) or the token forged"
        )
    if not _key_fits(alg, key):
        raise JwtSvidError(f"alg {alg} does not match the {type(key).__name__} of kid {kid!r}")
    signing_input = token[: token.rindex(".")].encode()
    verifier = _VERIFIERS[alg]
    try:
        verified = verifier.verify(signing_input, verifier.prepare_key(key), parsed["signature"])
    except jwt.PyJWTError as e:
        raise JwtSvidError(f"invalid JWT: {e}") from None
    if not verified:
        raise JwtSvidError(f"signature does not verify with kid {kid!r}")
    if "jti" in claims and not isinstance(claims["jti"], str):
        raise JwtSvidError("invalid JWT: JWT ID must be a string")

    aud = claims.get("aud")
    auds = (aud,) if isinstance(aud, str) else tuple(aud) if isinstance(aud, list) else ()
    if not auds or not all(isinstance(a, str) for a in auds):
        raise JwtSvidError("the aud claim is missing or malformed (§3.2)")
    if audience not in auds:
        raise JwtSvidError(f"audience {audience!r} is not in the token's aud {list(auds)!r}")
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        raise JwtSvidError("the exp claim is missing or not a number (§3.3)")
    t = time.time() if now is None else now
    if t >= exp + leeway:
        raise JwtSvidError(f"the token expired at {int(exp)} (jti {claims.get('jti')!r})")
    nbf = claims.get("nbf")
    if isinstance(nbf, (int, float)) and not isinstance(nbf, bool) and t + leeway < nbf:
        raise JwtSvidError(f"the token is not valid before {int(nbf)}")
    iat = claims.get("iat")
    jti = claims.get("jti")
    return JwtSvid(
        token,
        sid,
        auds,
        jti if isinstance(jti, str) else None,
        int(iat) if isinstance(iat, (int, float)) else 0,
        int(exp),
        kid,
        MappingProxyType(claims),
    )
