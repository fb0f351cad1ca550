"""What the OAuth service reports (agent/oauth/reporting.py), found by mutation testing: its
metrics as a scrape reads them (names, labels, kinds, the cache size read at each scrape)
and its token cache's events: the audit event of a token obtained or refreshed (naming it by
fingerprint, never by value), the debug line of every event and the warning of a failed
refresh.

The clock is the module's `time`, replaced; the audit log is a recorder of its events."""

from __future__ import annotations

import types
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent.oauth import reporting
from agent.oauth.reporting import OAuthMetrics, cache_event
from agent.oauth.tokens import Token
from tests.unit import test_tokens_mutants
from tests.unit.test_resolution_mutants import Audit

debug_lines = test_tokens_mutants.debug_lines  # the diagnostic stream at debug, parsed

NOW = 1_000_000.0
SID = "spiffe://example.org/w"
KEY = ("spiffe://example.org/asker", "mcp", "extra")


def token(**kw: Any) -> Token:
    fields = dict(
        access_token="secret-access-token",
        token_type="DPoP",
        issued_at=NOW - 10,
        expires_at=NOW + 299.75,
        scope="a b",
        resource="https://mcp.example/mcp",
        issuer="https://as.example",
        spiffe_id=SID,
        client_id="c",
        jkt="jkt-1",
        fingerprint="f" * 64,
        jti="jti-1",
    )
    return Token(**{**fields, **kw})


@pytest.fixture
def clock(monkeypatch):
    monkeypatch.setattr(reporting, "time", types.SimpleNamespace(time=lambda: NOW))


# --- the metrics --------------------------------------------------------------------------


def families(registry: CollectorRegistry) -> dict[str, Any]:
    return {f.name: f for f in registry.collect()}


def test_the_metrics_are_named_labelled_and_kinded_as_scrapes_read_them():
    registry = CollectorRegistry()
    held = [3]
    m = OAuthMetrics(registry, lambda: held[0])
    m.requests.labels("mcp", "ok").inc()
    m.lookups.labels("miss").inc()
    m.hit.inc()
    m.hit.inc()
    m.refused.labels("mcp", "insecure_endpoint").inc()
    m.registrations.labels("mcp", "register", "ok").inc()
    sample = registry.get_sample_value
    assert sample("credless_token_requests_total", {"server": "mcp", "outcome": "ok"}) == 1
    assert sample("credless_token_cache_lookups_total", {"result": "hit"}) == 2
    assert sample("credless_token_cache_lookups_total", {"result": "miss"}) == 1
    assert sample("credless_token_cache_size") == 3
    held[0] = 7  # read at each scrape
    assert sample("credless_token_cache_size") == 7
    labels = {"server": "mcp", "check": "insecure_endpoint"}
    assert sample("credless_oauth_refused_total", labels) == 1
    labels = {"server": "mcp", "action": "register", "outcome": "ok"}
    assert sample("credless_oauth_registrations_total", labels) == 1
    kinds = {name: f.type for name, f in families(registry).items()}
    assert kinds == {
        "credless_token_requests": "counter",
        "credless_token_cache_lookups": "counter",
        "credless_token_cache_size": "gauge",
        "credless_oauth_refused": "counter",
        "credless_oauth_registrations": "counter",
    }
    # each says what it counts (the help a scrape shows is not empty)
    assert all(f.documentation.strip() for f in families(registry).values())


def test_the_refusal_counters_help_names_what_is_refused():
    f = families(_registry_with_metrics())["credless_oauth_refused"]
    for words in ("untrusted authorization server", "insecure endpoint", "by server and check"):
        assert words in f.documentation


def _registry_with_metrics() -> CollectorRegistry:
    registry = CollectorRegistry()
    OAuthMetrics(registry, lambda: 0)
    return registry


def test_metrics_go_to_the_registry_given_and_twice_is_an_error():
    registry = CollectorRegistry()
    OAuthMetrics(registry, lambda: 0)
    with pytest.raises(ValueError):  # registered once per service
        OAuthMetrics(registry, lambda: 0)
    OAuthMetrics(CollectorRegistry(), lambda: 0)  # another registry: fine


# --- the token cache's events -----------------------------------------------------------------


@pytest.mark.parametrize("what", ["obtained", "refreshed"])
def test_a_token_obtained_or_refreshed_is_audited_by_fingerprint(clock, what):
    audit = Audit()
    tok = token()
    cache_event(audit, what, KEY, tok)
    assert audit.events == [
        (
            f"token.{what}",
            {
                "spiffe_id": SID,
                "server": "mcp",
                "issuer": "https://as.example",
                "resource": "https://mcp.example/mcp",
                "token_type": "DPoP",
                "jti": "jti-1",
                "jkt": "jkt-1",
                "token_sha256": "f" * 64,
                "expires_in": 299,  # whole seconds left, rounded down
                "scope": "a b",
            },
        )
    ]
    assert "secret-access-token" not in repr(audit.events)


def test_other_events_and_objects_that_are_not_tokens_are_not_audited(clock):
    audit = Audit()
    for what in ("hit", "miss", "expired", "invalidated", "refresh_failed", "failed"):
        cache_event(audit, what, KEY, token())
    cache_event(audit, "obtained", KEY, types.SimpleNamespace(fingerprint="f" * 64))
    cache_event(audit, "refreshed", KEY, RuntimeError("down"))
    assert audit.events == []
    cache_event(None, "obtained", KEY, token())  # no audit log: nothing, no error


def test_every_event_is_a_debug_line_naming_the_key_and_the_token_by_fingerprint(
    clock, debug_lines
):
    cache_event(None, "hit", KEY, token())
    cache_event(None, "failed", KEY, RuntimeError("the authorization server is down"))
    lines = [line for line in debug_lines() if line.get("component") == "oauth"]
    assert [(line["event"], line["level"]) for line in lines] == [
        ("token cache hit", "debug"),
        ("token cache failed", "debug"),
    ]
    assert lines[0]["spiffe_id"] == KEY[0] and lines[0]["server"] == "mcp"
    assert lines[0]["token_sha256"] == "f" * 64
    assert lines[1]["token_sha256"] is None
    assert "secret-access-token" not in repr(lines)


def test_a_failed_refresh_is_a_warning_naming_the_key_and_the_error(clock, debug_lines):
    cache_event(None, "refresh_failed", KEY, RuntimeError("the authorization server is down"))
    cache_event(None, "failed", KEY, RuntimeError("not a refresh"))
    warnings = [line for line in debug_lines() if line.get("level") == "warning"]
    assert len(warnings) == 1
    (w,) = warnings
    assert w["server"] == "mcp" and w["spiffe_id"] == KEY[0]
    assert w["error"] == "the authorization server is down"
    assert "serving the cached token until it expires" in w["event"]
