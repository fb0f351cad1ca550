"""The proxy's listeners in workloads' network namespaces (agent/inject/netns.py), found by
mutation testing: which namespaces a scan of /proc finds (a managed process in them, not the
agent's own), that each gets its listeners and loses them with its last managed process,
that an exec is served at once and a namespace that cannot be entered is warned about once,
retried by the scan only; and in_netns's contract with its caller (fn run in a thread of its
own after setns, its value or its error handed back, the namespace's descriptor closed).

Entering another network namespace needs root and a second namespace: the kernel suite does
that (test_netns.py's kernel test of in_netns; tests/integration/test_pod_netns.py). Here
the host is faked where only the kernel could answer: /proc's processes (their namespace
inode and cgroup) and setns; the listening sockets are real (bound on 127.0.0.1, port 0, in
the test's own network)."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.attest.table import ProcessEvent
from agent.inject import netns
from agent.inject.listeners import ListenSpec
from agent.inject.netns import EV_EXEC, NetnsListeners, in_netns, netns_inode
from tests.unit import test_tokens_mutants

debug_lines = test_tokens_mutants.debug_lines  # the diagnostic stream at debug, parsed

WAIT = 5.0  # bound on any one wait here, far above what each takes
OWN = 1000  # the agent's own network namespace (inode)
SPECS = [ListenSpec(socket.AF_INET, "127.0.0.1", 0, False)]
MANAGED = "/kubepods.slice/pod1/c.scope"
UNMANAGED = "/system.slice/ssh.service"
AGENT = "/system.slice/credless.service"


class OsWith:
    """The os module as netns.py sees it, with some of its functions replaced."""

    def __init__(self, **replaced: Any):
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


# ------------------------------------------------------------------ netns_inode
def test_a_processs_namespace_inode_is_that_of_its_ns_net():
    assert netns_inode("self") == os.stat("/proc/self/ns/net").st_ino
    assert netns_inode(os.getpid()) == netns_inode("self")


@pytest.mark.parametrize(
    "error", [FileNotFoundError, ProcessLookupError, PermissionError], ids=lambda e: e.__name__
)
def test_a_process_gone_or_not_ours_to_see_has_no_namespace(monkeypatch, error):
    def stat(path: str) -> os.stat_result:
        raise error(errno.ENOENT, path)

    monkeypatch.setattr(netns, "os", OsWith(stat=stat))
    assert netns_inode(1) is None


def test_a_pid_that_never_was_has_no_namespace():
    assert netns_inode(1 << 30) is None


# ------------------------------------------------------------------ in_netns
@dataclass
class Setns:
    """libc's setns, as in_netns calls it: which descriptor, namespace type and thread;
    fails with `fail` (an errno) when set."""

    fail: int = 0
    calls: list[tuple[int, int, str, bool]] = field(default_factory=list)
    inode: list[int] = field(default_factory=list)

    def setns(self, fd: int, nstype: int) -> int:
        self.inode.append(os.fstat(fd).st_ino)
        self.calls.append((fd, nstype, threading.current_thread().name, os.get_inheritable(fd)))
        if self.fail:
            ctypes.set_errno(self.fail)
            return -1
        return 0


@pytest.fixture
def setns(monkeypatch: pytest.MonkeyPatch) -> Setns:
    fake = Setns()
    monkeypatch.setattr(netns, "_libc", fake)
    return fake


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_fn_runs_in_a_thread_of_its_own_after_setns_and_its_value_comes_back(setns):
    path = "/proc/self/ns/net"
    before = open_fds()
    ran_in: list[str] = []

    def fn() -> str:
        ran_in.append(threading.current_thread().name)
        return "bound"

    assert in_netns(path, fn, inode=os.stat(path).st_ino) == "bound"
    assert in_netns(path, fn) == "bound"  # no inode: not checked
    [(_, nstype, thread, inheritable), _] = setns.calls
    assert nstype == netns.CLONE_NEWNET == 0x40000000  # setns(2): only a network namespace
    assert thread == ran_in[0] == "credless-netns" != threading.current_thread().name
    assert inheritable is False  # O_CLOEXEC: no child process keeps the namespace open
    assert setns.inode == [os.stat(path).st_ino] * 2  # the namespace at path
    assert open_fds() == before  # its descriptor closed


def test_fns_error_reaches_the_caller(setns):
    before = open_fds()
    with pytest.raises(ZeroDivisionError):
        in_netns("/proc/self/ns/net", lambda: 1 // 0)
    assert open_fds() == before


def test_a_failed_setns_raises_naming_the_path_and_fn_never_runs(setns):
    setns.fail = errno.EPERM
    ran: list[int] = []
    before = open_fds()
    with pytest.raises(OSError) as failed:
        in_netns("/proc/self/ns/net", lambda: ran.append(1))
    assert failed.value.errno == errno.EPERM
    assert failed.value.strerror == f"setns(/proc/self/ns/net): {os.strerror(errno.EPERM)}"
    assert ran == []
    assert open_fds() == before


def test_a_path_naming_another_namespace_now_is_not_entered(setns):
    before = open_fds()
    wrong = os.stat("/proc/self/ns/net").st_ino + 1
    with pytest.raises(OSError, match=f"/proc/self/ns/net is no longer network namespace {wrong}"):
        in_netns("/proc/self/ns/net", lambda: None, inode=wrong)
    assert setns.calls == []
    assert open_fds() == before


# ------------------------------------------------------------------ the host, faked
@dataclass
class Entry:
    name: str


class Host:
    """/proc as the scan reads it: pid -> (its namespace inode, its cgroup); a pid with
    inode None has gone between the listing and the stat."""

    def __init__(self) -> None:
        self.procs: dict[str, tuple[int | None, str | None]] = {"self": (OWN, AGENT)}
        self.listed: list[str] = []  # the names os.scandir("/proc") lists
        self.scans = 0
        self.on_scan: Callable[[int], None] | None = None  # called with each scan's number

    def add(self, pid: int | str, ino: int | None, cgroup: str | None = MANAGED) -> None:
        self.procs[str(pid)] = (ino, cgroup)
        self.listed.append(str(pid))

    def remove(self, pid: int) -> None:
        del self.procs[str(pid)]
        self.listed.remove(str(pid))

    def scandir(self, path: str) -> list[Entry]:
        assert path == "/proc"
        self.scans += 1
        if self.on_scan is not None:
            self.on_scan(self.scans)
        return [Entry(n) for n in self.listed]

    def netns_inode(self, pid: int | str) -> int | None:
        return self.procs.get(str(pid), (None, None))[0]

    def process_cgroup(self, pid: int) -> str | None:
        return self.procs.get(str(pid), (None, None))[1]


class Entered:
    """in_netns as the listeners call it: the namespace's listeners bound in the test's own
    network (the kernel would bind them in the pod's). Each entry is kept; `refuse` holds
    the inodes whose entry fails (OSError), `crash` those where it fails otherwise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None]] = []
        self.refuse: set[int] = set()
        self.crash: set[int] = set()
        self.hold: dict[int, threading.Event] = {}  # entry waits for the event
        self.called = threading.Event()
        self.bound: list[list[tuple[socket.socket, ListenSpec]]] = []

    def __call__(self, path: str, fn: Callable[[], Any], inode: int | None = None) -> Any:
        self.calls.append((path, inode))
        self.called.set()
        assert inode is not None
        if inode in self.hold:
            assert self.hold[inode].wait(WAIT)
        if inode in self.refuse:
            raise OSError(errno.EPERM, f"setns({path}): not permitted")
        if inode in self.crash:
            raise RuntimeError("entering failed otherwise")
        self.bound.append(fn())
        return self.bound[-1]


