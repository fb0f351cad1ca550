"""The identity manager: attested process → SPIFFE ID → SVIDs, whatever their source.

The SVIDs, the trust bundle and the registration entries come from one `SvidSource`
(agent/identity/sources.py), chosen once when the manager is built; the manager holds what
does not depend on the source: the identity decision and its audit event, the metrics,
which live process images use which identity, and the `changed` condition that anything
serving identities (the Workload API, the OAuth client) waits on to learn about rotations.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from agent.config import IdentitySection
from agent.identity.bundle import TrustBundle
from agent.identity.embedded_source import EmbeddedSource
from agent.identity.jwtsvid import JwtSvid
from agent.identity.sources import Identity, SourceEvents, SvidSource
from agent.identity.spiffeid import SpiffeId, TrustDomain
from agent.identity.spire_source import SpireSource
from agent.identity.x509svid import X509Svid
from agent.observe.logging import AuditLog, get_logger

__all__ = ["Identity", "IdentityManager", "source_from_config"]

log = get_logger("identity")


class ProcessImage(Protocol):
    """One exec of one process: the key the manager tracks identity users by."""

    @property
    def tgid(self) -> int: ...
    @property
    def exec_ns(self) -> int: ...


class AttestedImage(ProcessImage, Protocol):
    """What the manager reads of an attestation (agent.attest.selectors.Attestation)."""

    @property
    def start_ns(self) -> int: ...
    @property
    def exe(self) -> str: ...
    @property
    def cgroup_path(self) -> str | None: ...
    @property
    def selectors(self) -> frozenset[str]: ...


class ImageEvent(ProcessImage, Protocol):
    """What the manager reads of a kernel process event (agent.attest.table.ProcessEvent)."""

    @property
    def type(self) -> int: ...


def source_from_config(
    cfg: IdentitySection, state_dir: str, clock: Callable[[], float] = time.time
) -> SvidSource:
    """The one place `identity.source` is read."""
    if cfg.source == "spire":
        return SpireSource(cfg.spire_admin_socket, TrustDomain.parse(cfg.trust_domain))
    return EmbeddedSource(cfg, state_dir, clock)


class IdentityManager:
    name = "identity"

    def __init__(
        self,
        cfg: IdentitySection,
        state_dir: str,
        audit: AuditLog | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        source: SvidSource | None = None,
    ):
        self.source = source if source is not None else source_from_config(cfg, state_dir, clock)
        self.audit = audit
        self.changed = threading.Condition()
        self.generation = 0
        self._lock = threading.Lock()
        # which live process images use which identity, to know when an identity ends
        self._users: dict[str, set[int]] = {}
        self._user_of: dict[int, tuple[int, str]] = {}  # tgid -> (exec_ns, spiffe id)
        self.on_identity_ended: list[Callable[[str], None]] = []
        # an identity with no live process has one again (a new process within the OAuth
        # service's grace period reuses the tokens the last one left: docs/tokens.md)
        self.on_identity_started: list[Callable[[str], None]] = []
        self._init_metrics(registry)

    def _init_metrics(self, registry: CollectorRegistry | None) -> None:
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
        self.m_entries.set_function(lambda: len(self.source.entries()))
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
        self.source.start(
            SourceEvents(
                changed=self._notify,
                minted=self._minted,
                relayed=lambda _svid: self.m_issued.labels("x509").inc(),
                rotated=self._rotated,
                entries_read=lambda ok: self.m_reloads.labels("ok" if ok else "error").inc(),
            )
        )

    def stop(self) -> None:
        self.source.stop()
        self._notify()

    def ready(self) -> tuple[bool, str]:
        return self.source.ready()

    def _notify(self) -> None:
        with self.changed:
            self.generation += 1
            self.changed.notify_all()

    def _minted(self, svid: X509Svid) -> None:
        self.m_issued.labels("x509").inc()
        self._audit_x509("svid.issued", svid, serial=format(svid.leaf.serial_number, "x"))

    def _rotated(self, old: X509Svid, new: X509Svid) -> None:
        self.m_rotated.inc()
        self.m_issued.labels("x509").inc()
        self._audit_x509("svid.rotated", new, previous=old.fingerprint)

    def _audit_x509(self, event: str, svid: X509Svid, **fields: str) -> None:
        if self.audit:
            self.audit.emit(
                event,
                type="x509",
                spiffe_id=str(svid.spiffe_id),
                fingerprint=svid.fingerprint,
                not_after=svid.not_after.isoformat(),
                **fields,
            )

    # ------------------------------------------------------------ entries
    def reload_entries(self, initial: bool = False) -> bool:
        """Re-read the registration entries; on any error keep the ones already loaded."""
        return self.source.reload_entries(initial)

    def resolve(self, attestation: AttestedImage | None, quiet: bool = False) -> Identity | None:
        """The identity for an attested image; None (and an audit event) when there is none."""
        if attestation is None:
            self.m_decisions.labels("unattested").inc()
            return None
        m = self.source.match(frozenset(attestation.selectors))
        if m is None:
            if quiet:  # looking at ancestors, not deciding for a caller
                return None
            self.m_decisions.labels("no_entry").inc()
            log.debug("no registration entry matches", pid=attestation.tgid, exe=attestation.exe)
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
        log.debug(
            "registration entry matched",
            pid=attestation.tgid,
            entry=m.entry.id,
            spiffe_id=str(m.spiffe_id),
        )
        return Identity(m.spiffe_id, m.entry)

    def identity_for_id(self, spiffe_id: str) -> Identity | None:
        """An Identity for an ID some entry could issue (operator tools: `oauth probe`)."""
        for e in self.source.entries():
            pattern = re.escape(e.spiffe_id)
            pattern = re.sub(r"\\\{[^}]*\\\}", "[A-Za-z0-9._-]+", pattern)
            if re.fullmatch(pattern, spiffe_id):
                return Identity(SpiffeId.parse(spiffe_id), e)
        return None

    # ------------------------------------------------------------ identity lifetimes
    def note_use(self, ident: Identity, attestation: AttestedImage) -> None:
        """An attested image is using this identity (a proxied connection, an SVID)."""
        sid = str(ident.spiffe_id)
        with self._lock:
            self._user_of[attestation.tgid] = (attestation.exec_ns, sid)
            users = self._users.setdefault(sid, set())
            started = not users
            users.add(attestation.tgid)
        if started:
            self._run(self.on_identity_started, sid, "identity start handler failed")

    def process_event(self, ev: ImageEvent) -> None:
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
            self._run(self.on_identity_ended, ended, "identity end handler failed")

    @staticmethod
    def _run(handlers: list[Callable[[str], None]], spiffe_id: str, failed: str) -> None:
        for fn in handlers:
            try:
                fn(spiffe_id)
            except Exception:
                log.exception(failed, spiffe_id=spiffe_id)

    def live_identities(self) -> dict[str, int]:
        with self._lock:
            return {sid: len(tgids) for sid, tgids in self._users.items()}

    # ------------------------------------------------------------ SVIDs
    def x509_svid(self, ident: Identity) -> X509Svid:
        return self.source.x509_svid(ident)

    def jwt_svid(
        self, ident: Identity, audience: list[str], ttl: int | None = None, iss: str | None = None
    ) -> JwtSvid:
        svid = self.source.jwt_svid(ident, list(audience), ttl, iss)
        self.m_issued.labels("jwt").inc()
        return svid

    def bundle(self) -> TrustBundle:
        return self.source.bundle()

    def held_svids(self) -> list[tuple[str, X509Svid]]:
        """A snapshot of the X509-SVIDs the source holds and renews, by SPIFFE ID."""
        return self.source.held_svids()

    def rotate_due(self) -> list[str]:
        """Renew every held X509-SVID past half-life now; returns the SPIFFE IDs renewed."""
        return self.source.rotate_due()

    def _soonest_expiry(self) -> float:
        held = self.held_svids()
        if not held:
            return 0.0
        soonest = min(svid.not_after for _, svid in held)
        return max(0.0, (soonest - dt.datetime.now(dt.UTC)).total_seconds())
