"""The embedded SVID source: this node's own CA, JWT signing keys and registration entries.

It owns the signing material (the X.509 CA in `<state_dir>/ca`, the JWT signing keys in
`<state_dir>/jwt`: agent/identity/jwt_keys.py), the registration entries (reloaded when the
file changes, and on SIGHUP through the manager), the X509-SVID cache (one SVID per SPIFFE ID,
renewed at half-life) and the trust bundle made from both; a maintenance thread renews SVIDs
and follows key rotation.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.config import IdentitySection
from agent.identity import entries as entries_mod
from agent.identity.bundle import TrustBundle
from agent.identity.ca import CLOCK_SKEW, SigningCA
from agent.identity.jwt_keys import JwtKeyFile
from agent.identity.jwt_rotation import JwtSigningKeys
from agent.identity.jwtsvid import JwtSvid, mint_jwt_svid
from agent.identity.sources import Identity, SourceEvents
from agent.identity.spiffeid import TrustDomain
from agent.identity.x509svid import X509Svid, mint_x509_svid, renew_at
from agent.observe.logging import get_logger

log = get_logger("identity")


def prepublish_seconds(rotation_seconds: int) -> int:
    """How long the next JWT signing key is published before it signs: a quarter of the
    rotation period, at most 30 min. identity.jwt_key_rotation_seconds >= 600 makes it at
    least 150 s, longer than authorization servers keep a jwks_uri answer (oidc-provider
    60 s with our Cache-Control: no-store; Spring Authorization Server / Nimbus 5 min):
    docs/tokens.md."""
    return min(rotation_seconds // 4, 1800)


class EmbeddedSource:
    def __init__(
        self, cfg: IdentitySection, state_dir: str, clock: Callable[[], float] = time.time
    ):
        self.cfg = cfg
        self.trust_domain = TrustDomain.parse(cfg.trust_domain)
        self.state_dir = Path(state_dir)
        self.clock = clock
        self.ca: SigningCA | None = None
        self.keys: JwtSigningKeys | None = None
        self.registry = entries_mod.Registry([], self.trust_domain)
        self._events = SourceEvents()
        self._lock = threading.Lock()
        self._svids: dict[str, X509Svid] = {}
        self._svid_ttl: dict[str, int] = {}
        self._bundle: TrustBundle | None = None
        self._keys_version = -1
        self._entries_mtime = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self, events: SourceEvents) -> None:
        self._events = events
        cfg = self.cfg
        if cfg.upstream_ca_cert:
            self.ca = SigningCA.load_intermediate(
                Path(cfg.upstream_ca_cert).read_bytes(),
                Path(cfg.upstream_ca_key).read_bytes(),
                Path(cfg.upstream_ca_chain).read_bytes() if cfg.upstream_ca_chain else b"",
                trust_domain=self.trust_domain,
            )
        else:
            self.ca = SigningCA.load_or_create(self.state_dir / "ca", self.trust_domain)
        self.ca.check_usable()
        self.keys = JwtSigningKeys(
            rotate_every=dt.timedelta(seconds=cfg.jwt_key_rotation_seconds),
            max_jwt_ttl=dt.timedelta(seconds=max(cfg.jwt_svid_ttl_seconds, 3600)),
            prepublish=dt.timedelta(seconds=prepublish_seconds(cfg.jwt_key_rotation_seconds)),
            clock=self.clock,
            store=JwtKeyFile(self.state_dir / "jwt"),
            leeway=CLOCK_SKEW,
        )
        log.info(
            "JWT signing keys " + ("loaded" if self.keys.loaded else "created"),
            path=str(self.state_dir / "jwt"),
            kid=self.keys.current().kid,
            published=len(self.keys.published()),
        )
        self.reload_entries(initial=True)
        self._refresh_bundle()
        self._thread = threading.Thread(target=self._maintain, name="identity-rotate", daemon=True)
        self._thread.start()
        log.info(
            "identity ready",
            trust_domain=self.trust_domain.name,
            ca_not_after=self.ca.not_after.isoformat(),
            entries=len(self.registry),
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def ready(self) -> tuple[bool, str]:
        if self.ca is None:
            return False, "CA not loaded"
        return True, f"CA for {self.trust_domain.name}, {len(self.registry)} entries"

    def _signing(self) -> tuple[SigningCA, JwtSigningKeys]:
        if self.ca is None or self.keys is None:
            raise RuntimeError("the embedded identity source is not started")
        return self.ca, self.keys

    # ------------------------------------------------------------ entries
    def match(self, selectors: frozenset[str]) -> entries_mod.Match | None:
        return self.registry.match(selectors)

    def entries(self) -> Sequence[entries_mod.Entry]:
        return self.registry.entries

    def reload_entries(self, initial: bool = False) -> bool:
        """Load the entries file; on any error keep the entries already loaded."""
        path = self.cfg.entries_file
        if not path:
            return True
        if initial and not os.path.exists(path):
            log.warning(
                "registration entries file does not exist yet: no process gets an "
                "identity until it does (it is picked up when created)",
                path=path,
            )
            return True
        try:
            mtime = os.stat(path).st_mtime
            reg = entries_mod.load(path, self.trust_domain)
        except (entries_mod.EntriesError, OSError) as e:
            self._events.entries_read(False)
            if initial:
                raise
            log.error("registration entries not reloaded; keeping the previous ones", error=str(e))
            return False
        self._entries_mtime = mtime
        changed = [e.id for e in reg.entries] != [e.id for e in self.registry.entries] or {
            e.id: e for e in reg.entries
        } != {e.id: e for e in self.registry.entries}
        self.registry = reg
        self._events.entries_read(True)
        if changed and not initial:
            log.info("registration entries reloaded", entries=len(reg))
            self._events.changed()
        return True

    # ------------------------------------------------------------ SVIDs
    def x509_svid(self, ident: Identity) -> X509Svid:
        ca, _ = self._signing()
        key = str(ident.spiffe_id)
        with self._lock:
            svid = self._svids.get(key)
            if svid is not None and dt.datetime.now(dt.UTC) < renew_at(svid):
                return svid
            ttl = ident.entry.x509_svid_ttl_seconds or self.cfg.x509_svid_ttl_seconds
            svid = mint_x509_svid(ca, ident.spiffe_id, ttl=ttl)
            self._svids[key] = svid
            self._svid_ttl[key] = ttl
        self._events.minted(svid)
        return svid

    def jwt_svid(
        self, ident: Identity, audience: list[str], ttl: int | None, iss: str | None
    ) -> JwtSvid:
        _, keys = self._signing()
        ttl = ttl or ident.entry.jwt_svid_ttl_seconds or self.cfg.jwt_svid_ttl_seconds
        return mint_jwt_svid(
            keys, ident.spiffe_id, audience, ttl=ttl, iss=iss or self.cfg.jwt_issuer or None
        )

    def held_svids(self) -> list[tuple[str, X509Svid]]:
        with self._lock:
            return list(self._svids.items())

    def bundle(self) -> TrustBundle:
        if self.keys is not None and self.keys.version != self._keys_version:
            self._refresh_bundle()
        if self._bundle is None:  # _refresh_bundle() sets it in start()
            raise RuntimeError("the identity manager has no trust bundle")
        return self._bundle

    def _refresh_bundle(self) -> TrustBundle:
        ca, keys = self._signing()
        with self._lock:
            version = keys.version
            published = keys.published()
            if self._bundle is None:
                self._bundle = TrustBundle.new(self.trust_domain, ca.roots, published)
            else:
                self._bundle = self._bundle.updated(
                    x509_authorities=ca.roots, jwt_authorities=published
                )
            self._keys_version = version
            return self._bundle

    # ------------------------------------------------------------ maintenance
    def rotate_due(self) -> list[str]:
        ca, _ = self._signing()
        now = dt.datetime.now(dt.UTC)
        renewed = []
        with self._lock:
            due = [(k, s) for k, s in self._svids.items() if now >= renew_at(s)]
        for key, old in due:
            new = mint_x509_svid(ca, old.spiffe_id, ttl=self._svid_ttl[key])
            with self._lock:
                self._svids[key] = new
            renewed.append(key)
            self._events.rotated(old, new)
        if renewed:
            self._events.changed()
        return renewed

    def _maintain(self) -> None:
        _, keys = self._signing()
        while not self._stop.wait(1.0):
            try:
                self.rotate_due()
                keys.sync()  # another agent on this state directory (a handover) rotated
                if keys.version != self._keys_version or self.clock() >= keys.next_change_at():
                    before = self._bundle.sequence if self._bundle else -1
                    keys.published()
                    if self._refresh_bundle().sequence != before:
                        self._events.changed()
                path = self.cfg.entries_file
                if path and os.path.exists(path) and os.stat(path).st_mtime != self._entries_mtime:
                    self.reload_entries()
            except Exception:
                log.exception("identity maintenance failed; retrying")
