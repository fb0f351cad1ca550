"""SPIRE as the identity plane: SVIDs for attested processes from a SPIRE agent.

With `identity.source = "spire"` the local CA and registration entries step aside: credless
still attests each process itself (its selectors), then asks the SPIRE agent's Delegated
Identity API for the SVIDs SPIRE's own registration entries give those selectors. The trust
bundle (for the Workload API and the bundle endpoint) is SPIRE's, kept current by streams.
See docs/spire.md for the SPIRE agent settings (admin socket, authorized_delegates).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
import time
from collections.abc import Iterable

from agent.identity.bundle import TrustBundle
from agent.identity.jwtsvid import JwtSvid
from agent.identity.spiffeid import SpiffeId, TrustDomain
from agent.identity.spire import SpireDelegatedIdentityClient, SpireError, SpireNotAuthorized
from agent.identity.x509svid import X509Svid
from agent.observe.logging import get_logger

log = get_logger("identity.spire")


def _claims(token: str) -> dict:
    """Claims of a JWT-SVID SPIRE signed, for fingerprints (jti, iat) only."""
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


class SpireSource:
    def __init__(self, socket_path: str, trust_domain: TrustDomain, cache_seconds: float = 30):
        self.socket_path = socket_path
        self.trust_domain = trust_domain
        self.cache_seconds = cache_seconds
        self.client: SpireDelegatedIdentityClient | None = None
        self._x509: dict[frozenset, tuple[float, list]] = {}
        self._bundles: dict[str, dict[str, TrustBundle]] = {"x509": {}, "jwt": {}}
        self._subs: list = []
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self.on_change = lambda: None
        self.sequence = int(time.time())

    def start(self) -> None:
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

    def _follow(self, kind: str, sub) -> None:
        try:
            for update in sub:
                with self._lock:
                    self._bundles[kind] = update
                    self.sequence += 1
                if self._bundles["x509"] and self._bundles["jwt"]:
                    self._ready.set()
                self.on_change()
        except SpireError as e:
            log.error("SPIRE bundle stream ended", kind=kind, error=str(e))

    def stop(self) -> None:
        for sub in self._subs:
            sub.cancel()
        if self.client is not None:
            self.client.close()

    # ------------------------------------------------------------ identities
    def _svids(self, selectors: frozenset) -> list:
        now = time.monotonic()
        hit = self._x509.get(selectors)
        if hit and now - hit[0] < self.cache_seconds:
            return hit[1]
        sub = self.client.subscribe_x509_svids(sorted(selectors))
        try:
            update = list(next(sub))  # complete state: the SVIDs these selectors earn now
        except SpireNotAuthorized:
            update = []
        finally:
            sub.cancel()
        self._x509[selectors] = (now, update)
        return update

    def resolve(self, selectors: Iterable[str]) -> SpiffeId | None:
        svids = self._svids(frozenset(selectors))
        return svids[0].spiffe_id if svids else None

    def x509_svid(self, selectors: Iterable[str], spiffe_id: SpiffeId) -> X509Svid:
        for s in self._svids(frozenset(selectors)):
            if s.spiffe_id == spiffe_id:
                leaf = s.cert_chain[0]
                return X509Svid(
                    spiffe_id,
                    list(s.cert_chain),
                    s.private_key,
                    leaf.not_valid_before_utc,
                    leaf.not_valid_after_utc,
                )
        raise SpireError(f"SPIRE issues no X509-SVID for {spiffe_id} to these selectors")

    def jwt_svid(
        self, selectors: Iterable[str], spiffe_id: SpiffeId, audience: list[str]
    ) -> JwtSvid:
        for s in self.client.fetch_jwt_svids(sorted(selectors), audience):
            if s.spiffe_id == spiffe_id:
                claims = _claims(s.token)
                return JwtSvid(
                    s.token,
                    spiffe_id,
                    tuple(audience),
                    claims.get("jti"),
                    s.issued_at,
                    s.expires_at,
                    "",
                    claims,
                )
        raise SpireError(f"SPIRE issues no JWT-SVID for {spiffe_id} to these selectors")

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

    @staticmethod
    def expiry(svid: X509Svid) -> dt.datetime:
        return svid.not_after