class Server:
    """A served listener, as NetnsListeners stops it."""

    def __init__(self, sock: socket.socket, hang: bool = False):
        self.sock = sock
        self.closed = False
        self.waited = False
        self.hang = hang

    def close(self) -> None:
        self.closed = True
        self.sock.close()

    async def wait_closed(self) -> None:
        assert self.closed  # every listener is closed before any is waited for
        if self.hang:
            await asyncio.Event().wait()
        self.waited = True


@dataclass
class World:
    host: Host
    entered: Entered
    listeners: NetnsListeners
    registry: CollectorRegistry
    served: list[Server] = field(default_factory=list)  # every listener served, in order
    serving: asyncio.Event | None = None  # set at each serve
    hang: bool = False
    specs_served: list[list[ListenSpec]] = field(default_factory=list)

    async def serve(self, socks: list[tuple[socket.socket, ListenSpec]]) -> list[Any]:
        self.specs_served.append([spec for _, spec in socks])
        for sock, _ in socks:
            assert sock.getsockname()[0] == "127.0.0.1"  # bound by bind_listeners
        out = [Server(sock, self.hang) for sock, _ in socks]
        self.served += out
        if self.serving is not None:
            self.serving.set()
        return out

    def sample(self, name: str) -> float | None:
        return self.registry.get_sample_value(name)

    async def until_served(self, ino: int) -> None:
        async def wait() -> None:
            while ino not in self.listeners.served:
                assert self.serving is not None
                self.serving.clear()
                await self.serving.wait()

        await asyncio.wait_for(wait(), WAIT)


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    host = Host()
    entered = Entered()
    monkeypatch.setattr(netns, "netns_inode", host.netns_inode)
    monkeypatch.setattr(netns, "process_cgroup", host.process_cgroup)
    monkeypatch.setattr(netns, "os", OsWith(scandir=host.scandir))
    monkeypatch.setattr(netns, "in_netns", entered)
    registry = CollectorRegistry()
    w = World(host, entered, None, registry)  # type: ignore[arg-type]
    w.listeners = NetnsListeners(SPECS, w.serve, ["/kubepods.slice"], AGENT, 3600.0, registry)
    return w


