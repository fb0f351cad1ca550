"""The seam between the identity manager and where SVIDs come from: the `SvidSource` protocol.

A source turns an attested process's selectors into a SPIFFE ID and hands out that ID's
SVIDs and the trust bundle; the manager does everything that does not depend on where they
come from (decisions and their audit, metrics, identity lifetimes, waking whoever waits for
a change). Two sources exist, chosen once by whoever builds the manager:

- `EmbeddedSource` (agent/identity/embedded_source.py): this node's CA, JWT keys and
  registration entries file;
- `SpireSource` (agent/identity/spire_source.py): a SPIRE agent's Delegated Identity API.

Like a SPIRE agent plugin, a source does one kind of thing and reports back through the
`SourceEvents` the manager hands it in `start()`. To add one: implement `SvidSource` (the
smallest one is `OneIdentitySource` in tests/unit/test_identity_manager.py), report minted,
relayed and rotated SVIDs through the events, and choose it in
`manager.source_from_config` under a new `identity.source` value (agent/config.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.identity.bundle import TrustBundle
from agent.identity.entries import Entry, Match
from agent.identity.jwtsvid import JwtSvid
from agent.identity.spiffeid import SpiffeId
from agent.identity.x509svid import X509Svid


@dataclass(frozen=True)
class Identity:
    """The identity decision for one attested image."""

    spiffe_id: SpiffeId
    entry: Entry


def _ignore(*_args: object) -> None:
    pass


@dataclass(frozen=True)
class SourceEvents:
    """What a source tells the manager, which counts, audits and wakes waiters on `changed`.

    `minted` is for X509-SVIDs this node's CA signed: the audit trail is the only record of
    what that CA issued. `relayed` is for ones another authority signed and keeps its own
    record of (SPIRE): counted, not audited again.
    """

    changed: Callable[[], None] = _ignore  # SVIDs rotated, bundle or entries changed
    minted: Callable[[X509Svid], None] = _ignore
    relayed: Callable[[X509Svid], None] = _ignore
    rotated: Callable[[X509Svid, X509Svid], None] = _ignore  # (old, new)
    entries_read: Callable[[bool], None] = _ignore  # an entries file was read: valid?


class SvidSource(Protocol):
    """Where SVIDs come from. Every method may be called from any thread."""

    def start(self, events: SourceEvents) -> None:
        """Load or connect; raise (with what to do) if the source cannot serve."""

    def stop(self) -> None: ...

    def ready(self) -> tuple[bool, str]:
        """(serving?, a line for /readyz saying what it serves from)."""

    def match(self, selectors: frozenset[str]) -> Match | None:
        """The entry and SPIFFE ID these selectors earn, or None (fail closed)."""

    def entries(self) -> Sequence[Entry]:
        """The registration entries held on this node (none when another system holds them)."""

    def reload_entries(self, initial: bool = False) -> bool:
        """Re-read the operator's entries; False (keeping the old ones) if they are invalid."""

    def x509_svid(self, ident: Identity) -> X509Svid: ...

    def jwt_svid(
        self, ident: Identity, audience: list[str], ttl: int | None, iss: str | None
    ) -> JwtSvid:
        """A JWT-SVID for `audience`; `ttl` and `iss` are honoured where the source signs."""

    def bundle(self) -> TrustBundle: ...

    def held_svids(self) -> list[tuple[str, X509Svid]]:
        """The X509-SVIDs this source holds and renews itself, by SPIFFE ID."""

    def rotate_due(self) -> list[str]:
        """Renew the held X509-SVIDs past half-life now; the SPIFFE IDs renewed."""
