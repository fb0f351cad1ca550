"""Tokens fetched when a workload execs, before its first request needs them.

A process that execs in a managed cgroup and matches a registration entry is, almost always,
on its way to call the servers its policy allows: fetching its token then (discovery, the
MCP server's 401 probe, the token request) moves that cost off the first request, which
otherwise waits for all of it. The attestor calls `attested()` after each enrichment, on its
enrichment thread; the fetch runs on the OAuth service's loop.

Bounded on purpose, since an exec storm of a matching binary must not become a token storm:
- one fetch per (SPIFFE ID, server) at a time, whatever the number of execs (`_inflight`),
  and none while the cache holds a valid token for the pair (`cached_token`);
- at most `concurrency` fetches at once across all identities (a semaphore);
- nothing for a process that matches no entry, is not in a managed cgroup, or whose policy
  refuses it the server (`initialize`, the first call any MCP client makes, is denied).

A failed pre-fetch is only counted and logged: the first request fetches again and answers
the workload with the cause, as without pre-warming.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter

from agent.identity.sources import Identity
from agent.identity.starting import starting_identity
from agent.observe.logging import get_logger

log = get_logger("prewarm")

OUTCOMES = ("fetched", "cached", "coalesced", "denied", "failed")


class _Identities(Protocol):
    def resolve(self, attestation: Any, quiet: bool = False) -> Identity | None: ...

    def note_use(self, ident: Identity, attestation: Any) -> None: ...


class _Tokens(Protocol):
    loop: asyncio.AbstractEventLoop | None

    def cached_token(self, ident: Identity, server_name: str) -> Any: ...

    async def token(
        self, ident: Identity, server_name: str, challenge: str | None = None
    ) -> Any: ...


class Prewarmer:
    """servers: names of the servers to pre-warm (broker mode, prewarm on); allowed(sid,
    server): the policy's verdict for `initialize`; managed(attestation): whether the
    process's connections are intercepted at all."""

    def __init__(
        self,
        identity: _Identities,
        oauth: _Tokens,
        servers: Iterable[str],
        *,
        concurrency: int = 4,
        allowed: Callable[[str, str], bool] | None = None,
        managed: Callable[[Any], bool] | None = None,
        registry: CollectorRegistry | None = None,
    ):
        self.identity, self.oauth = identity, oauth
        self.servers = tuple(servers)
        self.allowed = allowed or (lambda _sid, _server: True)
        self.managed = managed or (lambda _att: True)
        self.concurrency = concurrency
        self._slots: asyncio.Semaphore | None = None  # made on the loop that uses it
        self._inflight: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self.m_prewarm = Counter(
            "credless_prewarm",
            "Token pre-fetches on a workload's exec, by server and outcome (fetched; cached: a "
            "valid token was held; coalesced: a fetch for the pair was under way; denied: the "
            "policy refuses the server; failed)",
            ["server", "outcome"],
            registry=registry,
        )
        for server in self.servers:
            for outcome in OUTCOMES:
                self.m_prewarm.labels(server, outcome)

    def attested(self, image: Any, attestation: Any) -> list[Future[None]]:
        """The attestor's enrichment listener: schedule the fetches this process will need
        (returned, for whoever wants to wait on them); which processes earn them:
        agent/identity/starting.py."""
        loop = self.oauth.loop
        if not self.servers or loop is None or loop.is_closed():
            return []
        ident = starting_identity(image, attestation, self.managed, self.identity)
        if ident is None:
            return []
        # the identity is in use from now on: its tokens go when its last process ends
        self.identity.note_use(ident, attestation)
        sid = str(ident.spiffe_id)
        scheduled: list[Future[None]] = []
        for server in self.servers:
            if not self.allowed(sid, server):
                self.m_prewarm.labels(server, "denied").inc()
                continue
            with self._lock:
                if (sid, server) in self._inflight:
                    self.m_prewarm.labels(server, "coalesced").inc()
                    continue
                self._inflight.add((sid, server))
            scheduled.append(asyncio.run_coroutine_threadsafe(self._fetch(ident, server), loop))
        return scheduled

    async def _fetch(self, ident: Identity, server: str) -> None:
        sid = str(ident.spiffe_id)
        try:
            if self.oauth.cached_token(ident, server) is not None:
                self.m_prewarm.labels(server, "cached").inc()
                return
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.concurrency)
            async with self._slots:
                tok = await self.oauth.token(ident, server)
            self.m_prewarm.labels(server, "fetched").inc()
            log.debug(
                "token pre-fetched on exec",
                spiffe_id=sid,
                server=server,
                token_sha256=getattr(tok, "fingerprint", None),
            )
        except Exception as e:  # noqa: BLE001 — the first request fetches again and says why
            self.m_prewarm.labels(server, "failed").inc()
            log.warning(
                "token pre-fetch on exec failed; the first request fetches again",
                spiffe_id=sid,
                server=server,
                error=str(e),
            )
        finally:
            with self._lock:
                self._inflight.discard((sid, server))