def exec_event(tgid: int, type: int = EV_EXEC) -> ProcessEvent:
    return ProcessEvent(type, tgid, tgid, 1, 0, 0, 1, 5, 1, 1, "sh")


# ------------------------------------------------------------------ scan
def test_the_scan_finds_each_namespace_with_a_managed_process_but_the_agents(world):
    h = world.host
    h.add(1, OWN)  # the agent's own network: its own listener serves it
    h.add(2, 20, UNMANAGED)  # an unmanaged process first: a managed one later still counts
    h.add(3, 20)
    h.add(4, 20)  # one pid per namespace: the first managed
    h.add(5, 30, UNMANAGED)  # no managed process in it
    h.add(6, None)  # gone between the listing and the stat
    h.add("sys", 40)  # not a process
    h.add(7, 50, None)  # gone before its cgroup was read
    h.add(8, 60, "/kubepods.slice/pod2")
    assert world.listeners.scan() == {20: 3, 60: 8}


def test_a_namespace_without_an_ipv6_loopback_is_served_on_ipv4(world):
    async def go():
        with socket.create_server(("::1", 0), family=socket.AF_INET6) as taken:
            # ::1 cannot be had there (in a pod: IPv6 disabled; here: the port taken)
            v6 = ListenSpec(socket.AF_INET6, "::1", taken.getsockname()[1], False)
            world.listeners.specs = [*SPECS, v6]
            world.host.add(3, 20)
            await world.listeners.reconcile()
            assert world.specs_served == [SPECS]
            await world.listeners.stop()

    asyncio.run(go())


def test_the_metrics_are_exposed_each_with_its_help(world):
    text = generate_latest(world.registry).decode()
    for name in ["credless_netns_served", "credless_netns_listen_failures_total"]:
        [help_line] = [x for x in text.splitlines() if x.startswith(f"# HELP {name} ")]
        assert "network namespace" in help_line.lower()


def test_the_agents_own_namespace_is_that_of_the_process_it_runs_in(world):
    assert world.listeners.own_inode == OWN


