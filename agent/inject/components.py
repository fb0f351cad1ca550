"""The injection path as the agent starts and stops it: the redirect, then the proxy.

The redirect (bpf/redirect.c through Redirector) starts first so that the proxy's listeners
only ever see connections the kernel recorded; the proxy then listens (in the agent's
network namespace and in workloads': agent/inject/netns.py), tells the redirect the agent
is up, and follows the MCP servers' DNS answers. Stopping runs the other way round.
"""

from __future__ import annotations

import asyncio

from agent.inject.listeners import ProxyListeners
from agent.inject.netns import NetnsListeners
from agent.inject.proxy import Proxy
from agent.inject.redirect import Redirector, Target
from agent.inject.upstreams import Upstream, UpstreamResolver
from agent.observe.logging import get_logger

log = get_logger("daemon")  # with the agent's other lifecycle lines

Upstreams = dict[tuple[str, int], Upstream]


def redirect_targets(upstreams: Upstreams, tls_listen_port: int) -> set[Target]:
    """What the redirect intercepts: every server address, those a workload speaks https to
    to the TLS listener (a workload_url's address, plain http, to the plain one)."""
    return {
        Target(host, port, tls_listen_port if up.workload_tls else 0)
        for (host, port), up in upstreams.items()
    }


class RedirectComponent:
    name = "redirect"

    def __init__(self, redirector: Redirector, upstreams: Upstreams, tls_listen_port: int):
        self.redirector = redirector
        self.upstreams = upstreams  # as resolved at start-up; ProxyComponent follows changes
        self.tls_listen_port = tls_listen_port
        self.handed_over = False  # a new agent took over (agent/handover.py)

    async def start(self) -> None:
        self.redirector.start()
        self.redirector.set_targets(redirect_targets(self.upstreams, self.tls_listen_port))

    async def stop(self) -> None:
        # handed over: the new agent's programs are in the pinned links and maps, which are
        # never detached then (whatever keep_redirect_on_stop says)
        self.redirector.stop(detach=False if self.handed_over else None)


class ProxyComponent:
    name = "proxy"

    def __init__(
        self,
        proxy: Proxy,
        listeners: ProxyListeners,
        pods: NetnsListeners | None,
        redirector: Redirector,
        resolver: UpstreamResolver,
        resolve_interval_seconds: float,
        tls_listen_port: int,
    ):
        self.proxy = proxy
        self.listeners = listeners
        self.pods = pods  # None: inject.pod_netns is off
        self.redirector = redirector
        self.resolver = resolver
        self.resolve_interval_seconds = resolve_interval_seconds  # 0: resolved at start only
        self.tls_listen_port = tls_listen_port
        self._dns: asyncio.Task[None] | None = None
        self.handed_over = False  # a new agent took over (agent/handover.py)

    async def start(self) -> None:
        await self.listeners.start()
        if self.pods is not None:
            await self.pods.start()
        self.redirector.set_agent_up(True)
        if self.resolve_interval_seconds > 0:
            self._dns = asyncio.create_task(self._follow_dns())

    async def stop(self) -> None:
        if self._dns is not None:
            self._dns.cancel()
        if not self.handed_over:  # else the new agent has marked itself up in the redirect
            self.redirector.set_agent_up(False)
        if self.pods is not None:
            await self.pods.stop()
        await self.listeners.stop()
        self.proxy.close()

    async def _follow_dns(self) -> None:
        """Servers' addresses as their names resolve now (UpstreamResolver)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.resolve_interval_seconds)
            try:
                fresh = await loop.run_in_executor(None, self.resolver.refresh)
            except Exception:  # keep following; the addresses known stay intercepted
                log.exception("resolving MCP servers failed")
                continue
            if fresh != self.proxy.upstreams:
                self.redirector.set_targets(redirect_targets(fresh, self.tls_listen_port))
                self.proxy.upstreams = fresh
                log.info(
                    "MCP server addresses changed",
                    addresses=sorted(f"{h}:{p}" for h, p in fresh),
                )
