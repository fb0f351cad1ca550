"""What the OAuth service (agent/oauth/service.py) reports: its metrics (names, help,
labels and kinds, registered once per service), and its token cache's events as log lines
and, for a token obtained or refreshed, an audit event naming it by fingerprint.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from agent.oauth.resolution import audit_event
from agent.oauth.tokens import Token
from agent.observe.logging import AuditLog, get_logger
from agent.observe.tally import TallyCounter

log = get_logger("oauth")


class OAuthMetrics:
    """The service's metrics in `registry` (the default registry when None); `cache_size`
    says how many tokens are held, read at each scrape."""

    def __init__(self, registry: CollectorRegistry | None, cache_size: Callable[[], int]):
        self.requests = Counter(
            "credless_token_requests",
            "Token requests by server and outcome",
            ["server", "outcome"],
            registry=registry,
        )
        # counted per proxied request, from the event loop only: a plain-number tally
        self.lookups = TallyCounter(
            "credless_token_cache_lookups", "Token cache lookups", ["result"], registry=registry
        )
        self.hit = self.lookups.labels("hit")  # also counted by the proxy's fast lane
        Gauge("credless_token_cache_size", "Tokens held in memory", registry=registry).set_function(
            cache_size
        )
        self.refused = Counter(
            "credless_oauth_refused",
            "What a server's challenge, "
            "metadata or token response said that the agent refused to "
            "use (issue 15: untrusted authorization server, insecure "
            "endpoint, mismatched metadata, token for another audience "
            "or weaker than required), by server and check",
            ["server", "check"],
            registry=registry,
        )
        self.registrations = Counter(
            "credless_oauth_registrations",
            "Dynamic client registrations and deletions",
            ["server", "action", "outcome"],
            registry=registry,
        )


def cache_event(audit: AuditLog | None, what: str, key: tuple[str, ...], obj: object) -> None:
    """Report what the token cache did (agent/oauth/cache.py on_event) for key, a
    (SPIFFE ID, server name, ...) token key; obj is the token, or the error."""
    log.debug(
        f"token cache {what}",
        spiffe_id=key[0],
        server=key[1],
        token_sha256=getattr(obj, "fingerprint", None),
    )
    if what in ("obtained", "refreshed") and isinstance(obj, Token):
        tok = obj
        audit_event(
            audit,
            f"token.{what}",
            tok.spiffe_id,
            key[1],
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
