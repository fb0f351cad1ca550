"""The identity manager: attested process → registration entry → SVIDs, and their rotation.

It owns the signing material (the X.509 CA in the state directory, the JWT signing keys in
memory), the registration entries (reloaded on SIGHUP and when the file changes), the
X509-SVID cache (one SVID per SPIFFE ID, renewed at half-life), and the trust bundle.
Anything that serves identities (the Workload API, the OAuth client) asks it, and waits on
`changed` to learn about rotations.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from agent.identity import entries as entries_mod
from agent.identity.bundle import TrustBundle
from agent.identity.ca import SigningCA
from agent.identity.jwtsvid import JwtSigningKeys, JwtSvid, mint_jwt_svid
from agent.identity.spiffeid import SpiffeId, TrustDomain
from agent.identity.x509svid import X509Svid, mint_x509_svid, renew_at
from agent.observe.logging import AuditLog, get_logger

log = get_logger("identity")


@dataclass(frozen=True)
class Identity:
    """The identity decision for one attested image."""

    spiffe_id: SpiffeId
    entry: entries_mod.Entry


class IdentityManager:
    name = "identity"

    def __init__(
        self,
        cfg: Any,
        state_dir: str,
        audit: AuditLog | None = None,
        registry: Any = None,
        clock=time.time,
    ):
        self.cfg = cfg  # agent.config.IdentitySection
        self.trust_domain = TrustDomain.parse(cfg.trust_domain)
        self.state_dir = Path(state_dir)
        self.audit = audit
        self.clock = clock
        self.changed = threading.Condition()
        self.generation = 0
        self._lock = threading.Lock()
        self._svids: dict[str, X509Svid] = {}
        self._svid_ttl: dict[str, int] = {}
        self._bundle: TrustBundle | None = None
        self._keys_version = -1
        self._entries_mtime = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ca: SigningCA | None = None
        self.spire = None  # agent.identity.spire_source.SpireSource
        self.keys: JwtSigningKeys | None = None
        self.registry: entries_mod.Registry = entries_mod.Registry([], self.trust_domain)
        # which live process images use which identity, to know when an identity ends
        self._users: dict[str, set[int]] = {}
        self._user_of: dict[int, tuple[int, str]] = {}  # tgid -> (exec_ns, spiffe id)
        self.on_identity_ended: list = []
        self._init_metrics(registry)

    def _init_metrics(self, registry: Any) -> None:
        self.m_issued = Counter(
            "credless_svids_issued", "SVIDs issued, by type", ["type"], registry=registry
        )
        self.m_rotated = Counter(
            "credless_svid_rotations", "X509-SVIDs renewed before expiry", registry=registry
        )
        self.m_decisions = Counter(
            "credless_identity_decisions",
            "Identity requests by outcome",
            ["result"],
            registry=registry,
        )
        self.m_entries = Gauge(
            "credless_registration_entries", "Loaded registration entries", registry=registry
        )
        self.m_entries.set_function(lambda: len(self.registry))
        self.m_reloads = Counter(
            "credless_registration_reloads", "Entry file reloads", ["result"], registry=registry
        )
        self.m_expiry = Gauge(
            "credless_x509_svid_expiry_seconds",
            "Seconds until the soonest-expiring cached X509-SVID expires",
            registry=registry,
        )
        self.m_expiry.set_function(self._soonest_expiry)
        for t in ("x509", "jwt"):
            self.m_issued.labels(t)
        for r in ("issued", "no_entry", "unattested"):
            self.m_decisions.labels(r)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.cfg.source == "spire":
            from agent.identity.spire_source import SpireSource

            self.spire = SpireSource(self.cfg.spire_admin_socket, self.trust_domain)
            self.spire.on_change = self._notify
            self.spire.start()
            log.info(
                "identity from SPIRE",
                socket=self.cfg.spire_admin_socket,
                trust_domain=self.trust_domain.name,
            )
            return
        ca_dir = self.state_dir / "ca"
        if self.cfg.upstream_ca_cert:
            self.ca = SigningCA.load_intermediate(
                Path(self.cfg.upstream_ca_cert).read_bytes(),
                Path(self.cfg.upstream_ca_key).read_bytes(),
                Path(self.cfg.upstream_ca_chain).read_bytes()
                if self.cfg.upstream_ca_chain
                else b"",
                trust_domain=self.trust_domain,
            )
        else:
            self.ca = SigningCA.load_or_create(ca_dir, self.trust_domain)
        self.ca.check_usable()
        self.keys = JwtSigningKeys(
            rotate_every=dt.timedelta(seconds=self.cfg.jwt_key_rotation_seconds),
            max_jwt_ttl=dt.timedelta(seconds=max(self.cfg.jwt_svid_ttl_seconds, 3600)),
            prepublish=dt.timedelta(seconds=min(self.cfg.jwt_key_rotation_seconds // 4, 1800)),
            clock=self.clock,
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
        if self.spire is not None:
            self.spire.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._notify()

    def ready(self) -> tuple[bool, str]:
        if self.spire is not None:
            return True, f"SVIDs from SPIRE at {self.cfg.spire_admin_socket}"
        if self.ca is None:
            return False, "CA not loaded"
        return True, f"CA for {self.trust_domain.name}, {len(self.registry)} entries"

    def _notify(self) -> None:
        with self.changed:
            self.generation += 1
            self.changed.notify_all()

    # ------------------------------------------------------------ entries
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
            self.m_reloads.labels("error").inc()
            if initial:
                raise
            log.error("registration entries not reloaded; keeping the previous ones", error=str(e))
            return False
        self._entries_mtime = mtime
        changed = [e.id for e in reg.entries] != [e.id for e in self.registry.entries] or {
            e.id: e for e in reg.entries
        } != {e.id: e for e in self.registry.entries}
        self.registry = reg
        self.m_reloads.labels("ok").inc()
        if changed and not initial:
            log.info("registration entries reloaded", entries=len(reg))
            self._notify()
        return True

    def resolve(self, attestation: Any, quiet: bool = False) -> Identity | None:
        """The identity for an attested image; None (and an audit event) when there is none."""
        if attestation is None:
            self.m_decisions.labels("unattested").inc()
            return None
        if self.spire is not None:
            sid = self.spire.resolve(attestation.selectors)
            m = (
                entries_mod.Match(
                    entries_mod.Entry("spire", str(sid), frozenset(attestation.selectors)), sid
                )
                if sid is not None
                else None
            )
        else:
            m = self.registry.match(attestation.selectors)
        if m is None:
            if quiet:  # looking at ancestors, not deciding for a caller
                return None
            self.m_decisions.labels("no_entry").inc()
            if self.audit:
                self.audit.emit(
                    "identity.denied",
                    reason="no registration entry matches",
                    pid=attestation.tgid,
                    start_ns=attestation.start_ns,
                    exe=attestation.exe,
                    cgroup=attestation.cgroup_path,
                )
            return None
        if quiet:
            return Identity(m.spiffe_id, m.entry)
        if m.also_matched:
            log.warning(
                "several registration entries match; the most specific wins",
                chosen=m.entry.id,
                also=list(m.also_matched),
                pid=attestation.tgid,
            )
        self.m_decisions.labels("issued").inc()
        return Identity(m.spiffe_id, m.entry)

    def identity_for_id(self, spiffe_id: str) -> Identity | None:
        """An Identity for an ID some entry could issue (operator tools: `oauth probe`)."""
        import re

        for e in self.registry.entries:
            pattern = re.escape(e.spiffe_id)
            pattern = re.sub(r"\\\{[^}]*\\\}", "[A-Za-z0-9._-]+", pattern)
            if re.fullmatch(pattern, spiffe_id):
                return Identity(SpiffeId.parse(spiffe_id), e)
        return None

    # ------------------------------------------------------------ identity lifetimes
    def note_use(self, ident: Identity, attestation: Any) -> None:
        """An attested image is using this identity (a proxied connection, an SVID)."""
        sid = str(ident.spiffe_id)
        with self._lock:
            self._user_of[attestation.tgid] = (attestation.exec_ns, sid)
            self._users.setdefault(sid, set()).add(attestation.tgid)

    def process_event(self, ev: Any) -> None:
        """Kernel exec/exit events: an image that ends stops using its identity; when the
        last one has ended, on_identity_ended callbacks run (tokens, keys, clients go)."""
        if ev.type not in (1, 3):  # exec, exit
            return
        ended = None
        with self._lock:
            user = self._user_of.get(ev.tgid)
            if user is None or (ev.type == 1 and user[0] == ev.exec_ns):
                return
            del self._user_of[ev.tgid]
            users = self._users.get(user[1])
            if users is not None:
                users.discard(ev.tgid)
                if not users:
                    del self._users[user[1]]
                    ended = user[1]
        if ended:
            log.info("last process of identity ended", spiffe_id=ended)
            for fn in self.on_identity_ended:
                try:
                    fn(ended)
                except Exception:
                    log.exception("identity end handler failed", spiffe_id=ended)

    def live_identities(self) -> dict[str, int]:
        with self._lock:
            return {sid: len(tgids) for sid, tgids in self._users.items()}

    # ------------------------------------------------------------ SVIDs
    def x509_svid(self, ident: Identity) -> X509Svid:
        if self.spire is not None:
            self.m_issued.labels("x509").inc()
            return self.spire.x509_svid(ident.entry.selectors, ident.spiffe_id)
        key = str(ident.spiffe_id)
        with self._lock:
            svid = self._svids.get(key)
            now = dt.datetime.now(dt.UTC)
            if svid is not None and now < renew_at(svid):
                return svid
            ttl = ident.entry.x509_svid_ttl_seconds or self.cfg.x509_svid_ttl_seconds
            svid = mint_x509_svid(self.ca, ident.spiffe_id, ttl=ttl)
            self._svids[key] = svid
            self._svid_ttl[key] = ttl
        self.m_issued.labels("x509").inc()
        if self.audit:
            self.audit.emit(
                "svid.issued",
                type="x509",
                spiffe_id=key,
                serial=format(svid.leaf.serial_number, "x"),
                fingerprint=svid.fingerprint,
                not_after=svid.not_after.isoformat(),
            )
        return svid

    def jwt_svid(
        self, ident: Identity, audience: list[str], ttl: int | None = None, iss: str | None = None
    ) -> JwtSvid:
        if self.spire is not None:
            self.m_issued.labels("jwt").inc()
            return self.spire.jwt_svid(ident.entry.selectors, ident.spiffe_id, list(audience))
        ttl = ttl or ident.entry.jwt_svid_ttl_seconds or self.cfg.jwt_svid_ttl_seconds
        svid = mint_jwt_svid(
            self.keys, ident.spiffe_id, audience, ttl=ttl, iss=iss or self.cfg.jwt_issuer or None
        )
        self.m_issued.labels("jwt").inc()
        return svid

    def bundle(self) -> TrustBundle:
        if self.spire is not None:
            return self.spire.bundle()
        if self.keys is not None and self.keys.version != self._keys_version:
            self._refresh_bundle()
        if self._bundle is None:  # _refresh_bundle() sets it, or the constructor failed
            raise RuntimeError("the identity manager has no trust bundle")
        return self._bundle

    def _refresh_bundle(self) -> None:
        with self._lock:
            version = self.keys.version
            published = self.keys.published()
            if self._bundle is None:
                self._bundle = TrustBundle.new(self.trust_domain, self.ca.roots, published)
            else:
                self._bundle = self._bundle.updated(
                    x509_authorities=self.ca.roots, jwt_authorities=published
                )
            self._keys_version = version

    def _soonest_expiry(self) -> float:
        if self.spire is not None:
            return 0.0
        with self._lock:
            if not self._svids:
                return 0.0
            soonest = min(s.not_after for s in self._svids.values())
        return max(0.0, (soonest - dt.datetime.now(dt.UTC)).total_seconds())

    # ------------------------------------------------------------ maintenance
    def rotate_due(self) -> list[str]:
        """Renew every cached X509-SVID past half-life; returns the SPIFFE IDs renewed."""
        now = dt.datetime.now(dt.UTC)
        renewed = []
        with self._lock:
            due = [(k, s) for k, s in self._svids.items() if now >= renew_at(s)]
        for key, old in due:
            new = mint_x509_svid(self.ca, old.spiffe_id, ttl=self._svid_ttl[key])
            with self._lock:
                self._svids[key] = new
            renewed.append(key)
            self.m_rotated.inc()
            self.m_issued.labels("x509").inc()
            if self.audit:
                self.audit.emit(
                    "svid.rotated",
                    type="x509",
                    spiffe_id=key,
                    fingerprint=new.fingerprint,
                    previous=old.fingerprint,
                    not_after=new.not_after.isoformat(),
                )
        if renewed:
            self._notify()
        return renewed

    def _maintain(self) -> None:
        if self.spire is not None:
            return  # SPIRE rotates its SVIDs and bundles; the streams tell us
        while not self._stop.wait(1.0):
            try:
                self.rotate_due()
                if (
                    self.keys.version != self._keys_version
                    or self.clock() >= self.keys.next_change_at()
                ):
                    before = self._bundle.sequence if self._bundle else -1
                    self.keys.published()
                    self._refresh_bundle()
                    if self._bundle.sequence != before:
                        self._notify()
                path = self.cfg.entries_file
                if path and os.path.exists(path) and os.stat(path).st_mtime != self._entries_mtime:
                    self.reload_entries()
            except Exception:
                log.exception("identity maintenance failed; retrying")
