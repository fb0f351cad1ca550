"""Where and how to ask for a server's tokens: which authorization server may receive its
assertions, that AS's metadata, the scope, and whether tokens are DPoP-bound.

The AS is decided here, before any assertion is minted (trust.py states the rules): the
server's `authorization_servers` plus its `issuer`, else the AS pinned on first discovery.
A refusal is an UntrustedAuthorizationServer (or another TrustRefused) naming the server,
the AS named and the allowed ones, and an `oauth.refused` audit event under the identity
that asked; the proxy answers its request with a 502 carrying that message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from agent.config import ServerSection
from agent.oauth.discovery import Discovery, ResourceMetadata, ServerMetadata, canonical_resource
from agent.oauth.errors import TrustRefused, UntrustedAuthorizationServer
from agent.oauth.trust import PinStore, choose_authorization_server
from agent.observe.logging import AuditLog, get_logger

log = get_logger("oauth")


@dataclass(frozen=True)
class AdHocServer:
    """A server given only by URL on the probe's command line: all defaults."""

    name: str
    url: str
    auth_profile: str = "jwt-bearer"
    assertion_audience: str = "issuer"
    issuer: str = ""
    scope: str = ""
    registration: str = "preregistered"
    client_id: str = ""
    dpop: str = "auto"
    authorization_servers: tuple[str, ...] = ()
    workload_assertion: str = "refuse"
    ca_file: str = ""


# a configured [[servers]] entry, or the probe's URL
Server = ServerSection | AdHocServer


@dataclass(frozen=True)
class Resolved:
    resource: str
    issuer: str
    metadata: ServerMetadata
    scope: str
    dpop: bool  # send DPoP proofs
    dpop_required: str | None = None  # why a Bearer token would be refused (None: it is not)


def audit_event(
    audit: AuditLog | None, event: str, spiffe_id: str | None, server: str, **fields: Any
) -> None:
    """An audit event about a server, under the identity it concerns."""
    if audit:
        audit.emit(event, spiffe_id=spiffe_id, server=server, **fields)


def configured_authorization_servers(server: Server) -> tuple[str, ...]:
    """The ASes the configuration allows for server: its authorization_servers, and its
    issuer when set. Empty: the AS pinned on first discovery decides."""
    allowed = tuple(server.authorization_servers)
    if server.issuer and server.issuer not in allowed:
        allowed += (server.issuer,)
    return allowed


