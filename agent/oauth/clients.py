"""Which client an identity is at an authorization server, for the OAuth service
(agent/oauth/service.py): the configured client_id, or one registered dynamically (RFC
7591, agent/oauth/registration.py) once per (SPIFFE ID, issuer) and kept in the
ClientStore, and those registrations deleted (RFC 7592) when the identity ends.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Protocol

import httpx
from prometheus_client import Counter

from agent.identity.bundle import TrustBundle
from agent.identity.jwtsvid import JwtSvid
from agent.identity.manager import Identity
from agent.oauth import registration as reg
from agent.oauth.errors import OAuthError, RegistrationError
from agent.oauth.resolution import Resolved, Server, audit_event
from agent.oauth.trust import ServerTls
from agent.observe.logging import AuditLog, get_logger

log = get_logger("oauth")


class Assertions(Protocol):
    """What the service asks of the identity manager (agent.identity.manager): JWT-SVIDs,
    as client assertions and software statements, and the bundle a registration's JWKS
    is made from."""

    def jwt_svid(
        self, ident: Identity, audience: list[str], ttl: int | None = None, iss: str | None = None
    ) -> JwtSvid: ...

    def bundle(self) -> TrustBundle: ...


class Clients:
    """The identities' clients at their authorization servers. `http` gives the client
    every request to an authorization server goes through (the service's, read at each
    request); `registrations` counts registrations and deletions by server, action and
    outcome."""

    def __init__(
        self,
        store: reg.ClientStore,
        identity: Assertions,
        http: Callable[[], httpx.AsyncClient],
        as_tls: ServerTls,
        jwks_uri: str | None,
        registrations: Counter,
        audit: AuditLog | None,
    ):
        self.store = store
        self.identity = identity
        self.http = http
        self.as_tls = as_tls
        self.jwks_uri = jwks_uri
        self.registrations = registrations
        self.audit = audit
        # one registration at a time per (SPIFFE ID, issuer): concurrent first requests
        # register one client, not one each
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def client_id(self, ident: Identity, server: Server, resolved: Resolved) -> str:
        """The client_id ident authenticates as at server's authorization server:
        server.client_id (else the SPIFFE ID) when preregistered, else its registered
        client's, registering one first if it has none."""
        sid = str(ident.spiffe_id)
        if server.registration != "dynamic":
            return server.client_id or sid
        existing = self.store.get(sid, resolved.issuer)
        if existing is not None:
            return existing.client_id
        lock = self._locks.setdefault((sid, resolved.issuer), asyncio.Lock())
        async with lock:
            existing = self.store.get(sid, resolved.issuer)
            if existing is not None:
                return existing.client_id
            endpoint = resolved.metadata.registration_endpoint
            if not endpoint:
                raise RegistrationError(
                    f"{resolved.issuer} has no registration_endpoint; "
                    f"preregister {sid} or set registration = "
                    '"preregistered"'
                )
            statement = self.identity.jwt_svid(ident, [resolved.issuer]).token
            from agent.identity.bundle_endpoint import oauth_jwks

            jwks = None if self.jwks_uri else json.loads(oauth_jwks(self.identity.bundle()))
            try:
                client = await reg.register(
                    self.http(),
                    endpoint=endpoint,
                    issuer=resolved.issuer,
                    spiffe_id=sid,
                    jwks_uri=self.jwks_uri,
                    jwks=jwks,
                    software_statement=statement,
                    dpop=resolved.dpop,
                    tls=self.as_tls,
                )
            except OAuthError:
                self.registrations.labels(server.name, "register", "error").inc()
                raise
            self.store.put(client)
            self.registrations.labels(server.name, "register", "ok").inc()
            audit_event(
                self.audit,
                "oauth.client_registered",
                sid,
                server.name,
                issuer=resolved.issuer,
                client_id=client.client_id,
            )
            return client.client_id

    async def delete(self, spiffe_id: str) -> list[str]:
        """Delete the identity's registered clients where the server supports it; the
        client_ids deleted. One whose deletion failed stays stored, to be tried again when
        the identity ends again."""
        deleted = []
        for client in self.store.for_identity(spiffe_id):
            try:
                if await reg.delete(self.http(), client, self.as_tls):
                    self.store.remove(spiffe_id, client.issuer)
                    deleted.append(client.client_id)
                    self.registrations.labels("-", "delete", "ok").inc()
            except OAuthError as e:
                self.registrations.labels("-", "delete", "error").inc()
                log.warning(
                    "client deletion failed; will retry when the identity ends again",
                    spiffe_id=spiffe_id,
                    error=str(e),
                )
        return deleted
