"""JWT-SVIDs (JWT-SVID.md): signing-key rotation, minting and validation.

Key lifecycle (why three phases): a validator only learns our keys by polling the bundle, so
 1. *prepared*  — the next key is published `prepublish` before it signs anything (SPIFFE
                  federation asks for several refresh hints), so validators already know it;
 2. *current*   — it signs for `rotate_every`;
 3. *retired*   — it stays published until `retired_at + max_jwt_ttl`, when the last token it
                  signed has expired, then it is dropped.
Minting enforces `ttl <= max_jwt_ttl`, which is what makes phase 3 long enough.

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

import datetime as dt
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.types import Options

from agent.identity.bundle import PublicKey, TrustBundle, jwk_thumbprint
from agent.identity.jwt_keys import (
    SAVE_RETRY_SECONDS,
    JwtKeyFile,
    JwtKeyFileError,
    KeySetState,
    StoredKey,
)
from agent.identity.spiffeid import InvalidSpiffeId, SpiffeId, TrustDomain

# JWT-SVID.md §3: the only algorithms a JWT-SVID may use; anything else (none, HS*, EdDSA) is
# refused.
ALLOWED_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
_ALLOWED_HEADER = frozenset({"alg", "kid", "typ"})
_EC_CURVE = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
# Algorithms we can *sign* with; validation accepts the whole ALLOWED_ALGS set.
_KEYGEN: dict[str, Callable[[], Any]] = {
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ES384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "PS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
}
DEFAULT_JWT_SVID_TTL = 300
Seconds = float | int | dt.timedelta


class JwtSvidError(ValueError):
    """A JWT-SVID is invalid, or cannot be minted as requested. Never contains the token."""


def _secs(v: Seconds) -> float:
    return v.total_seconds() if isinstance(v, dt.timedelta) else float(v)


@dataclass(frozen=True)
class JwtSigningKey:
    """One signing key.

    `activates_at` is when it starts (or will start) signing; `retired_at` when it stopped.
    """

    kid: str
    alg: str
    private_key: Any = field(repr=False)
    activates_at: float
    retired_at: float | None = None
    # Built once per key so minting does no per-call header work.
    headers: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", {"kid": self.kid, "typ": "JWT"})

    @property
    def public_key(self) -> PublicKey:
        return self.private_key.public_key()


class JwtSigningKeys:
    """The agent's JWT-SVID signing keys, rotated with overlap. Thread-safe.

    `clock` returns Unix seconds (injectable for tests); transitions happen lazily when
    `current()` or `published()` is called — call `published()` at `next_change_at()` to keep
    the bundle fresh.

    With a `store` (agent/identity/jwt_keys.py) the keys and their schedule are loaded from it
    and every change is written to it *before* it takes effect, so a key never signs unless a
    restarted agent would sign with it too. `leeway` keeps a retired key published that much
    longer than its last token can live: validators accept a token a little past its `exp`
    (clock skew; oidc-provider: 15 s).
    """

    def __init__(
        self,
        alg: str = "ES256",
        rotate_every: Seconds = dt.timedelta(hours=24),
        max_jwt_ttl: Seconds = dt.timedelta(hours=1),
        prepublish: Seconds = dt.timedelta(minutes=30),
        clock: Callable[[], float] = time.time,
        store: JwtKeyFile | None = None,
        leeway: Seconds = 0,
    ):
        if alg not in _KEYGEN:
            raise JwtSvidError(f"cannot sign JWT-SVIDs with {alg!r}; use one of {sorted(_KEYGEN)}")
        self.alg = alg
        self.rotate_every = _secs(rotate_every)
        self.max_jwt_ttl = _secs(max_jwt_ttl)
        self.prepublish = _secs(prepublish)
        self.leeway = _secs(leeway)
        if self.rotate_every <= 0 or self.max_jwt_ttl <= 0 or self.prepublish < 0:
            raise JwtSvidError("rotate_every and max_jwt_ttl must be positive, prepublish >= 0")
        if self.prepublish >= self.rotate_every:
            raise JwtSvidError(
                f"prepublish ({self.prepublish:g}s) must be shorter than "
                f"rotate_every ({self.rotate_every:g}s)"
            )
        self.clock = clock
        self.store = store
        self._lock = threading.Lock()
        now = clock()
        self._current = self._new_key(now)
        self._next: JwtSigningKey | None = None
        self._retired: list[JwtSigningKey] = []
        self._rotate_at = now + self.rotate_every
        self.version = 0  # bumped whenever the published key set changes
        self._next_event = 0.0
        self._hold_until = 0.0
        self.loaded = False  # the keys came from the store (not made on this start)
        if store is not None:
            with store.locked():
                stored = store.load()
                if stored is None:
                    store.save(self._state())  # before the new key signs anything
                else:
                    self._adopt(stored)
                    self.loaded = True
                    if self._rotate_at > now + self.rotate_every:
                        # a shorter rotation period configured since applies from now
                        self._rotate_at = now + self.rotate_every
                        store.save(self._state())
        self._schedule()

    def _new_key(self, activates_at: float) -> JwtSigningKey:
        key = _KEYGEN[self.alg]()
        return JwtSigningKey(jwk_thumbprint(key.public_key()), self.alg, key, activates_at)

    # ------------------------------------------------------------ the stored state
    def _state(self) -> KeySetState:
        def stored(k: JwtSigningKey) -> StoredKey:
            return StoredKey(k.kid, k.private_key, k.activates_at, k.retired_at)

        return KeySetState(
            self.alg,
            stored(self._current),
            stored(self._next) if self._next else None,
            tuple(stored(k) for k in self._retired),
            self._rotate_at,
        )

    def _adopt(self, state: KeySetState) -> bool:
        """Take the stored state as ours; whether the published set changed."""
        if state.alg != self.alg:
            raise JwtKeyFileError(
                f"the JWT signing keys in {self.store.path if self.store else '?'} are "
                f"{state.alg}, this agent signs {self.alg}; move the file aside to make new keys"
            )
        before = self._state().kids()

        def key(k: StoredKey) -> JwtSigningKey:
            return JwtSigningKey(k.kid, state.alg, k.private_key, k.activates_at, k.retired_at)

        self._current = key(state.current)
        self._next = key(state.next) if state.next else None
        self._retired = [key(k) for k in state.retired]
        self._rotate_at = state.rotate_at
        return state.kids() != before

    def sync(self) -> bool:
        """Pick up a change another agent sharing the store made (a handover); whether the
        published set changed. Cheap when nothing did (one stat)."""
        if self.store is None or not self.store.changed():
            return False
        with self._lock, self.store.locked():
            stored = self.store.load()
            changed = stored is not None and self._adopt(stored)
            if changed:
                self.version += 1
            self._schedule()
            return changed

    # ------------------------------------------------------------ transitions
    def _schedule(self) -> None:
        events = [self._rotate_at]
        if self._next is None:
            events.append(self._rotate_at - self.prepublish)
        events += [self._drop_at(k) for k in self._retired]
        # a change that could not be written waits for its retry, not for every signature
        self._next_event = max(min(events), self._hold_until)

    def _drop_at(self, k: JwtSigningKey) -> float:
        return k.retired_at + self.max_jwt_ttl + self.leeway  # type: ignore[operator]

    def _tick(self, now: float) -> None:
        if now < self._next_event:
            return  # nothing is due
        if self.store is None:
            changed = self._advance(now)
        else:
            changed = self._advance_stored(self.store, now, self._advance)
        if changed:
            self.version += 1
        self._schedule()

    def _advance_stored(self, store: JwtKeyFile, now: float, step: Callable[[float], bool]) -> bool:
        """step() under the store's lock, on the state as stored (another agent may have
        moved first), and written before it takes effect; if it cannot be written, nothing
        changes (the current key, published and stored, keeps signing) and it is retried."""
        with store.locked():
            stored = store.load()
            adopted = stored is not None and self._adopt(stored)
            saved = (self._current, self._next, list(self._retired), self._rotate_at)
            changed = step(now)
            if changed:
                try:
                    store.save(self._state())
                except OSError as e:
                    self._current, self._next, self._retired, self._rotate_at = saved
                    store.unsaved(e)
                    self._hold_until = now + SAVE_RETRY_SECONDS
                    return adopted
                self._hold_until = 0.0
            return adopted or changed

    def _advance(self, now: float) -> bool:
        changed = False
        if self._next is None and now >= self._rotate_at - self.prepublish:
            self._next = self._new_key(self._rotate_at)
            changed = True
        if now >= self._rotate_at:
            # If the clock jumped past the whole prepublish window (suspend/resume, an agent
            # stopped across it), the prepared key is used at once anyway: no validator can
            # still hold a JWKS from before that window (prepublish outlasts their caches),
            # and signing with an overdue key is worse.
            self._retire_current(now)
            changed = True
        kept = [k for k in self._retired if now <= self._drop_at(k)]
        if len(kept) != len(self._retired):
            self._retired = kept
            changed = True
        return changed

    def _retire_current(self, now: float, keep_old: bool = True) -> None:
        if keep_old:
            self._retired.append(replace(self._current, retired_at=now))
        nxt = self._next or self._new_key(now)
        self._current = replace(nxt, activates_at=now)
        self._next = None
        self._rotate_at = now + self.rotate_every

    def current(self, now: float | None = None) -> JwtSigningKey:
        """The key to sign with now."""
        if now is None:
            now = self.clock()
        if now < self._next_event:  # lock-free fast path: nothing is due
            return self._current
        with self._lock:
            self._tick(now)
            return self._current

    def rotate(self, *, drop_old: bool = False) -> JwtSigningKey:
        """Rotate now. With `drop_old` (suspected key compromise) the old key is unpublished
        immediately, so tokens it signed stop validating as soon as validators refresh."""
        with self._lock:
            now = self.clock()

            def step(at: float) -> bool:
                self._retire_current(at, keep_old=not drop_old)
                return True

            if self.store is None:
                step(now)
            else:
                self._advance_stored(self.store, now, step)
            self.version += 1
            self._next_event = 0.0
            self._tick(now)
            return self._current

    def published(self, now: float | None = None) -> dict[str, PublicKey]:
        """kid → public key of every key a validator may need: prepared, current and retired."""
        with self._lock:
            self._tick(self.clock() if now is None else now)
            keys = [self._current, *([self._next] if self._next else []), *reversed(self._retired)]
            return {k.kid: k.public_key for k in keys}

    def next_change_at(self) -> float:
        """Unix time of the next change to the published set (prepare, rotate or drop)."""
        with self._lock:
            return self._next_event


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
