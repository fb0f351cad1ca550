"""The proxy's listeners inside other network namespaces (pods, containers).

The redirect rewrites an intercepted connect() to 127.0.0.1 / ::1, and the kernel resolves
that address in the network namespace of the workload's socket. A process on the node's
network reaches the agent's own listener; a pod with a network namespace of its own has a
loopback of its own, where nothing of the agent's would listen. So the agent keeps a
listener inside each such namespace, as Istio's ztunnel does for in-pod redirection: a
short-lived thread enters the namespace (setns), creates and binds the listening sockets
there, and leaves; a socket stays in the namespace it was created in, and the agent's event
loop serves it like any other. Traffic between workload and proxy never leaves the pod's
loopback; no route from pod to node is needed, and nothing listens on a node address.

Which namespaces: those holding at least one process of a managed cgroup. They are found
when such a process execs (an event from the attestor, handled at once) and by a periodic
scan of /proc, which also closes the listeners of namespaces no managed process is left in
(a listener holds a reference to its namespace: it would keep a deleted pod's network
alive). Until its listener exists, an intercepted connect in a new namespace is refused,
never sent out unredirected.

Why not a listener on a node address: it needs a route from every pod to the node that the
CNI and network policies allow, and it puts the proxy on an address other hosts can reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from agent.attest.cgroupfs import process_cgroup
from agent.attest.table import ProcessEvent
from agent.inject.cgroup_match import CgroupMatcher
from agent.inject.listeners import Listening, ListenSpec, bind_listeners
from agent.observe.logging import get_logger

log = get_logger("inject.netns")

CLONE_NEWNET = 0x40000000
EV_EXEC = 1  # bpf/process_events.h


def netns_inode(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


_libc = ctypes.CDLL(None, use_errno=True)


T = TypeVar("T")
# bound listening sockets, and the servers serving them (agent/inject/listeners.py)
Bound = list[tuple[socket.socket, ListenSpec]]
Serve = Callable[[Bound], Awaitable[list[Listening]]]


def in_netns(ns_path: str, fn: Callable[[], T], inode: int | None = None) -> T:
    """fn() run in a new thread that has entered the network namespace at ns_path (and,
    if inode is given, only if that is the namespace's inode: a pid reused between the
    scan and now names another one); the thread ends with it, so no thread of the agent
    is ever left in a workload's network."""
    values: list[T] = []
    errors: list[BaseException] = []
    fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)

    def run() -> None:
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({ns_path}): {os.strerror(err)}")
            values.append(fn())
        except BaseException as e:  # noqa: BLE001 — handed to the caller
            errors.append(e)

    try:
        if inode is not None and os.fstat(fd).st_ino != inode:
            raise OSError(f"{ns_path} is no longer network namespace {inode}")
        t = threading.Thread(target=run, name="credless-netns")
        t.start()
        t.join()
    finally:
        os.close(fd)
    if errors:
        raise errors[0]
    return values[0]


