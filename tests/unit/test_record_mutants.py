"""What the proxy records of each request (agent/inject/record.py), at the edges `make mutate`
found unpinned: the series a scrape shows (the names, labels and buckets the Grafana
dashboard and the docs query), a proxy without an audit stream, and the audit record of a
request: its own fields and its connection's, request.forwarded for a request that carried
no token, the token's fingerprints (jkt included), a record that is one JSON object
whether or not the connection has fields of its own, and a connection's shared fields
serialized once, not per request."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from agent.inject.record import AuditBase, Recorder
from agent.observe.logging import AuditLog
from tests.unit.test_decide import SERVERS
from tests.unit.test_tokens_mutants import token

ROOT = Path(__file__).resolve().parents[2]
UP = SERVERS["broker"]

# the proxy's series, as the dashboard and docs/https.md query them
PROXY_SERIES = (
    "credless_injected_requests_total",
    "credless_proxy_added_seconds_bucket",
    "credless_upstream_seconds_bucket",
    "credless_upstream_connections_total",
    "credless_proxy_active_connections",
)


def queried() -> dict[str, set[str]]:
    """Series name -> the labels the Grafana dashboard or docs/https.md group or select it
    by (`sum by (a, b) (rate(name...`, `name{a="x",b}`), instance and le aside."""
    text = (ROOT / "deploy/grafana/credless-dashboard.json").read_text() + (
        ROOT / "docs/https.md"
    ).read_text()
    found: dict[str, set[str]] = {}
    for by, name, selector in re.findall(
        r"(?:by \(([\w, ]*)\) \(rate\()?(credless_\w+)(?:\{([^}]*)\})?", text
    ):
        labels = found.setdefault(name, set())
        labels.update(x.strip() for x in by.split(",") if x.strip())
        labels.update(re.findall(r"(?:^|,)\s*(\w+)", selector))
    for labels in found.values():
        labels -= {"instance", "le"}
    return found


def scraped(recorder_registry: CollectorRegistry) -> dict[str, list]:
    """Sample name -> its samples, as a Prometheus server parses the exposition."""
    text = generate_latest(recorder_registry).decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def exercised() -> CollectorRegistry:
    registry = CollectorRegistry()
    r = Recorder(None, registry)
    r.count(UP, "injected")
    r.upstream_connected(UP, "tls")
    r.m_added.labels().observe(0.0003)
    r.m_upstream.labels(UP.name).observe(0.02)
    r.m_active.inc()
    return registry


def test_the_proxys_series_are_those_the_dashboard_and_the_docs_query():
    wanted = queried()
    samples = scraped(exercised())
    for name in PROXY_SERIES:
        assert name in wanted, f"{name} is queried nowhere any more: update PROXY_SERIES"
        assert name in samples, f"{name} is not exposed"
        labels = set(samples[name][0].labels) - {"le"}
        assert wanted[name] <= labels, (name, labels)


def test_each_request_is_counted_under_its_server_mode_and_outcome():
    samples = scraped(exercised())
    [counted] = samples["credless_injected_requests_total"]
    assert counted.labels == {"server": UP.name, "mode": UP.mode, "outcome": "injected"}
    [connected] = samples["credless_upstream_connections_total"]
    assert connected.labels == {"server": UP.name, "kind": "tls"}
    assert (counted.value, connected.value) == (1, 1)


def bounds(samples: dict[str, list], name: str) -> list[str]:
    return [s.labels["le"] for s in samples[f"{name}_bucket"] if s.labels["le"] != "+Inf"]


def test_the_upstream_time_has_prometheus_clients_default_buckets():
    samples = scraped(exercised())
    defaults = [floatToGoString(b) for b in Histogram.DEFAULT_BUCKETS if b != float("inf")]
    assert bounds(samples, "credless_upstream_seconds") == defaults


def test_the_time_credless_adds_is_resolved_below_a_millisecond():
    # the dashboard's p50 and p99 of what credless adds (tens to hundreds of microseconds) are
    # interpolated between the bounds: several of them lie below a millisecond, from 100 µs
    samples = scraped(exercised())
    found = [float(b) for b in bounds(samples, "credless_proxy_added_seconds")]
    assert found == sorted(set(found)), found
    assert found[0] <= 0.0001 and found[-1] >= 1.0, found
    assert len([b for b in found if b <= 0.001]) >= 4, found


# -- the audit


def audited(node: str = "node-1") -> tuple[AuditLog, io.StringIO]:
    out = io.StringIO()
    return AuditLog(node, stream=out), out


def records(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_proxy_without_an_audit_stream_records_nothing_and_still_counts():
    r = Recorder(None, CollectorRegistry())
    base = AuditBase({"method": "POST", "path": "/mcp"}, r.fragment(pid=7))
    r.request_done(base, 200, token(), 1.5)
    r.audit_event("request.denied", base, status=403)
    assert r.audit_answered("request.denied", base) is None
    r.count(UP, "injected")
    assert r.m_requests.labels(UP.name, UP.mode, "injected").value == 1


def test_an_event_carries_the_requests_fields_and_its_connections():
    audit, out = audited()
    r = Recorder(audit)
    base = AuditBase({"method": "GET", "path": "/mcp"}, r.fragment(pid=7, spiffe_id="id"))
    event_id = r.audit_answered("request.denied", base, status=403)
    [record] = records(out)
    assert record["event"] == "request.denied" and record["event_id"] == event_id
    assert (record["method"], record["path"], record["status"]) == ("GET", "/mcp", 403)
    assert (record["pid"], record["spiffe_id"]) == (7, "id")


def test_a_request_without_a_token_is_recorded_as_forwarded_and_one_with_as_injected():
    audit, out = audited()
    r = Recorder(audit)
    base = AuditBase({"method": "POST", "path": "/mcp"}, r.fragment(pid=7))
    r.request_done(base, 200, None, 1.5)
    r.request_done(base, 201, token(), 2.5)
    forwarded, injected = records(out)
    assert forwarded["event"] == "request.forwarded" and forwarded["token_sha256"] is None
    assert injected["event"] == "request.injected"
    assert (injected["status"], injected["latency_ms"], injected["pid"]) == (201, 2.5, 7)


def test_an_injected_request_names_its_token_by_fingerprints_never_by_value():
    audit, out = audited()
    r = Recorder(audit)
    sent = token()
    r.request_done(AuditBase({"method": "POST", "path": "/mcp"}, ""), 200, sent, 1.0)
    [record] = records(out)
    assert (record["token_sha256"], record["jti"], record["jkt"]) == (
        sent.fingerprint,
        sent.jti,
        sent.jkt,
    )
    assert sent.access_token not in out.getvalue()


def test_a_record_is_one_json_object_with_or_without_connection_fields():
    audit, out = audited()
    r = Recorder(audit)
    for fragment in ("", r.fragment(pid=7)):
        r.request_done(AuditBase({"method": "POST", "path": "/mcp"}, fragment), 200, None, 1.0)
    bare, with_pid = records(out)  # each line parses
    assert "pid" not in bare and with_pid["pid"] == 7


class CountingAudit(AuditLog):
    def __init__(self) -> None:
        super().__init__("node-1", stream=io.StringIO())
        self.serialized = 0

    def fragment(self, **fields) -> str:
        self.serialized += 1
        return super().fragment(**fields)


def test_what_a_connections_requests_share_is_serialized_once():
    audit = CountingAudit()
    r = Recorder(audit)
    base = AuditBase({"method": "POST", "path": "/mcp"}, "")
    sent = token()
    for _ in range(3):
        r.request_done(base, 200, sent, 1.0)
    assert audit.serialized == 1
    for _ in range(3):
        r.request_done(base, 200, None, 1.0)  # no token: another tail, once too
    assert audit.serialized == 2
