"""The Grafana dashboard's queries parse and use only metrics the agent exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import yaml

from tests.conftest import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "credless-dashboard.json"


# ------------------------------------------------------------------------- dashboard
_KINDS = (
    r"(Counter|Gauge|Histogram|Summary|Info|Enum|CounterMetricFamily|GaugeMetricFamily|"
    r"HistogramMetricFamily|SummaryMetricFamily|InfoMetricFamily)"
)
_SUFFIXES = {
    "Counter": ("_total", "_created"),
    "CounterMetricFamily": ("_total", "_created"),
    "Gauge": ("",),
    "GaugeMetricFamily": ("",),
    "Enum": ("",),
    "Histogram": ("_bucket", "_sum", "_count", "_created"),
    "HistogramMetricFamily": ("_bucket", "_sum", "_count", "_created"),
    "Summary": ("", "_sum", "_count", "_created"),
    "SummaryMetricFamily": ("", "_sum", "_count"),
    "Info": ("_info",),
    "InfoMetricFamily": ("_info",),
}


def _exported_series() -> set[str]:
    """Series names the agent exports: its registered metrics (found in the source, with
    the suffixes their type gets) and what the registry exports from the start
    (credless_build_info, process_*, python_info)."""
    names: set[str] = set()
    for path in (REPO / "agent").rglob("*.py"):
        for kind, name in re.findall(_KINDS + r'\(\s*"([a-z_:][a-z0-9_:]*)"', path.read_text()):
            base = name.removesuffix("_total") if "Counter" in kind else name
            names |= {base + s for s in _SUFFIXES[kind]}
    from agent.observe.metrics import Metrics

    for family in Metrics().registry.collect():
        names |= {s.name for s in family.samples}
    return names


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p.get("type") != "row"]
    return [t["expr"] for p in panels for t in p["targets"]]


def test_dashboard_uses_only_metrics_the_agent_exports():
    exported = _exported_series()
    used = set()
    for expr in _dashboard_exprs():
        used |= set(re.findall(r"\b((?:credless|process|python)_[a-z0-9_]+)", expr))
    assert used, "no metric found in the dashboard"
    assert used <= exported, f"not exported by the agent: {sorted(used - exported)}"
    # every family operators were promised a panel for has one
    promised = {
        "credless_attest_events_total",
        "credless_bpf_events_lost_total",
        "credless_attest_lookups_total",
        "credless_attest_enrich_seconds_bucket",
        "credless_svids_issued_total",
        "credless_svid_rotations_total",
        "credless_x509_svid_expiry_seconds",
        "credless_token_requests_total",
        "credless_token_cache_lookups_total",
        "credless_token_cache_size",
        "credless_injected_requests_total",
        "credless_proxy_added_seconds_bucket",
        "credless_upstream_seconds_bucket",
        "credless_proxy_active_connections",
        "credless_workload_api_calls_total",
        "credless_identity_decisions_total",
        "credless_build_info",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    }
    assert promised <= used, f"no panel for: {sorted(promised - used)}"


def test_dashboard_queries_are_valid_promql(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: make setup installs Debian's prometheus package"
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:query{i}",
                        "expr": e.replace("$instance", ".*")
                        .replace("$__range", "1h")
                        .replace("$__rate_interval", "5m"),
                    }
                    for i, e in enumerate(_dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