# ------------------------------------------------------------------ reconcile
def test_each_namespace_found_is_served_and_loses_its_listeners_with_its_last_process(
    world, debug_lines
):
    async def go():
        h, nl = world.host, world.listeners
        h.add(3, 20)
        h.add(4, 30)
        await nl.reconcile()
        assert set(nl.served) == {20, 30}
        assert sorted(world.entered.calls) == [("/proc/3/ns/net", 20), ("/proc/4/ns/net", 30)]
        assert world.sample("credless_netns_served") == 2
        first20 = nl.served[20]
        await nl.reconcile()  # nothing changed: nothing entered again
        assert len(world.entered.calls) == 2 and nl.served[20] is first20
        h.remove(3)
        await nl.reconcile()
        assert set(nl.served) == {30}
        assert all(s.closed and s.waited for s in first20)
        assert not any(s.closed for s in nl.served[30])
        assert world.sample("credless_netns_served") == 1
        await nl.stop()
        assert nl.served == {} and all(s.closed for s in world.served)
        assert world.sample("credless_netns_served") == 0

    asyncio.run(go())
    opened = [
        x for x in debug_lines() if x["event"] == "listening in a workload's network namespace"
    ]
    assert {(x["netns"], x["pid"], x["cgroup"]) for x in opened} == {
        (20, 3, MANAGED),
        (30, 4, MANAGED),
    }
    assert all(x["listeners"] == ["127.0.0.1:0"] for x in opened)
    left = [x["netns"] for x in debug_lines() if x["event"].startswith("network namespace left")]
    assert sorted(left) == [20, 30]


def test_a_listener_that_will_not_close_does_not_hold_the_others_up(world):
    async def go():
        world.hang = True
        world.host.add(3, 20)
        await world.listeners.reconcile()
        world.host.remove(3)
        await asyncio.wait_for(world.listeners.reconcile(), WAIT)  # within a second
        assert world.listeners.served == {}

    asyncio.run(go())


def test_a_namespace_that_cannot_be_entered_is_warned_about_once_and_retried_by_the_scan(
    world, debug_lines
):
    def warnings() -> list[dict[str, Any]]:
        return [
            x
            for x in debug_lines()
            if x["event"] == "cannot listen in a workload's network namespace: its intercepted "
            "connects are refused until this succeeds"
        ]

    async def go():
        h, nl = world.host, world.listeners
        h.add(3, 20)
        world.entered.refuse.add(20)
        await nl.reconcile()
        await nl.reconcile()
        assert nl.served == {}
        assert world.sample("credless_netns_listen_failures_total") == 2
        [warned] = warnings()
        assert warned["netns"] == 20 and warned["pid"] == 3 and warned["cgroup"] == MANAGED
        assert "not permitted" in warned["error"]
        # gone and back: warned again
        h.remove(3)
        await nl.reconcile()
        h.add(3, 20)
        await nl.reconcile()
        assert len(warnings()) == 2
        # entered at last: served, and a later failure warned about again
        world.entered.refuse.clear()
        await nl.reconcile()
        assert set(nl.served) == {20}
        assert world.sample("credless_netns_served") == 1
        await nl.stop()
        world.entered.refuse.add(20)
        await nl.reconcile()
        assert len(warnings()) == 3

    asyncio.run(go())


def test_two_paths_opening_one_namespace_at_once_serve_it_once(world):
    async def go():
        h, nl = world.host, world.listeners
        h.add(3, 20)
        gate = threading.Event()
        world.entered.hold[20] = gate
        first = asyncio.create_task(nl.reconcile())
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, world.entered.called.wait, WAIT)  # held there
        del world.entered.hold[20]
        await nl.reconcile()  # the second opens it
        [served] = nl.served[20]
        gate.set()
        await asyncio.wait_for(first, WAIT)
        assert nl.served[20] == [served]  # the first's listeners: closed, not served
        assert len(world.served) == 1
        assert len(world.entered.calls) == 2
        held = world.entered.bound[1]  # bound after the second's
        assert held and all(sock.fileno() == -1 for sock, _ in held)
        assert world.served[0].sock.fileno() != -1

    asyncio.run(go())


