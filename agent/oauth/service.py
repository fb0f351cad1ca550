"""The OAuth service: tokens for (identity, MCP server), the way the server's AS expects.

Ties discovery, registration, the DPoP keys (one per SPIFFE ID, memory only), the token
request and the cache together, and emits one audit event and one metric per outcome.
An identity's tokens and DPoP key outlive its last process by oauth.token_grace_seconds
(never past their expiry), so the next process of that identity reuses them (`forget`).
Runs on the agent's asyncio loop; `run_sync` lets other threads (admin socket) call in.

Where a server's tokens come from (which authorization server may receive its assertions)
is decided by resolution.py, before any assertion is minted. Which client an identity is
there (configured, or registered dynamically, and deleted when it ends): clients.py. The
metrics, and what the token cache's events log and audit: reporting.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
from prometheus_client import CollectorRegistry

from agent import __version__
from agent.config import Config
from agent.identity.manager import Identity
from agent.oauth import registration as reg
from agent.oauth import token_ops
from agent.oauth.cache import GraceTimers, TokenCache, grace_deadline
from agent.oauth.clients import Assertions, Clients
from agent.oauth.discovery import Discovery, ServerMetadata, TlsRouter, canonical_resource
from agent.oauth.dpop import DPoPKey
from agent.oauth.errors import OAuthError, TrustRefused
from agent.oauth.reporting import OAuthMetrics, cache_event
from agent.oauth.resolution import AdHocServer, Resolved, Resolver, Server, audit_event
from agent.oauth.tokens import Token, request_token
from agent.oauth.trust import (
    PinStore,
    ServerTls,
    authorization_server_tls,
    server_tls,
    verifying_context,
)
from agent.observe.logging import AuditLog, get_logger

# how long cached_token() trusts the cache key token() resolved for (identity, server)
KEY_MEMO_SECONDS = 30.0

log = get_logger("oauth")


# (SPIFFE ID, server name, resource, scope): one cached token each
TokenKey = tuple[str, str, str, str]
T = TypeVar("T")


class OAuthService:
    name = "oauth"

    def __init__(
        self,
        cfg: Config,
        identity: Assertions,
        state_dir: str,
        audit: AuditLog | None = None,
        registry: CollectorRegistry | None = None,
        jwks_uri: str | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.cfg = cfg
        self.clock = clock
        self.identity = identity
        self.audit = audit
        self.jwks_uri: str | None = cfg.oauth.jwks_uri or jwks_uri
        # how every authorization server is verified (discovery, token requests, DCR,
        # introspection, deletion): oauth.ca_file, else the system store
        self.as_tls = authorization_server_tls(cfg.oauth.ca_file)
        self.store = reg.ClientStore(Path(state_dir))
        self.pins = PinStore(state_dir)
        self.servers: dict[str, Server] = {s.name: s for s in cfg.servers}
        # made by start(), on the loop they serve
        self.http: httpx.AsyncClient | None = None
        self.discovery: Discovery | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._dpop_keys: dict[str, DPoPKey] = {}
        self._nonces: dict[str, str] = {}
        self.cache = TokenCache(
            self._fetch,
            refresh_ahead=cfg.oauth.refresh_ahead,
            on_event=lambda what, key, obj: cache_event(self.audit, what, key, obj),
            clock=clock,
        )
        # identities whose last process has exited, their tokens kept until the timer fires
        self._graced = GraceTimers()
        self._pending: dict[TokenKey, tuple[Identity, Resolved]] = {}
        self._token_keys: dict[tuple[str, str], tuple[TokenKey, float]] = {}
        # server name -> the 401 challenge of a server that refused a token for its scheme
        # (invalidate): its next resolution reads this, not the cached resource metadata
        self._changed: dict[str, str] = {}
        metrics = OAuthMetrics(registry, lambda: len(self.cache))
        self.m_requests = metrics.requests
        self.m_lookups = metrics.lookups
        self.m_hit = metrics.hit  # also counted by the proxy's fast lane
        self.m_refused = metrics.refused
        self.m_registrations = metrics.registrations
        self.clients = Clients(
            self.store,
            identity,
            self.http_client,
            self.as_tls,
            self.jwks_uri,
            self.m_registrations,
            audit,
        )
        self.resolver = Resolver(self.pins, audit, self.m_refused)

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        o = self.cfg.oauth
        # one client for every party: requests to an MCP server carry its own trust (the
        # one the proxy's connections to it follow), the rest are verified by oauth.ca_file
        default = httpx.AsyncHTTPTransport(
            verify=verifying_context(o.ca_file) if o.ca_file else True, trust_env=False
        )
        self.http = httpx.AsyncClient(
            transport=TlsRouter(default),
            timeout=o.request_timeout_seconds,
            follow_redirects=False,
            trust_env=False,
            # the agent's own requests (probes, metadata, tokens) say whose they are, so a
            # server's log tells them from the workload requests it relays
            headers={"User-Agent": f"credless/{__version__}"},
        )
        self.discovery = Discovery(
            self.http,
            ttl=o.discovery_ttl_seconds,
            mcp_tls=self.server_tls,
            as_tls=self.as_tls,
        )
        self.loop = asyncio.get_running_loop()

    def server_tls(self, url: str) -> ServerTls:
        """How the MCP server at url is verified: its [[servers]] entry's trust (a URL no
        entry names, such as a probe's: inject.upstream_ca_file, else the system store)."""
        resource = canonical_resource(url)
        for s in self.servers.values():
            if canonical_resource(s.url) == resource:
                return server_tls(s.name, s.ca_file, self.cfg.inject.upstream_ca_file)
        return server_tls("", "", self.cfg.inject.upstream_ca_file)

    async def stop(self) -> None:
        self._graced.cancel_all()
        if self.http is not None:
            await self.http.aclose()
        for key in self._dpop_keys.values():
            key.destroy()
        self._dpop_keys.clear()

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a coroutine on the service's loop from another thread."""
        if self.loop is None:
            coro.close()
            raise RuntimeError("the OAuth service is not started")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _started(self) -> tuple[httpx.AsyncClient, Discovery]:
        """The HTTP client and discovery start() made."""
        if self.http is None or self.discovery is None:
            raise RuntimeError("the OAuth service is not started")
        return self.http, self.discovery

    def _audit_at(
        self, event: str, ident: Identity, server: Server, resolved: Resolved, **fields: Any
    ) -> None:
        """An audit event about ident's dealings with server's authorization server."""
        audit_event(
            self.audit, event, str(ident.spiffe_id), server.name, issuer=resolved.issuer, **fields
        )

    # ------------------------------------------------------------ resolution
    def server(self, name: str) -> Server:
        try:
            return self.servers[name]
        except KeyError:
            raise OAuthError(
                f"no [[servers]] entry named {name!r}; configured: "
                + ", ".join(sorted(self.servers))
            ) from None

    def assertion_audiences(self) -> frozenset[str]:
        """Every authorization server credless sends client assertions to, or may: the
        configured and pinned issuers of every server, and each endpoint discovered. The
        Workload API refuses JWT-SVIDs for these audiences (a JWT-SVID for one of them is a
        client assertion there, and would let a workload get tokens past the proxy).
        Callable from any thread."""
        out = set(self._started()[1].endpoints)
        for name in list(self.servers):
            out.update(self.issuers(name))
        return frozenset(out)

    def issuers(self, name: str) -> tuple[str, ...]:
        """The authorization servers that may receive assertions for the server `name` now:
        configured, else pinned (none before an unconfigured server's first discovery)."""
        return self.resolver.authorization_servers(self.server(name))

    async def resolve(
        self, server: Server, challenge: str | None = None, ident: Identity | None = None
    ) -> Resolved:
        """Where and how to ask for a token for server (resolution.py). `ident` is the
        identity asking: a refusal is audited under it."""
        sid = str(ident.spiffe_id) if ident is not None else None
        return await self.resolver.resolve(self._started()[1], server, challenge, sid)

    async def server_metadata(self, issuer: str) -> ServerMetadata:
        """The authorization server's RFC 8414 metadata, as discovered (cached for
        oauth.discovery_ttl_seconds); assertion mode reads its registration endpoint."""
        if self.discovery is None:
            raise OAuthError("the OAuth service is not started")
        return await self.discovery.server(issuer)

    def dpop_key(self, spiffe_id: str) -> DPoPKey:
        key = self._dpop_keys.get(spiffe_id)
        if key is None:
            key = self._dpop_keys[spiffe_id] = DPoPKey()
        return key

    def held_dpop_keys(self) -> dict[str, DPoPKey]:
        """The DPoP key of each identity that has one (for a handover)."""
        return dict(self._dpop_keys)

    def adopt(self, key: TokenKey, token: Token, dpop_key: DPoPKey | None) -> None:
        """Hold a token (and the DPoP key it is bound to) handed over by the agent this one
        replaces, served by cached_token() at once (agent/handover_tokens.py)."""
        if dpop_key is not None:
            self._dpop_keys[key[0]] = dpop_key
        self.cache.adopt(key, token)
        self._token_keys[(key[0], key[1])] = (key, time.monotonic() + KEY_MEMO_SECONDS)

    # ------------------------------------------------------------ tokens
    def cached_token(self, ident: Identity, server_name: str) -> Token | None:
        """The proxy's per-request fast path: the valid cached token for this identity and
        server, found without awaiting anything, or None (then call token()). The cache key
        token() last resolved for the pair is reused for KEY_MEMO_SECONDS, so a changed
        server configuration or discovery document is picked up within that time."""
        if self._graced:
            self.resume(str(ident.spiffe_id))
        memo = self._token_keys.get((str(ident.spiffe_id), server_name))
        if memo is None or memo[1] < time.monotonic():
            return None
        tok = self.cache.peek(memo[0])
        if tok is not None:
            self.m_hit.inc()
            log.debug(
                "token cache hit",
                spiffe_id=tok.spiffe_id,
                server=server_name,
                token_sha256=tok.fingerprint,
            )
        return tok

    async def token(self, ident: Identity, server_name: str, challenge: str | None = None) -> Token:
        if self._graced:
            self.resume(str(ident.spiffe_id))
        server = self.server(server_name)
        changed = self._changed.get(server_name) if challenge is None else None
        resolved = await self.resolve(server, challenge or changed, ident)
        if changed is not None and self._changed.get(server_name) is changed:
            del self._changed[server_name]  # read: the cached metadata says it now
        key = (str(ident.spiffe_id), server.name, resolved.resource, resolved.scope)
        self._pending[key] = (ident, resolved)
        if challenge is None:
            self._token_keys[(key[0], server.name)] = (key, time.monotonic() + KEY_MEMO_SECONDS)
        before = self.cache.hits
        tok = await self.cache.get(key)
        self.m_lookups.labels("hit" if self.cache.hits > before else "miss").inc()
        log.debug(
            "token cache " + ("hit" if self.cache.hits > before else "miss"),
            spiffe_id=key[0],
            server=server.name,
            token_sha256=tok.fingerprint,
        )
        return tok

    def invalidate(
        self, ident: Identity, server_name: str, token: Token, challenge: str | None = None
    ) -> None:
        """The resource server rejected this token (invalid_token, or its scheme): never
        serve it again. challenge: the 401's WWW-Authenticate when it named a scheme credless
        did not use: the server changed what it accepts, so the next token() for it reads
        that challenge and the server's metadata again instead of the cached metadata (which
        would choose the refused scheme again until oauth.discovery_ttl_seconds)."""
        for key, cached in self.cache.tokens():
            if cached is token or cached.fingerprint == token.fingerprint:
                self.cache.invalidate(key)
        server = self.servers.get(server_name)
        if challenge is not None and server is not None and server.dpop == "auto":
            self._changed[server_name] = challenge  # (a set dpop would choose the same)

    async def _fetch(self, key: TokenKey) -> Token:
        ident, resolved = self._pending[key]
        server = self.servers[key[1]]
        sid = str(ident.spiffe_id)
        started = time.monotonic()
        try:
            client_id = await self.clients.client_id(ident, server, resolved)

            def mint(audience: str, iss: str | None) -> str:
                return self.identity.jwt_svid(ident, [audience], ttl=60, iss=iss).token

            tok = await request_token(
                self._started()[0],
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
                tls=self.as_tls,
            )
        except OAuthError as e:
            self.m_requests.labels(server.name, e.kind).inc()
            if isinstance(e, TrustRefused):
                self.m_refused.labels(server.name, e.kind).inc()
            self._audit_at(
                "token.failed",
                ident,
                server,
                resolved,
                error=e.error,
                kind=e.kind,
                reason=str(e),
                latency_ms=round((time.monotonic() - started) * 1000, 1),
            )
            raise
        self.m_requests.labels(server.name, "ok").inc()
        return tok

    # ------------------------------------------------------------ lifecycle of identities
    async def forget(self, spiffe_id: str, grace: float | None = None) -> dict:
        """The identity's last process exited. Its tokens and DPoP key are kept for `grace`
        seconds (default oauth.token_grace_seconds), never past the tokens' expiry, for the
        next process of the identity to reuse; then, unless a new process came (`resume`),
        they are dropped and its registered clients deleted (`drop`). Without grace, or with
        no valid token to keep, that happens now."""
        self.resume(spiffe_id)  # a later end restarts the grace period
        grace = self.cfg.oauth.token_grace_seconds if grace is None else grace
        now = self.clock()
        mine = [t for k, t in self.cache.tokens() if k[0] == spiffe_id]
        until = grace_deadline(mine, now, grace)
        if until is None:
            return await self.drop(spiffe_id)
        self._graced.start(spiffe_id, until - now, lambda: self.drop(spiffe_id))
        log.info(
            "identity ended; its tokens are kept for the next process",
            spiffe_id=spiffe_id,
            tokens_kept=len(mine),
            kept_seconds=round(until - now, 1),
        )
        return {"tokens_kept": len(mine), "kept_until": until}

    def resume(self, spiffe_id: str) -> bool:
        """A process of the identity is back: cancel its pending drop (whether one was
        pending). On the service's loop."""
        if not self._graced.cancel(spiffe_id):
            return False
        log.info("identity back within its grace period; tokens kept", spiffe_id=spiffe_id)
        return True

    async def resumed(self, spiffe_id: str) -> bool:
        """resume() for another thread (run_coroutine_threadsafe): a task, so it runs after
        a forget() submitted before it, never overtaking it."""
        return self.resume(spiffe_id)

    async def drop(self, spiffe_id: str) -> dict:
        """Drop the identity's tokens and DPoP key now, and delete its registered clients
        where the server supports it."""
        dropped = self.cache.drop(lambda k: k[0] == spiffe_id)
        key = self._dpop_keys.pop(spiffe_id, None)
        if key is not None:
            key.destroy()
        deleted = await self.clients.delete(spiffe_id)
        if self.audit:
            self.audit.emit(
                "identity.ended",
                spiffe_id=spiffe_id,
                tokens_dropped=len(dropped),
                dpop_key_destroyed=key is not None,
                clients_deleted=deleted,
            )
        return {"tokens_dropped": len(dropped), "clients_deleted": deleted}

    async def client_authentication(
        self, ident: Identity, server_name: str
    ) -> tuple[Resolved, dict[str, str]]:
        """The server's resolved authorization server, and the form fields that authenticate
        the identity's client there (a fresh JWT-SVID client assertion): for requests other
        than the token request (agent/oauth/token_ops.py)."""
        from agent.oauth.tokens import JWT_BEARER

        server = self.server(server_name)
        resolved = await self.resolve(server, ident=ident)
        client_id = await self.clients.client_id(ident, server, resolved)
        assertion = self.identity.jwt_svid(ident, [resolved.issuer], ttl=60, iss=client_id).token
        return resolved, {"client_assertion_type": JWT_BEARER, "client_assertion": assertion}

    def http_client(self) -> httpx.AsyncClient:
        """The client every request to an authorization server goes through."""
        return self._started()[0]

    async def introspect(self, ident: Identity, server_name: str, token: Token) -> dict:
        """RFC 7662 introspection of a token (agent/oauth/token_ops.py)."""
        return await token_ops.introspect(self, ident, server_name, token)

    async def revoke(
        self, spiffe_id: str, ident: Identity | None, server_name: str, reason: str
    ) -> list[str]:
        """RFC 7009 revocation of the identity's tokens for a server (agent/oauth/token_ops.py)."""
        return await token_ops.revoke(self, spiffe_id, ident, server_name, reason)

    # ------------------------------------------------------------ operator probe
    async def probe(self, url: str, ident: Identity, name: str | None = None) -> dict:
        """Discovery, registration if needed and one fresh token request; a summary only.
        name: the [[servers]] entry asked for (URLs may be shared), else the first at url."""
        match = [s for s in self.servers.values() if s.name == name] or [
            s for s in self.servers.values() if canonical_resource(s.url) == canonical_resource(url)
        ]
        server = match[0] if match else AdHocServer(name="probe", url=url)
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
