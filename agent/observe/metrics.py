"""The Prometheus registry and the HTTP endpoint that serves /metrics, /healthz and /readyz.

One registry per daemon (not prometheus_client's global one) so tests can run several agents
in one process. Components register their series on `Metrics.registry` when they start.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent import __version__
from agent.observe.http import TEXT, HttpEndpoint

ReadyCheck = Callable[[], "tuple[bool, str]"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Info("credless_build", "credless build information", registry=self.registry).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self._ready_checks: dict[str, ReadyCheck] = {}

    def add_ready_check(self, name: str, check: ReadyCheck) -> None:
        """Register a readiness condition; /readyz is 200 only when all of them pass."""
        self._ready_checks[name] = check

    def readiness(self) -> tuple[bool, list[str]]:
        lines, ok = [], True
        for name, check in self._ready_checks.items():
            passed, detail = check()
            ok &= passed
            lines.append(f"{'ok' if passed else 'FAIL'} {name}: {detail}")
        return ok, lines


def metrics_routes(metrics: Metrics) -> dict:
    def scrape():
        return 200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST

    def ready():
        ok, lines = metrics.readiness()
        return (200 if ok else 503), ("\n".join(lines) + "\n").encode(), TEXT

    return {"/metrics": scrape, "/healthz": lambda: (200, b"ok\n", TEXT), "/readyz": ready}


def MetricsServer(metrics: Metrics, host: str, port: int) -> HttpEndpoint:
    return HttpEndpoint(host, port, metrics_routes(metrics), name="metrics-http")
