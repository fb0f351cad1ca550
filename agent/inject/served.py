"""A workload connection as the proxy serves it: what is the same for all its requests.

Made once per accepted connection (Proxy._serve), once its redirect record and attestation
are known; passed whole to the decision's inputs, the full path's steps and the fast lane,
instead of the eight to ten values each once took one by one.
"""

from __future__ import annotations

from typing import Any

from agent.identity.manager import Identity
from agent.inject.decide import Caller
from agent.inject.flows import ClientSide
from agent.inject.redirect import RedirectInfo
from agent.inject.upstreams import Upstream


def pool_key(ident: Identity | None, up: Upstream) -> tuple[str | None, str, int, str]:
    """Upstream connections are reused only by the same identity to the same server."""
    return (str(ident.spiffe_id) if ident else None, up.host, up.port, up.scheme)


class Served:
    __slots__ = (
        "caller",
        "client",
        "fragment",
        "generation",
        "ident",
        "info",
        "key",
        "up",
        "who",
    )

    def __init__(
        self,
        client: ClientSide,
        info: RedirectInfo,
        up: Upstream,
        ident: Identity | None,
        generation: int,
        who: dict[str, Any],
        fragment: str,
        selectors: frozenset[str] = frozenset(),
    ):
        self.client, self.info, self.up = client, info, up
        self.ident = ident  # None: not attested, or no registration entry matches
        self.generation = generation  # of the registration entries it was resolved by
        self.who = who  # the process's audit fields
        self.fragment = fragment  # those fields serialized once (AuditLog.fragment)
        self.key = pool_key(ident, up)
        # the decision's view of the caller while nothing has changed (one object, reused)
        # (selectors: the process's attested ones, which policy conditions may read)
        self.caller = Caller(
            True, who["spiffe_id"], who.get("parent_spiffe_id"), selectors=selectors
        )

    def holder(self) -> Identity:
        """The identity a credential on this connection is for. decide() gives credentials
        only to a caller with an identity: without one, this fails the request closed."""
        if self.ident is None:
            raise RuntimeError("a credential for a connection without an identity")
        return self.ident
