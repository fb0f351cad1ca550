"""The authorization servers credless uses, read at start so the Workload API knows them.

The Workload API refuses a JWT-SVID whose audience names an authorization server credless
obtains tokens from (agent/identity/workload_api.py, `names_an_as`): at that AS such a
JWT-SVID is a client assertion, and a workload holding one could get tokens past the proxy.
It can refuse only what it knows. An issuer's origin is known from the configuration, but
an AS may put its token endpoint (or PAR, device authorization, CIBA, an mTLS alias) on
another origin (accounts.google.com and oauth2.googleapis.com); those are known only once its
metadata has been read (Discovery.endpoints).

So at start this reads the metadata of every issuer configured or pinned for a server,
retrying with a growing wait until each read succeeds. Until then the server is *unread*,
and the Workload API refuses every audience that is a URL with UNAVAILABLE (it fails
closed: a URL on an unknown origin might be that AS's token endpoint); other audiences are
served. A server with neither issuer nor a pin has no AS to read yet: its first discovery
(trust on first use) reads and pins one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import CollectorRegistry, Gauge

from agent.observe.logging import get_logger

log = get_logger("oauth")

# the first wait after a failed read, and the longest one (it doubles in between)
FIRST_RETRY_SECONDS = 1.0
LONGEST_RETRY_SECONDS = 60.0


class AuthorizationServerReader:
    """Reads each server's authorization servers' metadata at start (a component)."""

    name = "oauth_reader"

    def __init__(
        self,
        servers: Iterable[str],
        issuers: Callable[[str], tuple[str, ...]],
        read: Callable[[str], Awaitable[object]],
        registry: CollectorRegistry | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        """servers: the configured servers' names; issuers(server): the issuers configured or
        pinned for it; read(issuer): read that AS's metadata (Discovery.server, which adds its
        endpoints to those the Workload API refuses)."""
        self._issuers = issuers
        self._read = read
        self._sleep = sleep
        # replaced whole, never changed in place: the Workload API's thread reads it
        self._unread: frozenset[str] = frozenset(servers)
        self._tasks: list[asyncio.Task[None]] = []
        Gauge(
            "credless_oauth_unread_servers",
            "Servers whose authorization servers' metadata the agent has not read yet: while "
            "not 0, the Workload API refuses JWT-SVIDs for URL audiences (UNAVAILABLE)",
            registry=registry,
        ).set_function(lambda: len(self._unread))

    def unread(self) -> tuple[str, ...]:
        """The servers whose ASes' metadata is not read yet. Callable from any thread."""
        return tuple(sorted(self._unread))

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read_until_done(s), name=f"oauth-read-{s}")
            for s in sorted(self._unread)
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _read_until_done(self, server: str) -> None:
        wait = FIRST_RETRY_SECONDS
        while True:
            issuers = self._issuers(server)
            try:
                for issuer in issuers:
                    await self._read(issuer)
            except Exception as e:  # noqa: BLE001 - any failure is retried; the reason logged
                log.warning(
                    "authorization server metadata not read: until it is, the Workload API "
                    "refuses JWT-SVIDs for URL audiences (UNAVAILABLE)",
                    server=server,
                    issuers=list(issuers),
                    error=str(e),
                    retry_in_seconds=wait,
                )
                await self._sleep(wait)
                wait = min(wait * 2, LONGEST_RETRY_SECONDS)
                continue
            self._unread = self._unread - {server}
            log.info("authorization server metadata read", server=server, issuers=list(issuers))
            return
