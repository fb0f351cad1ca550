"""A workload connection as the proxy serves it: what is the same for all its requests.

Made once per accepted connection (Proxy._serve), once its redirect record and attestation
are known; passed whole to the decision's inputs, the full path's steps and the fast lane,
instead of the eight to ten values each once took one by one.
"""

from __future__ import annotations

from typing import Any

from agent.inject.decide import Caller
from agent.inject.flows import ClientSide
from agent.inject.redirect import RedirectInfo
from agent.inject.upstreams import Upstream


def pool_key(ident: Any, up: Upstream) -> tuple:
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
        ident: Any,
        generation: int,
        who: dict,
        fragment: str,
    ):
        self.client, self.info, self.up = client, info, up
        self.ident = ident  # agent.identity.manager.Identity, or None
        self.generation = generation  # of the registration entries it was resolved by
        self.who = who  # the process's audit fields
        self.fragment = fragment  # those fields serialized once (AuditLog.fragment)
        self.key = pool_key(ident, up)
        # the decision's view of the caller while nothing has changed (one object, reused)
        self.caller = Caller(True, who["spiffe_id"], who.get("parent_spiffe_id"))