class NetnsListeners:
    """Keeps serve(sockets) listeners in every network namespace with a managed process."""

    name = "netns-listeners"
    _wake: asyncio.Event  # made by start(), on its loop, before anything waits on or sets it

    def __init__(
        self,
        specs: list[ListenSpec],
        serve: Serve,
        managed_cgroups: list[str],
        own_cgroup: str,
        scan_seconds: float,
        registry: CollectorRegistry | None = None,
    ):
        self.specs = specs
        self._serve = serve  # async (sockets) -> list of asyncio Servers
        # the redirect's own decision (agent/inject/cgroup_match.py): paths and globs, a
        # cgroup below a matching one managed too
        self.matcher = CgroupMatcher(managed_cgroups, own_cgroup)
        self.own_cgroup = own_cgroup
        self.scan_seconds = scan_seconds
        self.own_inode = netns_inode("self")
        self.served: dict[int, list[Listening]] = {}
        self._failed: set[int] = set()  # warned once per namespace
        self._pending: deque[int] = deque()  # pids from exec events, to look at now
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._task: asyncio.Task[None] | None = None
        self.m_served = Gauge(
            "credless_netns_served",
            "Network namespaces other than the agent's where the proxy listens (pods, containers)",
            registry=registry,
        )
        self.m_failures = Counter(
            "credless_netns_listen_failures",
            "Attempts to listen in a workload's network namespace that failed",
            registry=registry,
        )

    # ------------------------------------------------------------ decisions
    def is_managed(self, cgroup: str | None) -> bool:
        return self.matcher.is_managed(cgroup)

    def scan(self) -> dict[int, int]:
        """{netns inode: a managed pid in it} for namespaces other than the agent's."""
        found: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            ino = netns_inode(entry.name)
            if ino is None or ino == self.own_inode or ino in found:
                continue
            if self.is_managed(process_cgroup(int(entry.name))):
                found[ino] = int(entry.name)
        return found

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()  # from now on exec events wake _run
        await self.reconcile()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for ino in list(self.served):
            await self._close(ino)

    def process_event(self, ev: ProcessEvent) -> None:
        """Attestor event hook (ring buffer thread): an exec may be a new pod's first
        process. Only a stat here; the listener is made on the loop."""
        if ev.type != EV_EXEC or self._loop is None:
            return
        ino = netns_inode(ev.tgid)
        if ino is None or ino == self.own_inode or ino in self.served or ino in self._failed:
            return  # failed namespaces are retried by the scan, not at every exec
        self._pending.append(ev.tgid)
        self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_scan = loop.time() + self.scan_seconds
        while True:
            # exec events do not postpone the scan: on a busy node something always execs,
            # and only the scan closes listeners of namespaces left empty
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_scan - loop.time()))
            self._wake.clear()
            pids = set()
            while self._pending:
                pids.add(self._pending.popleft())
            try:
                if pids:
                    await self._add_pids(pids)
                if loop.time() >= next_scan:
                    next_scan = loop.time() + self.scan_seconds
                    await self.reconcile()
            except Exception:
                log.exception("serving network namespaces failed; retrying")

    async def _add_pids(self, pids: set[int]) -> None:
        for pid in pids:
            ino = netns_inode(pid)
            if (
                ino is not None
                and ino != self.own_inode
                and ino not in self.served
                and self.is_managed(process_cgroup(pid))
            ):
                await self._open(ino, pid)

    async def reconcile(self) -> None:
        """Listen in every namespace with a managed process; stop where none is left."""
        found = await asyncio.get_running_loop().run_in_executor(None, self.scan)
        for ino in [i for i in self.served if i not in found]:
            await self._close(ino)
        for ino, pid in found.items():
            if ino not in self.served:
                await self._open(ino, pid)
        self._failed &= set(found)

    async def _open(self, ino: int, pid: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            socks = await loop.run_in_executor(
                None, in_netns, f"/proc/{pid}/ns/net", lambda: bind_listeners(self.specs, True), ino
            )
        except OSError as e:
            self.m_failures.inc()
            if ino not in self._failed:  # once per namespace, not at every scan
                self._failed.add(ino)
                log.warning(
                    "cannot listen in a workload's network namespace: its "
                    "intercepted connects are refused until this succeeds",
                    netns=ino,
                    pid=pid,
                    cgroup=process_cgroup(pid),
                    error=str(e),
                )
            return
        if ino in self.served:  # raced with another path that opened it
            for s, _ in socks:
                s.close()
            return
        self.served[ino] = await self._serve(socks)
        self._failed.discard(ino)
        self.m_served.set(len(self.served))
        log.info(
            "listening in a workload's network namespace",
            netns=ino,
            pid=pid,
            cgroup=process_cgroup(pid),
            listeners=[f"{spec.host}:{spec.port}" for _, spec in socks],
        )

    async def _close(self, ino: int) -> None:
        servers = self.served.pop(ino, [])
        for srv in servers:
            srv.close()
        for srv in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1)
        self.m_served.set(len(self.served))
        log.info("network namespace left: no managed process in it", netns=ino)
