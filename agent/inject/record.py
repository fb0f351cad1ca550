"""What the proxy records of each request: its audit event and its metrics. The proxy
says what happened (count, audit); this module knows the series and the audit record."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from agent.inject.answers import PLAIN, Asked, Asks, new_event_id
from agent.inject.upstreams import Upstream
from agent.oauth.tokens import Token
from agent.observe.logging import AuditLog
from agent.observe.tally import TallyCounter, TallyHistogram


class AuditBase:
    """A request's own audit fields (method, path) and its connection's (server, process,
    identity), the latter serialized once per connection (AuditLog.fragment); and what the
    request asked (answers.Asked, or its head to work that out from), for the shape of an
    answer credless gives it in the server's place, which names its audit event."""

    __slots__ = ("asked", "fields", "fragment")

    def __init__(self, fields: dict[str, Any], fragment: str, asked: Asked | Asks = PLAIN) -> None:
        self.fields, self.fragment, self.asked = fields, fragment, asked


class Recorder:
    def __init__(self, audit: AuditLog | None, registry: CollectorRegistry | None = None):
        self.audit = audit
        # the record of every proxied request: a fixed shape for what changes per request,
        # then what a connection's requests with one token share, rendered once (_tail)
        self._done = (
            {
                e: audit.shape(e, "method", "path", "status", "latency_ms")
                for e in ("request.injected", "request.forwarded")
            }
            if audit
            else {}
        )
        self._tails: dict[tuple[str | None, str], str] = {}
        # per-request series: plain-number tallies (agent/observe/tally.py), not locks
        self.m_requests = TallyCounter(
            "credless_injected_requests",
            "Requests through the proxy",
            ["server", "mode", "outcome"],
            registry=registry,
        )
        self.m_added = TallyHistogram(
            "credless_proxy_added_seconds",
            "Time credless adds before the request goes upstream (attest, token, proof)",
            buckets=(
                0.0001,
                0.00025,
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                1,
            ),
            registry=registry,
        )
        self.m_connections = TallyCounter(
            "credless_upstream_connections",
            "Connections the proxy opened to MCP servers (kind: tls, a TLS handshake, or plain)",
            ["server", "kind"],
            registry=registry,
        )
        self.m_upstream = TallyHistogram(
            "credless_upstream_seconds",
            "From request sent upstream to response head",
            ["server"],
            buckets=(
                0.005,
                0.01,
                0.025,
                0.05,
                0.075,
                0.1,
                0.25,
                0.5,
                0.75,
                1,
                2.5,
                5,
                7.5,
                10,
            ),  # prometheus_client's default buckets
            registry=registry,
        )
        self.m_active = Gauge(
            "credless_proxy_active_connections", "Open client connections", registry=registry
        )

    def fragment(self, **fields: Any) -> str:
        """A connection's audit fields, serialized once (AuditLog.fragment)."""
        return self.audit.fragment(**fields) if self.audit else ""

    def upstream_connected(self, up: Upstream, kind: str) -> None:
        self.m_connections.labels(up.name, kind).inc()

    def count(self, up: Upstream, outcome: str) -> None:
        self.m_requests.labels(up.name, up.mode, outcome).inc()

    def audit_event(self, event: str, base: dict[str, Any] | AuditBase, **fields: Any) -> None:
        if self.audit:
            if isinstance(base, AuditBase):
                self.audit.emit_with(event, base.fragment, **base.fields, **fields)
            else:
                self.audit.emit(event, **base, **fields)

    def audit_answered(
        self, event: str, base: dict[str, Any] | AuditBase, **fields: Any
    ) -> str | None:
        """audit_event() for an event an answer names: its new event_id (None: no audit)."""
        if not self.audit:
            return None
        event_id = new_event_id()
        self.audit_event(event, base, event_id=event_id, **fields)
        return event_id

    def request_done(
        self, base: AuditBase, status: int, token: Token | None, latency_ms: float
    ) -> None:
        """The record of a request answered by the server: request.injected with the
        token's fingerprints, or request.forwarded (no token: passthrough)."""
        if self.audit:
            f = base.fields
            self._done["request.injected" if token is not None else "request.forwarded"].emit(
                self._tail(self.audit, token, base.fragment),
                f["method"],
                f["path"],
                status,
                latency_ms,
            )

    def _tail(self, audit: AuditLog, token: Token | None, fragment: str) -> str:
        key = (token.fingerprint if token is not None else None, fragment)
        tail = self._tails.get(key)
        if tail is None:
            if len(self._tails) >= 4096:  # tokens and connections come and go
                self._tails.clear()
            tail = audit.fragment(
                token_sha256=token.fingerprint if token else None,
                jti=token.jti if token else None,
                jkt=token.jkt if token else None,
            )
            tail = self._tails[key] = f"{tail}, {fragment}" if fragment else tail
        return tail
