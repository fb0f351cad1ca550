"""The OAuth service: tokens for (identity, MCP server), the way the server's AS expects.

Ties discovery, registration, the DPoP keys (one per SPIFFE ID, memory only), the token
request and the cache together, and emits one audit event and one metric per outcome.
Runs on the agent's asyncio loop; `run_sync` lets other threads (admin socket) call in.

Which authorization server gets a server's assertions is decided here, before any is
minted (trust.py states the rules): the server's `authorization_servers` plus its `issuer`,
else the AS pinned on first discovery. A refusal is an UntrustedAuthorizationServer (or
another TrustRefused) naming the server, the AS named and the allowed ones, and an
`oauth.refused` audit event under the identity that asked; the proxy answers its request
with a 502 carrying that message.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import Counter, Gauge

from agent.identity.manager import Identity
from agent.oauth import registration as reg
from agent.oauth.cache import TokenCache
from agent.oauth.discovery import Discovery, ServerMetadata, canonical_resource
from agent.oauth.dpop import DPoPKey
from agent.oauth.errors import (
    OAuthError,
    RegistrationError,
    TrustRefused,
    UntrustedAuthorizationServer,
)
from agent.oauth.tokens import Token, request_token
from agent.oauth.trust import PinStore, choose_authorization_server
from agent.observe.logging import AuditLog, get_logger
from agent.observe.tally import TallyCounter

# how long cached_token() trusts the cache key token() resolved for (identity, server)
KEY_MEMO_SECONDS = 30.0

log = get_logger("oauth")


@dataclass(frozen=True)
class Resolved:
    resource: str
    issuer: str
    metadata: ServerMetadata
    scope: str
    dpop: bool  # send DPoP proofs
    dpop_required: str | None = None  # why a Bearer token would be refused (None: it is not)


class OAuthService:
    name = "oauth"

    def __init__(
        self,
        cfg: Any,
        identity: Any,
        state_dir: str,
        audit: AuditLog | None = None,
        registry: Any = None,
        jwks_uri: str | None = None,
    ):
        self.cfg = cfg  # agent.config.Config
        self.identity = identity  # agent.identity.manager.IdentityManager
        self.audit = audit
        self.jwks_uri = cfg.oauth.jwks_uri or jwks_uri
        self.store = reg.ClientStore(Path(state_dir))
        self.pins = PinStore(state_dir)
        self.servers = {s.name: s for s in cfg.servers}
        self.http: httpx.AsyncClient | None = None
        self.discovery: Discovery | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._dpop_keys: dict[str, DPoPKey] = {}
        self._nonces: dict[str, str] = {}
        self._reg_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.cache = TokenCache(
            self._fetch, refresh_ahead=cfg.oauth.refresh_ahead, on_event=self._cache_event
        )
        self._pending: dict[tuple, tuple[Identity, Any]] = {}
        self._token_keys: dict[tuple[str, str], tuple[tuple, float]] = {}
        self.m_requests = Counter(
            "credless_token_requests",
            "Token requests by server and outcome",
            ["server", "outcome"],
            registry=registry,
        )
        # counted per proxied request, from the event loop only: a plain-number tally
        self.m_lookups = TallyCounter(
            "credless_token_cache_lookups", "Token cache lookups", ["result"], registry=registry
        )
        self.m_hit = self.m_lookups.labels("hit")  # also counted by the proxy's fast lane
        Gauge("credless_token_cache_size", "Tokens held in memory", registry=registry).set_function(
            lambda: len(self.cache)
        )
        self.m_refused = Counter(
            "credless_oauth_refused",
            "What a server's challenge, "
            "metadata or token response said that the agent refused to "
            "use (issue 15: untrusted authorization server, insecure "
            "endpoint, mismatched metadata, token for another audience "
            "or weaker than required), by server and check",
            ["server", "check"],
            registry=registry,
        )
        self.m_registrations = Counter(
            "credless_oauth_registrations",
            "Dynamic client registrations and deletions",
            ["server", "action", "outcome"],
            registry=registry,
        )

    # ------------------------------------------------------------ lifecycle
    async def astart(self) -> None:
        o = self.cfg.oauth
        self.http = httpx.AsyncClient(
            verify=o.ca_file or True,
            timeout=o.request_timeout_seconds,
            follow_redirects=False,
            trust_env=False,
        )
        self.discovery = Discovery(self.http, ttl=o.discovery_ttl_seconds)
        self.loop = asyncio.get_running_loop()

    async def astop(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        for key in self._dpop_keys.values():
            key.destroy()
        self._dpop_keys.clear()

    def run_sync(self, coro, timeout: float = 60.0):
        """Run a coroutine on the service's loop from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # ------------------------------------------------------------ resolution
    def server(self, name: str):
        try:
            return self.servers[name]
        except KeyError:
            raise OAuthError(
                f"no [[servers]] entry named {name!r}; configured: "
                + ", ".join(sorted(self.servers))
            ) from None

    @staticmethod
    def configured_authorization_servers(server: Any) -> tuple[str, ...]:
        """The ASes the configuration allows for server: its authorization_servers, and its
        issuer when set. Empty: the AS pinned on first discovery decides."""
        allowed = tuple(getattr(server, "authorization_servers", ()) or ())
        if server.issuer and server.issuer not in allowed:
            allowed += (server.issuer,)
        return allowed

    def authorization_servers(self, server_name: str) -> tuple[str, ...]:
        """Every AS that may receive assertions for this server now: configured, else
        pinned (empty before the first discovery of an unconfigured server)."""
        server = self.server(server_name)
        allowed = self.configured_authorization_servers(server)
        if allowed:
            return allowed
        pinned = self.pins.get(server.name, canonical_resource(server.url))
        return (pinned,) if pinned else ()

    def assertion_audiences(self) -> frozenset[str]:
        """Every authorization server credless sends client assertions to, or may: the
        configured and pinned issuers of every server, and each endpoint discovered. The
        Workload API refuses JWT-SVIDs for these audiences (a JWT-SVID for one of them is a
        client assertion there, and would let a workload get tokens past the proxy).
        Callable from any thread."""
        out = set(self.discovery.endpoints)
        for name in list(self.servers):
            out.update(self.authorization_servers(name))
        return frozenset(out)

    async def resolve(
        self, server: Any, challenge: str | None = None, ident: Identity | None = None
    ) -> Resolved:
        """Where and how to ask for a token for server. `ident` is the identity asking: a
        refusal is audited under it."""
        resource = canonical_resource(server.url)
        sid = str(ident.spiffe_id) if ident is not None else None

        def report(url: str, reason: str) -> None:
            log.warning("resource metadata URL ignored", server=server.name, url=url)
            self.m_refused.labels(server.name, "resource_metadata_origin").inc()
            if self.audit:
                self.audit.emit(
                    "oauth.refused",
                    spiffe_id=sid,
                    server=server.name,
                    resource=resource,
                    check="resource_metadata_origin",
                    url=url,
                    reason=reason,
                )

        try:
            return await self._resolve(server, resource, challenge, report, sid)
        except TrustRefused as e:
            extra = {}
            if isinstance(e, UntrustedAuthorizationServer):
                extra = {
                    "authorization_server": e.named[0] if e.named else None,
                    "named": list(e.named),
                    "allowed": list(e.allowed),
                }
            log.warning("discovery refused", server=server.name, check=e.kind, error=str(e))
            self.m_refused.labels(server.name, e.kind).inc()
            if self.audit:
                self.audit.emit(
                    "oauth.refused",
                    spiffe_id=sid,
                    server=server.name,
                    resource=resource,
                    check=e.kind,
                    url=e.url,
                    reason=str(e),
                    **extra,
                )
            raise

    async def _resolve(
        self, server: Any, resource: str, challenge: str | None, report, sid: str | None
    ) -> Resolved:
        scope = server.scope
        prm = None
        allowed = self.configured_authorization_servers(server)
        # an operator's `credless oauth probe` of a URL no [[servers]] entry names: nothing
        # is configured and nothing is pinned for it; it uses what it discovers, and says so
        persist = not isinstance(server, _AdHoc)
        to_pin = False
        if server.issuer:
            issuer = server.issuer  # configured: the server is not asked at all
        else:
            prm = await self.discovery.resource(server.url, challenge, report=report)
            scope = scope or prm.challenge_scope or " ".join(prm.scopes_supported)
            source = "servers.authorization_servers"
            if not allowed and persist:
                pinned = self.pins.get(server.name, resource)
                if pinned:
                    allowed = (pinned,)
                    source = f"pinned on first discovery in {self.pins.path}"
            if allowed:
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
                issuer = chosen
            else:
                issuer = prm.authorization_servers[0]  # trust on first use: pinned below
                to_pin = persist
        meta = await self.discovery.server(issuer)
        if to_pin:
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
                if self.audit:
                    self.audit.emit(
                        "oauth.pinned",
                        spiffe_id=sid,
                        server=server.name,
                        resource=resource,
                        issuer=issuer,
                        path=str(self.pins.path),
                    )
        required = None
        if server.dpop == "always":
            required = 'servers.dpop = "always"'
        elif server.dpop == "auto" and prm is not None and prm.dpop_bound_access_tokens_required:
            required = f"the resource metadata of {resource} says dpop_bound_access_tokens_required"
        dpop = server.dpop == "always" or (
            server.dpop == "auto"
            and (
                "ES256" in meta.dpop_signing_alg_values_supported
                or bool(prm and prm.dpop_bound_access_tokens_required)
            )
        )
        return Resolved(resource, issuer, meta, scope, dpop, required)

    def dpop_key(self, spiffe_id: str) -> DPoPKey:
        key = self._dpop_keys.get(spiffe_id)
        if key is None:
            key = self._dpop_keys[spiffe_id] = DPoPKey()
        return key

    # ------------------------------------------------------------ tokens
    def cached_token(self, ident: Identity, server_name: str) -> Token | None:
        """The proxy's per-request fast path: the valid cached token for this identity and
        server, found without awaiting anything, or None (then call token()). The cache key
        token() last resolved for the pair is reused for KEY_MEMO_SECONDS, so a changed
        server configuration or discovery document is picked up within that time."""
        memo = self._token_keys.get((str(ident.spiffe_id), server_name))
        if memo is None or memo[1] < time.monotonic():
            return None
        tok = self.cache.peek(memo[0])
        if tok is not None:
            self.m_hit.inc()
        return tok

    async def token(self, ident: Identity, server_name: str, challenge: str | None = None) -> Token:
        server = self.server(server_name)
        resolved = await self.resolve(server, challenge, ident)
        key = (str(ident.spiffe_id), server.name, resolved.resource, resolved.scope)
        self._pending[key] = (ident, resolved)
        if challenge is None:
            self._token_keys[(key[0], server.name)] = (key, time.monotonic() + KEY_MEMO_SECONDS)
        before = self.cache.hits
        tok = await self.cache.get(key)
        self.m_lookups.labels("hit" if self.cache.hits > before else "miss").inc()
        return tok

    def invalidate(self, ident: Identity, server_name: str, token: Token) -> None:
        """The resource server rejected this token (invalid_token): never serve it again."""
        for key, cached in self.cache.tokens():
            if cached is token or cached.fingerprint == token.fingerprint:
                self.cache.invalidate(key)

    async def _client_id(self, ident: Identity, server: Any, resolved: Resolved) -> str:
        sid = str(ident.spiffe_id)
        if server.registration != "dynamic":
            return server.client_id or sid
        existing = self.store.get(sid, resolved.issuer)
        if existing is not None:
            return existing.client_id
        lock = self._reg_locks.setdefault((sid, resolved.issuer), asyncio.Lock())
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
                    self.http,
                    endpoint=endpoint,
                    issuer=resolved.issuer,
                    spiffe_id=sid,
                    jwks_uri=self.jwks_uri,
                    jwks=jwks,
                    software_statement=statement,
                    dpop=resolved.dpop,
                )
            except OAuthError:
                self.m_registrations.labels(server.name, "register", "error").inc()
                raise
            self.store.put(client)
            self.m_registrations.labels(server.name, "register", "ok").inc()
            if self.audit:
                self.audit.emit(
                    "oauth.client_registered",
                    spiffe_id=sid,
                    server=server.name,
                    issuer=resolved.issuer,
                    client_id=client.client_id,
                )
            return client.client_id

    async def _fetch(self, key) -> Token:
        ident, resolved = self._pending[key]
        server = self.servers[key[1]]
        sid = str(ident.spiffe_id)
        started = time.monotonic()
        try:
            client_id = await self._client_id(ident, server, resolved)

            def mint(audience: str, iss: str | None) -> str:
                return self.identity.jwt_svid(ident, [audience], ttl=60, iss=iss).token

            tok = await request_token(
                self.http,
                token_endpoint=resolved.metadata.token_endpoint,
                issuer=resolved.issuer,
                resource=resolved.resource,
                scope=resolved.scope,
                profile=server.auth_profile,
                assertion_audience=server.assertion_audience,
                client_id=client_id,
                spiffe_id=sid,
                mint_assertion=mint,
                dpop=self.dpop_key(sid) if resolved.dpop else None,
                nonces=self._nonces,
                dpop_required=resolved.dpop_required,
            )
        except OAuthError as e:
            self.m_requests.labels(server.name, e.kind).inc()
            if isinstance(e, TrustRefused):
                self.m_refused.labels(server.name, e.kind).inc()
            if self.audit:
                self.audit.emit(
                    "token.failed",
                    spiffe_id=sid,
                    server=server.name,
                    issuer=resolved.issuer,
                    error=e.error,
                    kind=e.kind,
                    reason=str(e),
                    latency_ms=round((time.monotonic() - started) * 1000, 1),
                )
            raise
        self.m_requests.labels(server.name, "ok").inc()
        return tok

    def _cache_event(self, what: str, key, obj) -> None:
        if what in ("obtained", "refreshed") and self.audit:
            tok: Token = obj
            self.audit.emit(
                f"token.{what}",
                spiffe_id=tok.spiffe_id,
                server=key[1],
                issuer=tok.issuer,
                resource=tok.resource,
                token_type=tok.token_type,
                jti=tok.jti,
                jkt=tok.jkt,
                token_sha256=tok.fingerprint,
                expires_in=int(tok.expires_at - time.time()),
                scope=tok.scope,
            )
        elif what == "refresh_failed":
            log.warning(
                "token refresh failed; serving the cached token until it expires",
                server=key[1],
                spiffe_id=key[0],
                error=str(obj),
            )

    # ------------------------------------------------------------ lifecycle of identities
    async def forget(self, spiffe_id: str) -> dict:
        """The identity's last process exited: drop its tokens and DPoP key, delete its
        registered clients where the server supports it."""
        dropped = self.cache.drop(lambda k: k[0] == spiffe_id)
        key = self._dpop_keys.pop(spiffe_id, None)
        if key is not None:
            key.destroy()
        deleted = []
        for client in self.store.for_identity(spiffe_id):
            try:
                if await reg.delete(self.http, client):
                    self.store.remove(spiffe_id, client.issuer)
                    deleted.append(client.client_id)
                    self.m_registrations.labels("-", "delete", "ok").inc()
            except OAuthError as e:
                self.m_registrations.labels("-", "delete", "error").inc()
                log.warning(
                    "client deletion failed; will retry when the identity ends again",
                    spiffe_id=spiffe_id,
                    error=str(e),
                )
        if self.audit:
            self.audit.emit(
                "identity.ended",
                spiffe_id=spiffe_id,
                tokens_dropped=len(dropped),
                dpop_key_destroyed=key is not None,
                clients_deleted=deleted,
            )
        return {"tokens_dropped": len(dropped), "clients_deleted": deleted}

    async def introspect(self, ident: Identity, server_name: str, token: Token) -> dict:
        """RFC 7662 introspection of a token, authenticating as the identity's client.
        Returns the server's claims about it (active, sub, aud, ...), never the token."""
        from agent.oauth.errors import from_error_response
        from agent.oauth.tokens import JWT_BEARER, post_form

        server = self.server(server_name)
        resolved = await self.resolve(server, ident=ident)
        endpoint = resolved.metadata.introspection_endpoint
        if not endpoint:
            raise OAuthError(f"{resolved.issuer} advertises no introspection_endpoint")
        client_id = await self._client_id(ident, server, resolved)
        assertion = self.identity.jwt_svid(ident, [resolved.issuer], ttl=60, iss=client_id).token
        status, body, _ = await post_form(
            self.http,
            endpoint,
            {
                "token": token.access_token,
                "token_type_hint": "access_token",
                "client_assertion_type": JWT_BEARER,
                "client_assertion": assertion,
            },
            {},
            "introspection",
        )
        if status != 200 or not isinstance(body, dict):
            raise from_error_response(
                status, body if isinstance(body, dict) else {}, endpoint, "introspection"
            )
        return {
            k: body[k]
            for k in (
                "active",
                "sub",
                "aud",
                "client_id",
                "exp",
                "iat",
                "scope",
                "token_type",
                "iss",
                "cnf",
            )
            if k in body
        }

    # ------------------------------------------------------------ operator probe
    async def probe(self, url: str, ident: Identity) -> dict:
        """Discovery, registration if needed and one fresh token request; a summary only."""
        match = [
            s for s in self.servers.values() if canonical_resource(s.url) == canonical_resource(url)
        ]
        server = match[0] if match else _AdHoc(name="probe", url=url)
        resolved = await self.resolve(server, ident=ident)
        key = (str(ident.spiffe_id), server.name, resolved.resource, resolved.scope)
        self._pending[key] = (ident, resolved)
        self.servers.setdefault(server.name, server)
        tok = await self._fetch(key)
        out = {
            "server": server.name,
            "issuer": resolved.issuer,
            "token_endpoint": resolved.metadata.token_endpoint,
            "auth_profile": server.auth_profile,
            "dpop": resolved.dpop,
            **tok.summary(),
        }
        if tok.jti is None and resolved.metadata.introspection_endpoint:
            # an opaque token says nothing itself: ask the server what it is
            try:
                out["introspection"] = await self.introspect(ident, server.name, tok)
            except OAuthError as e:
                out["introspection"] = {"error": e.to_dict()}
        return out


@dataclass(frozen=True)
class _AdHoc:
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
    authorization_servers: tuple = ()
