"""A workload connection as the proxy serves it: what is the same for all its requests.

Made once per accepted connection (Proxy._serve), once its redirect record and attestation
are known; passed whole to the decision's inputs, the full path's steps and the fast lane,
instead of the eight to ten values each once took one by one.
"""

from __future__ import annotations

from typing import Any

from agent.attest.selectors import Attestation
from agent.identity.manager import Identity
from agent.inject.decide import Caller
from agent.inject.flows import ClientSide
from agent.inject.redirect import RedirectInfo
from agent.inject.upstreams import Upstream


def pool_key(ident: Identity | None, up: Upstream) -> tuple[str | None, str, int, str]:
    """Upstream connections are reused only by the same identity to the same server."""
    return (str(ident.spiffe_id) if ident else None, up.host, up.port, up.scheme)


def changed_since_attested(info: RedirectInfo, att: Attestation) -> str:
    """How the process that connected differs from its image's attestation ("": it does
    not). The image is attested from its exec (bpf/process_events.c) and /proc read soon
    after; the record is the kernel's view at connect (bpf/redirect.c: the real uid and the
    cgroup of the connecting task). A process that setuid()s or is moved to another cgroup
    in between is no longer what its selectors were made from: they could name another
    identity, or none. Fails closed: such a connection is closed at its first request."""
    fix = (
        "its attestation no longer describes it; connection closed (make the change before "
        "the exec, e.g. with setpriv or systemd-run, for the program to be attested as what "
        "it runs as)"
    )
    if info.uid != att.real_uid:
        return (
            f"pid {info.tgid} connected as uid {info.uid}, but its image was attested as uid "
            f"{att.real_uid}: {fix}"
        )
    # 0: the attestation has no cgroup id (a process seeded from /proc whose cgroup could
    # not be found under the agent's cgroup root); its cgroup:path selector, if any, came
    # from the path /proc gave, and is not checked here
    if att.cgroup_id and info.cgroup_id != att.cgroup_id:
        return (
            f"pid {info.tgid} connected from another cgroup (id {info.cgroup_id}) than its "
            f"image was attested in ({att.cgroup_path}, id {att.cgroup_id}): {fix}"
        )
    return ""


class Served:
    __slots__ = (
        "caller",
        "changed",
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
        changed: str = "",
    ):
        self.client, self.info, self.up = client, info, up
        # changed_since_attested's answer: then no request on it is served as the identity
        self.changed = changed
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