class Resolver:
    """Resolves servers through a Discovery, pinning first-discovered ASes in `pins`."""

    def __init__(self, pins: PinStore, audit: AuditLog | None, m_refused: Counter):
        self.pins = pins
        self.audit = audit
        self.m_refused = m_refused  # by server and check

    def authorization_servers(self, server: Server) -> tuple[str, ...]:
        """Every AS that may receive assertions for this server now: configured, else
        pinned (empty before the first discovery of an unconfigured server)."""
        allowed = configured_authorization_servers(server)
        if allowed:
            return allowed
        pinned = self.pins.get(server.name, canonical_resource(server.url))
        return (pinned,) if pinned else ()

    def refused(
        self, server: Server, sid: str | None, resource: str, check: str, **fields: Any
    ) -> None:
        """Count and audit something server said that the agent refused to use."""
        self.m_refused.labels(server.name, check).inc()
        audit_event(
            self.audit, "oauth.refused", sid, server.name, resource=resource, check=check, **fields
        )

    async def resolve(
        self,
        discovery: Discovery,
        server: Server,
        challenge: str | None = None,
        sid: str | None = None,
    ) -> Resolved:
        """Where and how to ask for a token for server. `sid` is the identity asking: a
        refusal is audited under it."""
        resource = canonical_resource(server.url)

        def report(url: str, reason: str) -> None:
            log.warning("resource metadata URL ignored", server=server.name, url=url)
            self.refused(server, sid, resource, "resource_metadata_origin", url=url, reason=reason)

        try:
            prm = None
            to_pin = False
            if server.issuer:
                issuer = server.issuer  # configured: the server is not asked at all
            else:
                prm = await discovery.resource(server.url, challenge, report=report)
                issuer, to_pin = self._choose(server, resource, prm)
            meta = await discovery.server(issuer)
            if to_pin:
                self._pin(server, resource, issuer, sid)
        except TrustRefused as e:
            extra = {}
            if isinstance(e, UntrustedAuthorizationServer):
                extra = {
                    "authorization_server": e.named[0] if e.named else None,
                    "named": list(e.named),
                    "allowed": list(e.allowed),
                }
            log.warning("discovery refused", server=server.name, check=e.kind, error=str(e))
            self.refused(server, sid, resource, e.kind, url=e.url, reason=str(e), **extra)
            raise
        scope = server.scope
        if prm is not None:
            scope = scope or prm.challenge_scope or " ".join(prm.scopes_supported)
        resolved = Resolved(resource, issuer, meta, scope, *_dpop(server, resource, prm, meta))
        log.debug(
            "authorization server resolved",
            server=server.name,
            spiffe_id=sid,
            issuer=issuer,
            how="configured issuer" if server.issuer else "discovered",
            token_endpoint=meta.token_endpoint,
            scope=scope,
            dpop_proofs=resolved.dpop,
            dpop_required=resolved.dpop_required,
        )
        return resolved

    def _choose(self, server: Server, resource: str, prm: ResourceMetadata) -> tuple[str, bool]:
        """The AS the server names that it may use, and whether to pin it: one allowed
        (configured, else pinned), else the first it names (trust on first use)."""
        allowed = configured_authorization_servers(server)
        source = "servers.authorization_servers"
        # an operator's `credless oauth probe` of a URL no [[servers]] entry names: nothing
        # is configured and nothing is pinned for it; it uses what it discovers, and says so
        persist = not isinstance(server, AdHocServer)
        if not allowed and persist:
            pinned = self.pins.get(server.name, resource)
            if pinned:
                allowed = (pinned,)
                source = f"pinned on first discovery in {self.pins.path}"
        if not allowed:
            return prm.authorization_servers[0], persist
        chosen = choose_authorization_server(prm.authorization_servers, allowed)
        if chosen is None:
            named = prm.authorization_servers
            raise UntrustedAuthorizationServer(
                f"server {server.name!r} ({resource}) names authorization server"
                f"{'s' if len(named) > 1 else ''} {', '.join(named)}, not allowed "
                f"for it; allowed: {', '.join(allowed)} ({source}). No assertion "
                "was sent. If the server really moved to another authorization "
                "server, list it in the server's authorization_servers",
                server=server.name,
                named=named,
                allowed=allowed,
            )
        return chosen, False

    def _pin(self, server: Server, resource: str, issuer: str, sid: str | None) -> None:
        """Pin issuer for server, unless another AS is pinned for it already."""
        # get and pin run with no await between them: atomic on this loop
        already = self.pins.get(server.name, resource)
        pinned = self.pins.pin(server.name, resource, issuer)
        if pinned != issuer:  # another discovery pinned another AS meanwhile
            raise UntrustedAuthorizationServer(
                f"server {server.name!r} ({resource}) names authorization server "
                f"{issuer}, not allowed for it; allowed: {pinned} (pinned on first "
                f"discovery in {self.pins.path}). No assertion was sent",
                server=server.name,
                named=(issuer,),
                allowed=(pinned,),
            )
        if already is None:
            log.info("authorization server pinned", server=server.name, issuer=issuer)
            audit_event(
                self.audit,
                "oauth.pinned",
                sid,
                server.name,
                resource=resource,
                issuer=issuer,
                path=str(self.pins.path),
            )


def _dpop(
    server: Server, resource: str, prm: ResourceMetadata | None, meta: ServerMetadata
) -> tuple[bool, str | None]:
    """Whether to send DPoP proofs, and why a Bearer token would be refused (None: it is
    not). docs/dpop.md has the table.

    `auto` follows the resource server, not the authorization server: the MCP server is the
    one that must accept the token, and the MCP specification's default is Bearer. A stock
    MCP server (Bearer only) therefore gets Bearer even from an AS that offers DPoP; DPoP is
    used where the server asks for it (`dpop_bound_access_tokens_required` in its RFC 9728
    metadata, or the DPoP scheme in its 401 challenge). A server that requires DPoP gets
    proofs even from an AS that does not advertise ES256 (it may support DPoP unadvertised);
    a Bearer token it then issues is refused, naming both. With `issuer` configured the
    server is not asked, so nothing says it accepts DPoP: Bearer (set "always" for DPoP)."""
    if server.dpop == "always":
        return True, 'servers.dpop = "always"'
    if server.dpop != "auto" or prm is None:
        return False, None
    schemes = set(prm.challenge_schemes)
    as_es256 = "ES256" in meta.dpop_signing_alg_values_supported
    required = None
    if prm.dpop_bound_access_tokens_required:
        required = f"the resource metadata of {resource} says dpop_bound_access_tokens_required"
    elif "dpop" in schemes and "bearer" not in schemes:
        required = f"the 401 challenge of {resource} names the DPoP scheme only"
    if required is not None:
        if not as_es256:
            required += (
                f"; the authorization server {meta.issuer} does not advertise ES256 in "
                "dpop_signing_alg_values_supported, so it may not issue DPoP-bound tokens: "
                "use an authorization server that does, or a resource server that accepts "
                "Bearer tokens"
            )
        return True, required
    # DPoP offered beside Bearer: bound tokens when the AS can issue them, Bearer otherwise
    return "dpop" in schemes and as_es256, None
