"""The proxy's timeouts: what a connection may wait for, and for how long.

One sweep a fraction of a second apart looks at every workload connection, instead of a timer
per request: arming and cancelling a timer on each of tens of thousands of requests a second
costs more than the proxying, and these limits are seconds to minutes, not milliseconds.

- between requests, a workload connection idle for inject.client_idle_seconds is closed
  (a keep-alive connection may be closed when idle; HTTP clients reconnect);
- a request whose head or body stops arriving for inject.request_timeout_seconds is answered
  408 and its connection closed: trickling bytes must not hold the proxy's connections (and
  the upstream connection a half-sent body holds);
- a request sent upstream with no response head after inject.upstream_timeout_seconds has
  its upstream connection aborted; the proxy answers 504. Once a response has begun (an SSE
  stream may last hours) nothing here cuts it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from agent.inject.flows import ClientSide

IDLE, SLOW_REQUEST, UPSTREAM = "idle", "slow_request", "upstream"


class Timeouts:
    def __init__(
        self,
        client_idle: float,
        request: float,
        upstream: float,
        clients: Callable[[], Iterable[ClientSide]],
        on_expired: Callable[[ClientSide, str], None],
        clock: Callable[[], float] = time.monotonic,
        perf_clock: Callable[[], float] = time.perf_counter,
    ):
        self.client_idle = client_idle
        self.request = request
        self.upstream = upstream
        self._clients = clients  # the live ones
        self._on_expired = on_expired  # (client, IDLE | SLOW_REQUEST | UPSTREAM)
        # the clocks the flows stamp with (last_rx: monotonic, sent_at: perf_counter),
        # injected so that tests do not depend on how long the machine has been up
        self._clock, self._perf_clock = clock, perf_clock
        # a limit is enforced within a quarter of itself (at most a second) of expiring
        self.interval = min(1.0, max(0.05, min(client_idle, request, upstream) / 4))

    def expired(self, client: ClientSide, now: float, now_perf: float) -> str | None:
        """What, if anything, client has waited for too long (now: time.monotonic(),
        now_perf: time.perf_counter(), the clocks the flows stamp with)."""
        waiting = client.waiting()
        if waiting == "request" and now - client.last_rx > self.client_idle:
            return IDLE
        if waiting == "more" and now - client.last_rx > self.request:
            return SLOW_REQUEST
        up = client.upstream
        since = up.waiting_since() if up is not None else None
        if since is not None and now_perf - since > self.upstream:
            return UPSTREAM
        return None

    def sweep(self) -> int:
        now, now_perf = self._clock(), self._perf_clock()
        n = 0
        for client in list(self._clients()):
            what = self.expired(client, now, now_perf)
            if what is not None:
                self._on_expired(client, what)
                n += 1
        return n

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sweep()