# ------------------------------------------------------------------ exec events and the loop
def test_an_exec_in_a_new_namespace_is_served_at_once_without_waiting_for_the_scan(world):
    async def go():
        h, nl = world.host, world.listeners
        world.serving = asyncio.Event()
        await nl.start()  # scans once; the next scan is an hour away
        h.add(3, 20)
        await asyncio.get_running_loop().run_in_executor(None, nl.process_event, exec_event(3))
        await world.until_served(20)
        await nl.stop()

    asyncio.run(go())


@pytest.mark.parametrize(
    "ignored",
    ["not-an-exec", "own-namespace", "already-served", "failed-before", "gone", "unmanaged"],
)
def test_exec_events_that_need_no_listener_enter_no_namespace(world, ignored):
    async def go():
        h, nl = world.host, world.listeners
        world.serving = asyncio.Event()
        if ignored in ("already-served", "failed-before"):
            h.add(9, 90)  # served, or failed, at start
            if ignored == "failed-before":
                world.entered.refuse.add(90)
        await nl.start()
        assert (90 in nl.served) is (ignored == "already-served")
        calls = len(world.entered.calls)
        world.entered.refuse.clear()
        ino = {"own-namespace": OWN, "gone": None, "already-served": 90, "failed-before": 90}
        h.add(8, ino.get(ignored, 80), UNMANAGED if ignored == "unmanaged" else MANAGED)
        nl.process_event(exec_event(8, 2 if ignored == "not-an-exec" else EV_EXEC))
        h.add(3, 20)  # then one that needs a listener: handled with it, if queued
        nl.process_event(exec_event(3))
        await world.until_served(20)
        assert world.entered.calls[calls:] == [("/proc/3/ns/net", 20)]
        await nl.stop()

    asyncio.run(go())


def test_an_exec_before_start_is_left_to_the_first_scan(world):
    async def go():
        world.host.add(3, 20)
        world.listeners.process_event(exec_event(3))  # no loop yet: nothing queued
        world.host.remove(3)
        await world.listeners.start()
        assert world.entered.calls == []
        await world.listeners.stop()

    asyncio.run(go())


def test_the_scan_runs_periodically_and_survives_a_failure(world):
    async def go():
        h, nl = world.host, world.listeners
        nl.scan_seconds = 0.05
        world.serving = asyncio.Event()
        await nl.start()
        # new namespaces, found by the periodic scan; entering the second fails (not an
        # OSError): logged, and the loop goes on to the next scan
        world.entered.crash.add(30)
        h.add(5, 40)
        h.add(4, 30)
        await world.until_served(40)
        world.entered.crash.clear()
        await world.until_served(30)
        await nl.stop()

    asyncio.run(go())


def test_after_each_scan_the_next_is_scan_seconds_away(world):
    async def go():
        h, nl = world.host, world.listeners
        world.serving = asyncio.Event()
        third = threading.Event()

        def on_scan(n: int) -> None:
            if n == 2:  # the first periodic scan: the one after it is the last for an hour
                nl.scan_seconds = 3600.0
            if n == 3:
                third.set()

        h.on_scan = on_scan
        nl.scan_seconds = 0.05
        await nl.start()  # scan 1
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, third.wait, WAIT)
        # exec events are served between scans; none comes in the hour after scan 3
        for pid, ino in [(3, 20), (4, 30)]:
            h.add(pid, ino)
            nl.process_event(exec_event(pid))
            await world.until_served(ino)
        assert h.scans == 3
        await nl.stop()

    asyncio.run(go())


def test_stop_cancels_the_loop(world):
    async def go():
        nl = world.listeners
        await nl.start()
        await nl.stop()
        rest = asyncio.all_tasks() - {asyncio.current_task()}
        assert all(t.done() for t in rest)

    asyncio.run(go())


def test_stop_before_start_closes_nothing_and_raises_nothing(world):
    asyncio.run(world.listeners.stop())
