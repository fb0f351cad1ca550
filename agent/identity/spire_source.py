"""SPIRE as the identity plane: SVIDs for attested processes from a SPIRE agent.

With `identity.source = "spire"` the local CA and registration entries step aside: credless
still attests each process itself (its selectors), then asks the SPIRE agent's Delegated
Identity API for the SVIDs SPIRE's own registration entries give those selectors. The trust
bundle (for the Workload API and the bundle endpoint) is SPIRE's, kept current by streams.
See docs/spire.md for the SPIRE agent settings (admin socket, authorized_delegates).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from agent import jsondoc
from agent.identity.bundle import TrustBundle
from agent.identity.entries import Entry, Match
from agent.identity.jwtsvid import JwtSvid
from agent.identity.sources import Identity, SourceEvents
from agent.identity.spiffeid import TrustDomain
from agent.identity.spire import SpireDelegatedIdentityClient, Subscription
from agent.identity.spire_errors import SpireError, SpireNotAuthorized
from agent.identity.spire_messages import SpireX509Svid
from agent.identity.x509svid import X509Svid
from agent.observe.logging import get_logger

log = get_logger("identity.spire")


def _claims(token: str) -> dict[str, Any]:
    """Claims of a JWT-SVID SPIRE signed, for fingerprints (jti, iat) only."""
    part = token.split(".")[1]
    claims: dict[str, Any] = jsondoc.loads_b64url(part)
    return claims


class SpireSource:
    def __init__(self, socket_path: str, trust_domain: TrustDomain, cache_seconds: float = 30):
        self.socket_path = socket_path
        self.trust_domain = trust_domain
        self.cache_seconds = cache_seconds
        self.client: SpireDelegatedIdentityClient | None = None
        self._x509: dict[frozenset[str], tuple[float, list[SpireX509Svid]]] = {}
        self._bundles: dict[str, dict[str, TrustBundle]] = {"x509": {}, "jwt": {}}
        self._subs: list[Subscription[dict[str, TrustBundle]]] = []
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._events = SourceEvents()
        self.sequence = int(time.time())

    def start(self, events: SourceEvents) -> None:
        self._events = events
        self.client = SpireDelegatedIdentityClient(self.socket_path)
        for kind, subscribe in (
            ("x509", self.client.subscribe_x509_bundles),
            ("jwt", self.client.subscribe_jwt_bundles),
        ):
            sub = subscribe()
            self._subs.append(sub)
            threading.Thread(
                target=self._follow, args=(kind, sub), daemon=True, name=f"spire-{kind}-bundles"
            ).start()
        if not self._ready.wait(10):
            raise SpireError(
                "no trust bundle from the SPIRE agent within 10 s at "
                f"{self.socket_path}: is it running with admin_socket_path set, "
                "and is this agent in authorized_delegates?"
            )
        log.info(
            "identity from SPIRE", socket=self.socket_path, trust_domain=self.trust_domain.name
        )

    def _follow(self, kind: str, sub: Subscription[dict[str, TrustBundle]]) -> None:
        try:
            for update in sub:
                with self._lock:
                    self._bundles[kind] = update
                    self.sequence += 1
                if self._bundles["x509"] and self._bundles["jwt"]:
                    self._ready.set()
                self._events.changed()
        except SpireError as e:
            log.error("SPIRE bundle stream ended", kind=kind, error=str(e))

    def stop(self) -> None:
        for sub in self._subs:
            sub.cancel()
        if self.client is not None:
            self.client.close()

    def ready(self) -> tuple[bool, str]:
        return True, f"SVIDs from SPIRE at {self.socket_path}"

    def _client(self) -> SpireDelegatedIdentityClient:
        if self.client is None:
            raise RuntimeError("the SPIRE identity source is not started")
        return self.client

    # ------------------------------------------------------------ identities
    def _svids(self, selectors: frozenset[str]) -> list[SpireX509Svid]:
        now = time.monotonic()
        hit = self._x509.get(selectors)
        if hit and now - hit[0] < self.cache_seconds:
            return hit[1]
        sub = self._client().subscribe_x509_svids(sorted(selectors))
        try:
            update = list(next(sub))  # complete state: the SVIDs these selectors earn now
        except SpireNotAuthorized:
            update = []
        finally:
            sub.cancel()
        self._x509[selectors] = (now, update)
        return update

    def match(self, selectors: frozenset[str]) -> Match | None:
        """SPIRE's entries decide; the match names the selectors SPIRE was asked with."""
        svids = self._svids(selectors)
        if not svids:
            return None
        sid = svids[0].spiffe_id
        return Match(Entry("spire", str(sid), selectors), sid)

    def entries(self) -> Sequence[Entry]:
        return ()  # SPIRE holds them

    def reload_entries(self, initial: bool = False) -> bool:
        return True  # SPIRE's entries reach it from the SPIRE server, not from a local file

    def x509_svid(self, ident: Identity) -> X509Svid:
        for s in self._svids(ident.entry.selectors):
            if s.spiffe_id == ident.spiffe_id:
                self._events.relayed(s)
                return s
        raise SpireError(f"SPIRE issues no X509-SVID for {ident.spiffe_id} to these selectors")

    def jwt_svid(
        self, ident: Identity, audience: list[str], ttl: int | None, iss: str | None
    ) -> JwtSvid:
        """SPIRE chooses the lifetime and issuer: `ttl` and `iss` do not apply."""
        for s in self._client().fetch_jwt_svids(sorted(ident.entry.selectors), audience):
            if s.spiffe_id == ident.spiffe_id:
                claims = _claims(s.token)
                return JwtSvid(
                    s.token,
                    ident.spiffe_id,
                    tuple(audience),
                    claims.get("jti"),
                    s.issued_at,
                    s.expires_at,
                    "",
                    claims,
                )
        raise SpireError(f"SPIRE issues no JWT-SVID for {ident.spiffe_id} to these selectors")

    def held_svids(self) -> list[tuple[str, X509Svid]]:
        return []  # SPIRE holds and renews them; this source only caches lookups briefly

    def rotate_due(self) -> list[str]:
        return []  # SPIRE rotates its SVIDs and bundles; the streams tell us

    def bundle(self) -> TrustBundle:
        with self._lock:
            x509 = self._bundles["x509"].get(self.trust_domain.name)
            jwt = self._bundles["jwt"].get(self.trust_domain.name)
            return TrustBundle(
                self.trust_domain,
                x509.x509_authorities if x509 else (),
                jwt.jwt_authorities if jwt else {},
                self.sequence,
            )
