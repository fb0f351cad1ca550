"""The agent's JWT-SVID signing keys and their rotation (JWT-SVID.md, SPIFFE federation).

Key lifecycle (why three phases): a validator only learns our keys by polling the bundle, so
 1. *prepared*  — the next key is published `prepublish` before it signs anything (SPIFFE
                  federation asks for several refresh hints), so validators already know it;
 2. *current*   — it signs for `rotate_every`;
 3. *retired*   — it stays published until `retired_at + max_jwt_ttl`, when the last token it
                  signed has expired, then it is dropped.
Minting (agent/identity/jwtsvid.py) enforces `ttl <= max_jwt_ttl`, which is what makes phase 3
long enough. Where the keys are kept across restarts is agent/identity/jwt_keys.py.

Private keys never appear in repr(), logs or exception messages; use `kid` (the key's JWK
thumbprint) to refer to one.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.identity.bundle import PublicKey, jwk_thumbprint
from agent.identity.jwt_keys import (
    SAVE_RETRY_SECONDS,
    JwtKeyFile,
    JwtKeyFileError,
    KeySetState,
    StoredKey,
)
from agent.identity.jwtsvid import JwtSvidError

# Algorithms we can *sign* with; validation accepts the whole ALLOWED_ALGS set.
_KEYGEN: dict[str, Callable[[], Any]] = {
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ES384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "PS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
}
Seconds = float | int | dt.timedelta


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
