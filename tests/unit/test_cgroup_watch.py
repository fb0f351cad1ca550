"""The cgroup watcher's user-space half (agent/inject/cgroup_watch.py): which programs of the
redirect's object it attaches and pins, what it decides about each cgroup (at start, on each
mkdir and rmdir event, after a failed handover), what it audits, and what it leaves behind.

The kernel half runs in tests/integration/test_managed_cgroups.py. Here BCC's object is
stood in for at the narrowest seam: its tables (tests/unit/bcc_tables.py), its ring buffer
(the test calls the callback BCC would, with the event bytes bpf/cgroup_watch.h lays out),
its ring's consumer (cgroup_watch.RingConsumer: Consumer), and the perf-event link and pin
calls, which record what they were asked; the link fds are
pipes, so a closed link is seen as its reader's end of file. The cgroup tree is a directory
tree: a cgroup's id is its directory's inode number, as in cgroupfs."""

from __future__ import annotations

import ctypes as ct
import errno
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import structlog.testing
from bcc import BPF as BCC
from prometheus_client import CollectorRegistry

from agent import bpfsys
from agent.inject import cgroup_watch
from agent.inject.cgroup_match import CgroupMatcher
from agent.inject.cgroup_watch import MANAGED, MKDIR, PENDING, RMDIR, CgroupWatch, RingConsumer
from tests.helpers import wait_for
from tests.unit.bcc_tables import Table


class Event(ct.Structure):  # struct cgroup_event, bpf/cgroup_watch.h
    _fields_ = [
        ("type", ct.c_uint32),
        ("level", ct.c_uint32),
        ("id", ct.c_uint64),
        ("state", ct.c_uint32),
        ("marked", ct.c_uint32),
        ("path", ct.c_char * cgroup_watch.PATH_LEN),
    ]


class Ring:
    def __init__(self) -> None:
        self._event_class = Event
        self.callback: Any = None

    def open_ring_buffer(self, callback: Any) -> None:
        self.callback = callback


class PerCpu:
    """BCC's per-CPU array: an item is the list of every CPU's value."""

    def __init__(self) -> None:
        self.values = {0: [0, 0], 1: [0, 0]}

    def __getitem__(self, key: ct.c_int) -> list[int]:
        return self.values[key.value]


class Program:
    """The redirect's bcc.BPF as the watch uses it (its owner, not the watch, cleans it)."""

    FDS: ClassVar[dict[bytes, int]] = {b"credless_cgroup_mkdir": 51, b"credless_cgroup_rmdir": 52}

    def __init__(self) -> None:
        self.ring = Ring()
        self.tables: dict[bytes, Any] = {
            b"cgroup_events": self.ring,
            b"managed_cgroups": Table(ct.c_uint64, ct.c_uint32, 103),
            b"cgroup_watch_counts": PerCpu(),
        }
        self.loaded: list[tuple[bytes, int]] = []
        self.polled = threading.Event()
        self.polls = 0
        self.timeouts: list[int] = []  # each poll's, in ms
        self._polls = threading.Condition()

    def __getitem__(self, name: bytes) -> Any:
        assert isinstance(name, bytes)
        return self.tables[name]

    def load_func(self, name: bytes, ptype: int) -> Any:
        self.loaded.append((name, ptype))
        return SimpleNamespace(fd=self.FDS[name])

    def ring_buffer_poll(self, timeout_ms: int) -> None:
        with self._polls:
            self.polls += 1
            self.timeouts.append(timeout_ms)
            self._polls.notify_all()
        self.polled.set()
        threading.Event().wait(timeout_ms / 1000)  # as the kernel's epoll_wait would

    def wait_polls(self, more: int) -> None:
        """Until the poll loop has gone round `more` more times (each round ends with its
        check of the loss counters before the next poll)."""
        with self._polls:
            until = self.polls + more
            assert self._polls.wait_for(lambda: self.polls >= until, 10)

    def cleanup(self) -> None:
        raise AssertionError("the watch cleaned up its owner's object")


class Consumer:
    """cgroup_watch.RingConsumer over the fake Program: its callback is the one BCC's ring
    would call (Ring.callback), its polls are the Program's."""

    def __init__(self, program: Program, name: bytes, callback: Any):
        self.program = program
        program[name].open_ring_buffer(callback)
        self.closed = False

    def poll(self, timeout_ms: int) -> None:
        self.program.ring_buffer_poll(timeout_ms)

    def close(self) -> None:
        self.closed = True


class Audit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


class Host:
    """The cgroup tree, the pins and the link calls."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch):
        self.root = tmp / "cgroup"
        self.root.mkdir()
        self.pins = tmp / "pins"
        self.pins.mkdir()
        self.links: list[tuple[int, int, str]] = []  # (our fd, prog fd, event)
        self.readers: list[int] = []
        monkeypatch.setattr(cgroup_watch, "tracepoint_link", self.tracepoint_link)
        monkeypatch.setattr(cgroup_watch, "RingConsumer", Consumer)
        monkeypatch.setattr(bpfsys, "obj_pin", self.obj_pin)

    def tracepoint_link(self, prog_fd: int, event: str) -> int:
        r, w = os.pipe()
        self.readers.append(r)
        self.links.append((w, prog_fd, event))
        return w

    def obj_pin(self, fd: int, path: str) -> None:
        if os.path.exists(path):
            raise FileExistsError(path)  # bpf(BPF_OBJ_PIN) on a taken name: EEXIST
        Path(path).write_text(str(fd))

    def pinned(self) -> dict[str, int]:
        return {p.name: int(p.read_text() or -1) for p in self.pins.iterdir()}

    def mkdir(self, path: str) -> int:
        d = self.root / path.lstrip("/")
        d.mkdir(parents=True)
        return d.stat().st_ino

    def closed(self, fd: int) -> bool:
        """Whether our end of link fd is closed (its reader sees end of file)."""
        reader = self.readers[[w for w, _, _ in self.links].index(fd)]
        os.set_blocking(reader, False)
        try:
            return os.read(reader, 1) == b""
        except BlockingIOError:
            return False


@pytest.fixture
def host(tmp_path, monkeypatch):
    h = Host(tmp_path, monkeypatch)
    yield h
    for fd in h.readers + [w for w, _, _ in h.links]:
        try:
            os.close(fd)
        except OSError:
            pass


def watch(host: Host, *patterns: str, registry: CollectorRegistry | None = None):
    audit = Audit()
    w = CgroupWatch(host.pins, str(host.root), CgroupMatcher(list(patterns)), audit, registry)
    return w, audit


def entries(program: Program) -> dict[int, int]:
    return {k.value: v.value for k, v in program[b"managed_cgroups"].items()}


def event(program: Program, type: int, cg_id: int, path: str | bytes, state: int = 0) -> None:
    """The ring buffer's callback on one event, as BCC calls it; path: as the kernel wrote
    it (bytes: possibly truncated, or not UTF-8)."""
    raw = path.encode() if isinstance(path, str) else path
    e = Event(type=type, level=raw.count(b"/"), id=cg_id, state=state, marked=1)
    e.path = raw
    buf = ct.create_string_buffer(bytes(e), ct.sizeof(Event))
    assert program.ring.callback(None, ct.addressof(buf), ct.sizeof(Event)) == 0


TRACEFS = Path(__file__).parent.parent / "testdata" / "tracefs" / "cgroup"  # 6.18's


def test_flags_name_the_depths_the_patterns_have_and_the_tracepoints_offsets(host, monkeypatch):
    monkeypatch.setattr(cgroup_watch, "_TRACEFS", TRACEFS)
    w, _ = watch(host, "/a/b-*", "/c")
    assert w.cflags() == [
        f"-DWATCH_LEVELS={(1 << 2) | (1 << 1)}ULL",
        "-DTP_ROOT_OFF=8",
        "-DTP_LEVEL_OFF=12",
        "-DTP_ID_OFF=16",
        "-DTP_PATH_OFF=24",
    ]


def test_a_tracepoint_without_a_field_the_program_reads_is_refused(tmp_path, monkeypatch):
    fmt = (TRACEFS / "cgroup_mkdir" / "format").read_text()
    (tmp_path / "cgroup_mkdir").mkdir()
    (tmp_path / "cgroup_mkdir" / "format").write_text(fmt.replace(" level;", " depth;"))
    monkeypatch.setattr(cgroup_watch, "_TRACEFS", tmp_path)
    with pytest.raises(RuntimeError, match="tracepoint cgroup:cgroup_mkdir has no field level"):
        cgroup_watch.tracepoint_offsets()


def test_start_attaches_both_programs_pins_their_links_and_manages_what_matches(host):
    registry = CollectorRegistry()
    a = host.mkdir("/svc/agent-1")
    host.mkdir("/svc/other")
    program = Program()
    (host.pins / "link_cgroup_mkdir").write_text("999")  # an earlier agent's
    w, audit = watch(host, "/svc/agent-*", registry=registry)
    w.start(program)
    try:
        assert program.loaded == [
            (b"credless_cgroup_mkdir", BCC.TRACEPOINT),
            (b"credless_cgroup_rmdir", BCC.TRACEPOINT),
        ]
        assert [(p, e) for _, p, e in host.links] == [(51, "cgroup_mkdir"), (52, "cgroup_rmdir")]
        mine = [fd for fd, _, _ in host.links]
        assert host.pinned() == {"link_cgroup_mkdir": mine[0], "link_cgroup_rmdir": mine[1]}
        assert entries(program) == {a: MANAGED}
        assert w.managed_paths() == ["/svc/agent-1"]
        assert audit.events == [
            (
                "cgroup.managed",
                {
                    "cgroup": "/svc/agent-1",
                    "cgroup_id": a,
                    "patterns": ["/svc/agent-*"],
                    "reason": "present",
                },
            )
        ]
        assert registry.get_sample_value("credless_managed_cgroups") == 1
        assert (
            registry.get_sample_value(
                "credless_managed_cgroup_changes_total", {"change": "managed"}
            )
            == 1
        )
        assert program.polled.wait(10)  # the ring buffer is read
    finally:
        w.stop(detach=False)


def test_stop_closes_the_links_and_unpins_them_only_when_detaching(host):
    program = Program()
    w, _ = watch(host, "/svc/*")
    w.start(program)
    mine = [fd for fd, _, _ in host.links]
    w.stop(detach=False)
    assert all(host.closed(fd) for fd in mine)
    assert set(host.pinned()) == {"link_cgroup_mkdir", "link_cgroup_rmdir"}  # kept watching
    assert w.lost() == 0  # nothing to read once stopped

    w2, _ = watch(host, "/svc/*")
    w2.start(Program())
    w2.stop(detach=True)
    assert host.pinned() == {}


def test_a_new_cgroup_matching_a_pattern_becomes_managed_and_one_that_does_not_is_forgotten(
    host,
):
    program = Program()
    w, audit = watch(host, "/svc/agent-*")
    w.start(program)
    try:
        managed = program[b"managed_cgroups"]
        managed[ct.c_uint64(7)] = ct.c_uint32(PENDING)  # as bpf/cgroup_watch.c wrote them
        managed[ct.c_uint64(8)] = ct.c_uint32(PENDING)
        event(program, MKDIR, 7, "/svc/agent-2")
        event(program, MKDIR, 8, "/svc/db")
        assert entries(program) == {7: MANAGED}
        assert w.managed_paths() == ["/svc/agent-2"]
        assert audit.events == [
            (
                "cgroup.managed",
                {
                    "cgroup": "/svc/agent-2",
                    "cgroup_id": 7,
                    "patterns": ["/svc/agent-*"],
                    "reason": "appeared",
                },
            )
        ]
    finally:
        w.stop(detach=False)


def test_a_removed_managed_cgroup_is_forgotten_and_audited(host):
    program = Program()
    w, audit = watch(host, "/svc/agent-*")
    w.start(program)
    try:
        event(program, MKDIR, 7, "/svc/agent-2")
        audit.events.clear()
        event(program, RMDIR, 7, "/svc/agent-2", state=MANAGED)
        event(program, RMDIR, 9, "/svc/db", state=PENDING)  # never managed: not audited
        assert entries(program) == {} and w.managed_paths() == []
        assert audit.events == [
            (
                "cgroup.unmanaged",
                {
                    "cgroup": "/svc/agent-2",
                    "cgroup_id": 7,
                    "patterns": ["/svc/agent-*"],
                    "reason": "removed",
                },
            )
        ]
    finally:
        w.stop(detach=False)


def test_reconcile_keeps_a_pending_entry_whose_cgroup_is_not_visible_yet(host):
    """bpf/cgroup_watch.c writes PENDING before the directory is visible: the mkdir event
    decides it, not a reconcile that cannot see it yet. A PENDING entry for a visible cgroup
    no pattern names goes; a MANAGED one left by another configuration goes, audited."""
    db = host.mkdir("/svc/db")
    gone = 12345
    program = Program()
    managed = program[b"managed_cgroups"]
    managed[ct.c_uint64(gone)] = ct.c_uint32(PENDING)
    managed[ct.c_uint64(db)] = ct.c_uint32(PENDING)
    managed[ct.c_uint64(777)] = ct.c_uint32(MANAGED)  # another configuration's
    w, audit = watch(host, "/svc/agent-*")
    w.start(program)
    try:
        assert entries(program) == {gone: PENDING}
        assert audit.events == [
            (
                "cgroup.unmanaged",
                {
                    "cgroup": None,
                    "cgroup_id": 777,
                    "patterns": [],
                    "reason": "no pattern matches it",
                },
            )
        ]
    finally:
        w.stop(detach=False)


def test_reclaim_pins_this_agents_links_again_and_decides_the_tree_again(host):
    """A new agent that failed to take over left its own links in the pins (its programs,
    its ring buffer that nobody reads now) and maybe entries of its own patterns: this
    agent's links go back into the pins, and the map agrees with this agent's patterns."""
    a = host.mkdir("/svc/agent-1")
    b = host.mkdir("/svc/batch")
    program = Program()
    w, audit = watch(host, "/svc/agent-*")
    w.start(program)
    mine = [fd for fd, _, _ in host.links]
    try:
        for name in cgroup_watch.LINKS.values():  # the failed agent's
            (host.pins / name).unlink()
            (host.pins / name).write_text("999")
        program[b"managed_cgroups"][ct.c_uint64(b)] = ct.c_uint32(MANAGED)
        audit.events.clear()
        w.reclaim()
        assert host.pinned() == {"link_cgroup_mkdir": mine[0], "link_cgroup_rmdir": mine[1]}
        assert len(host.links) == 2  # no new links: this agent's own are put back
        assert entries(program) == {a: MANAGED}
        assert [e for e, _ in audit.events] == ["cgroup.unmanaged"]
    finally:
        w.stop(detach=False)


def test_a_watch_never_started_reclaims_nothing(host):
    w, _ = watch(host, "/svc/*")
    w.reclaim()
    assert host.pinned() == {} and host.links == []


def test_lost_events_and_a_full_map_are_counted_from_every_cpu(host):
    registry = CollectorRegistry()
    program = Program()
    w, _ = watch(host, "/svc/*", registry=registry)
    w.start(program)
    try:
        counts = program[b"cgroup_watch_counts"].values
        counts[0], counts[1] = [2, 3], [0, 4]
        assert w.lost() == 5 and w.lost(index=1) == 4
        assert registry.get_sample_value("credless_cgroup_watch_events_lost_total") == 5
        assert registry.get_sample_value("credless_cgroup_watch_map_full_total") == 4
    finally:
        w.stop(detach=False)


def test_at_start_a_pending_entry_of_a_matching_cgroup_is_managed_and_a_stale_one_named(
    host,
):
    """A cgroup made while no agent ran (its mkdir event went to no one): PENDING in the
    map and visible now; a pattern names it, so it is managed ("present"). The stale
    MANAGED entry of a cgroup no pattern names now is audited with its path."""
    late = host.mkdir("/svc/agent-9")
    db = host.mkdir("/svc/db")
    program = Program()
    managed = program[b"managed_cgroups"]
    managed[ct.c_uint64(late)] = ct.c_uint32(PENDING)
    managed[ct.c_uint64(db)] = ct.c_uint32(MANAGED)
    w, audit = watch(host, "/svc/agent-*")
    w.start(program)
    try:
        assert entries(program) == {late: MANAGED}
        assert w.managed_paths() == ["/svc/agent-9"]
        assert sorted(audit.events, key=lambda e: e[0]) == [
            (
                "cgroup.managed",
                {
                    "cgroup": "/svc/agent-9",
                    "cgroup_id": late,
                    "patterns": ["/svc/agent-*"],
                    "reason": "present",
                },
            ),
            (
                "cgroup.unmanaged",
                {
                    "cgroup": "/svc/db",
                    "cgroup_id": db,
                    "patterns": [],
                    "reason": "no pattern matches it",
                },
            ),
        ]
    finally:
        w.stop(detach=False)


def test_a_cgroup_made_while_the_tree_is_read_is_managed_as_appeared(host):
    """Its PENDING entry was in the map, but its directory became visible only after the
    matching cgroups were read, before the ids at their depths were: its path matches, so
    it is managed, not deleted."""
    program = Program()
    w, audit = watch(host, "/svc/agent-*")
    w.start(program)
    late = host.mkdir("/svc/agent-7")
    program[b"managed_cgroups"][ct.c_uint64(late)] = ct.c_uint32(PENDING)
    real_existing = w.matcher.existing

    def not_visible_yet(root: str) -> dict[str, int]:
        return {p: i for p, i in real_existing(root).items() if i != late}

    try:
        w.matcher.existing = not_visible_yet  # type: ignore[method-assign]
        audit.events.clear()
        w.reconcile()
        assert entries(program) == {late: MANAGED}
        assert w.managed_paths() == ["/svc/agent-7"]
        assert audit.events == [
            (
                "cgroup.managed",
                {
                    "cgroup": "/svc/agent-7",
                    "cgroup_id": late,
                    "patterns": ["/svc/agent-*"],
                    "reason": "appeared",
                },
            )
        ]
    finally:
        w.stop(detach=False)


def test_a_removed_cgroup_the_kernel_held_managed_is_audited_though_not_seen_made(host):
    """An entry MANAGED by an earlier agent, never in this one's paths: its rmdir (the
    state the kernel removed) is audited too."""
    program = Program()
    w, audit = watch(host, "/svc/agent-*")
    w.start(program)
    try:
        event(program, RMDIR, 31, "/svc/agent-3", state=MANAGED)
        assert [(e, f["cgroup_id"], f["reason"]) for e, f in audit.events] == [
            ("cgroup.unmanaged", 31, "removed")
        ]
    finally:
        w.stop(detach=False)


def test_a_truncated_path_is_found_by_the_cgroups_id(host):
    """bpf/cgroup_watch.c copies at most PATH_LEN - 1 bytes of the path: a longer one is
    looked up by id at its level, and decided by its whole path."""
    long = "/".join(["", "svc", "a" * 250, "b" * 250, "agent-1"])
    cg_id = host.mkdir(long)
    program = Program()
    w, audit = watch(host, "/svc/*/*/agent-*")
    w.start(program)
    try:
        audit.events.clear()
        program[b"managed_cgroups"][ct.c_uint64(cg_id)] = ct.c_uint32(PENDING)
        event(program, MKDIR, cg_id, long.encode()[: cgroup_watch.PATH_LEN - 1])
        assert entries(program) == {cg_id: MANAGED}
        assert w.managed_paths() == [long]
        assert len(long) > cgroup_watch.PATH_LEN - 1  # longer than the kernel copies
    finally:
        w.stop(detach=False)


def test_a_path_one_byte_short_of_the_limit_is_taken_as_it_is(host, monkeypatch):
    program = Program()
    w, _ = watch(host, "/svc/*")
    w.start(program)
    looked: list[Any] = []
    monkeypatch.setattr(cgroup_watch, "cgroups_at", lambda *a: looked.append(a) or iter(()))
    try:
        path = "/svc/" + "c" * (cgroup_watch.PATH_LEN - 2 - len("/svc/"))
        event(program, MKDIR, 44, path)
        assert looked == [] and w.managed_paths() == [path]
    finally:
        w.stop(detach=False)


def test_an_event_the_handler_fails_on_is_logged_and_the_stream_goes_on(host, monkeypatch):
    program = Program()
    w, _ = watch(host, "/svc/*")
    w.start(program)
    try:

        def broken(*_a: Any) -> None:
            raise ValueError("boom")

        monkeypatch.setattr(w, "_appeared", broken)
        with structlog.testing.capture_logs() as logs:
            event(program, MKDIR, 7, "/svc/x")  # returns 0: asserted in event()
        (said,) = logs
        assert said["event"] == "cgroup event handler failed" and said["log_level"] == "error"
    finally:
        w.stop(detach=False)


def test_lost_events_make_the_watch_read_the_tree_again_and_say_so(host):
    program = Program()
    w, _ = watch(host, "/svc/agent-*")
    with structlog.testing.capture_logs() as logs:
        w.start(program)
        try:
            program.wait_polls(2)  # a whole round with nothing lost: nothing said
            a = host.mkdir("/svc/agent-5")  # its mkdir event was lost
            program[b"cgroup_watch_counts"].values[0] = [1, 2]
            wait_for(lambda: entries(program) == {a: MANAGED}, 10, what="the tree read again")
            program.wait_polls(2)  # and rounds after it, the count unchanged
        finally:
            w.stop(detach=False)
    lost = [e for e in logs if e["event"].startswith("cgroup events lost")]
    assert len(lost) == 1  # said once per change of the count, not at every poll
    assert lost[0]["lost"] == 3 and lost[0]["log_level"] == "warning"
    (started,) = [e for e in logs if e["event"] == "watching cgroups for inject.managed_cgroups"]
    assert started["patterns"] == ["/svc/agent-*"] and started["managed"] == []
    assert started["matching_nothing_yet"] == ["/svc/agent-*"]
    (made,) = [e for e in logs if e["event"] == "cgroup managed"]
    assert made["cgroup"] == "/svc/agent-5" and made["reason"] == "present"
    assert made["cgroup_id"] == a and made["patterns"] == ["/svc/agent-*"]


def test_stop_joins_the_poll_thread_and_tolerates_pins_already_gone(host, monkeypatch):
    program = Program()
    w, _ = watch(host, "/svc/*")
    w.start(program)
    thread = w._thread
    assert thread is not None and thread.is_alive()
    # named in a thread dump; a daemon: a poll stuck in the kernel does not hold the exit
    assert thread.name == "bpf-cgroup-watch" and thread.daemon is True
    program.wait_polls(2)
    consumer = w._ring
    joined: list[float | None] = []
    join = thread.join
    monkeypatch.setattr(
        thread, "join", lambda timeout=None: joined.append(timeout) or join(timeout)
    )
    for name in cgroup_watch.LINKS.values():  # `credless detach` ran first, say
        (host.pins / name).unlink()
    w.stop(detach=True)
    assert not thread.is_alive()
    assert joined == [5]  # nor does it hold the agent's stop for longer than 5 s
    assert set(program.timeouts) == {100}  # the stop flag is looked at every 100 ms
    assert consumer.closed  # its ring freed, once nothing polls it
    w.stop(detach=True)  # twice: nothing left to do, no error


def test_a_start_that_failed_after_opening_the_ring_frees_it_on_stop(host, monkeypatch):
    """No poll thread was started: nothing reads the ring, and the stop that follows the
    failure (the redirect's) frees it."""
    program = Program()
    w, _ = watch(host, "/svc/*")

    def refused(prog_fd: int, event: str) -> int:
        raise OSError(errno.EPERM, "perf_event_open")

    monkeypatch.setattr(cgroup_watch, "tracepoint_link", refused)
    with pytest.raises(OSError):
        w.start(program)
    consumer = w._ring
    assert consumer is not None and w._thread is None
    w.stop(detach=True)
    assert consumer.closed


def test_a_ring_still_polled_after_the_join_is_not_freed_under_it(host, monkeypatch):
    """A callback held up past the stop's 5 s (a reconcile of a huge tree, say): freeing
    its ring then would pull libbpf's buffer from under it; the process's exit frees it."""
    program = Program()
    w, _ = watch(host, "/svc/*")
    w.start(program)
    consumer, thread = w._ring, w._thread
    assert consumer is not None and thread is not None
    held, release = threading.Event(), threading.Event()

    def held_up(timeout_ms: int) -> None:
        held.set()
        release.wait(10)

    monkeypatch.setattr(program, "ring_buffer_poll", held_up)
    try:
        assert held.wait(10)
        monkeypatch.setattr(thread, "join", lambda timeout=None: None)  # its 5 s are up
        w.stop(detach=True)
        assert thread.is_alive() and not consumer.closed
    finally:
        release.set()
        threading.Thread.join(thread, 10)


class Libc:
    """The perf_event_open(2) call tracepoint_link makes, recorded; its fd is a pipe's."""

    def __init__(self, fail: int = 0):
        self.fail = fail
        self.calls: list[tuple[Any, ...]] = []
        self.fds: list[int] = []
        self.writers: list[int] = []

    def syscall(self, number: int, attr: Any, pid: int, cpu: int, group: int, flags: int):
        a = ct.cast(attr, ct.POINTER(cgroup_watch._PerfEventAttr)).contents
        self.calls.append((number, a.type, a.size, a.config, a.sample_period, a.wakeup_events))
        self.calls.append((pid, cpu, group, flags))
        if self.fail:
            ct.set_errno(self.fail)
            return -1
        r, w = os.pipe()
        self.fds.append(r)
        self.writers.append(w)
        return r

    def event_closed(self, i: int = 0) -> bool:
        """Whether the i-th perf event's fd was closed: its pipe has no reader left."""
        try:
            os.write(self.writers[i], b"x")
        except BrokenPipeError:
            return True
        return False


@pytest.fixture
def libc(monkeypatch):
    fake = Libc()
    monkeypatch.setattr(cgroup_watch, "_libc", fake)
    yield fake
    for fd in fake.writers:
        os.close(fd)


def test_a_tracepoint_link_opens_the_events_perf_event_and_links_the_program_to_it(
    tmp_path, monkeypatch, libc
):
    (tmp_path / "cgroup_mkdir").mkdir()
    (tmp_path / "cgroup_mkdir" / "id").write_text("544\n")
    monkeypatch.setattr(cgroup_watch, "_TRACEFS", tmp_path)
    linked: list[tuple[int, int, int]] = []

    def link_create(prog_fd: int, target_fd: int, attach: int) -> int:
        os.fstat(target_fd)  # open while linking
        linked.append((prog_fd, target_fd, attach))
        return 77

    monkeypatch.setattr(bpfsys, "link_create", link_create)
    assert cgroup_watch.tracepoint_link(51, "cgroup_mkdir") == 77
    size = ct.sizeof(cgroup_watch._PerfEventAttr)
    assert libc.calls == [
        (cgroup_watch._PERF_EVENT_OPEN, 2, size, 544, 1, 1),  # PERF_TYPE_TRACEPOINT
        (-1, 0, -1, 8),  # every process, CPU 0 (a tracepoint fires on all), CLOEXEC
    ]
    assert linked == [(51, libc.fds[0], 41)]  # BPF_PERF_EVENT
    assert libc.event_closed()  # the link holds the event: the fd itself is closed


def test_a_perf_event_the_kernel_refuses_names_the_event_and_the_error(tmp_path, monkeypatch):
    (tmp_path / "cgroup_rmdir").mkdir()
    (tmp_path / "cgroup_rmdir" / "id").write_text("545\n")
    monkeypatch.setattr(cgroup_watch, "_TRACEFS", tmp_path)
    monkeypatch.setattr(cgroup_watch, "_libc", Libc(fail=errno.EACCES))
    with pytest.raises(OSError) as refused:
        cgroup_watch.tracepoint_link(52, "cgroup_rmdir")
    assert refused.value.errno == errno.EACCES
    assert "perf_event_open(cgroup:cgroup_rmdir): Permission denied" in str(refused.value)


def test_the_perf_event_is_closed_when_linking_fails(tmp_path, monkeypatch, libc):
    (tmp_path / "cgroup_mkdir").mkdir()
    (tmp_path / "cgroup_mkdir" / "id").write_text("544\n")
    monkeypatch.setattr(cgroup_watch, "_TRACEFS", tmp_path)

    def refused(*_a: Any) -> int:
        raise OSError(errno.EINVAL, "link_create")

    monkeypatch.setattr(bpfsys, "link_create", refused)
    with pytest.raises(OSError):
        cgroup_watch.tracepoint_link(51, "cgroup_mkdir")
    assert libc.event_closed()


def test_a_path_that_is_not_utf8_is_decided_with_its_bad_bytes_replaced(host):
    program = Program()
    w, _ = watch(host, "/svc/*")
    w.start(program)
    try:
        event(program, MKDIR, 61, b"/svc/caf\xe9")
        assert w.managed_paths() == ["/svc/caf\ufffd"]
    finally:
        w.stop(detach=False)


def test_the_event_layout_is_bccs_for_the_ring_when_bcc_has_not_named_it_yet(host, monkeypatch):
    """BCC makes a ring buffer's ctypes class only once the ring is read: until then the
    watch asks for it (agent/attest/events.py event_class) with that ring."""
    from agent.attest import events

    asked: list[Any] = []
    monkeypatch.setattr(events, "event_class", lambda ring: asked.append(ring) or Event)
    program = Program()
    program.ring._event_class = None
    w, _ = watch(host, "/svc/*")
    w.start(program)
    try:
        assert asked == [program.ring]
        event(program, MKDIR, 62, "/svc/x")
        assert w.managed_paths() == ["/svc/x"]
    finally:
        w.stop(detach=False)


def test_a_truncated_path_of_a_cgroup_gone_already_is_audited_as_the_kernel_gave_it(host):
    program = Program()
    w, audit = watch(host, "/svc/*/*/agent-*")
    w.start(program)
    try:
        long = "/".join(["", "svc", "a" * 250, "b" * 250, "agent-2"])
        event(program, RMDIR, 71, long.encode()[: cgroup_watch.PATH_LEN - 1], state=MANAGED)
        ((name, fields),) = audit.events
        assert name == "cgroup.unmanaged" and fields["cgroup_id"] == 71
        assert fields["cgroup"] == long[: cgroup_watch.PATH_LEN - 1]  # not found by id
    finally:
        w.stop(detach=False)


def test_a_watch_not_started_answers_and_stops_without_error(host):
    """The metrics endpoint may be scraped, and the agent stopped, before the redirect
    started its watch."""
    registry = CollectorRegistry()
    w, _ = watch(host, "/svc/*", registry=registry)
    assert w.lost() == 0 and w.managed_paths() == []
    assert registry.get_sample_value("credless_cgroup_watch_events_lost_total") == 0
    w.stop(detach=False)
    assert host.pinned() == {} and host.links == []


def test_the_metrics_say_what_they_count(host):
    registry = CollectorRegistry()
    watch(host, "/svc/*", registry=registry)
    assert {m.name: m.documentation for m in registry.collect()} == {
        "credless_managed_cgroup_changes": (
            "Cgroups that became managed (appeared matching a pattern) or stopped being"
        ),
        "credless_managed_cgroups": "Cgroups matching inject.managed_cgroups",
        "credless_cgroup_watch_events_lost": (
            "cgroup mkdir/rmdir events the kernel could not publish (the tree is re-read)"
        ),
        "credless_cgroup_watch_map_full": (
            "New cgroups not held PENDING because managed_cgroups was full"
        ),
    }


def test_a_perf_event_on_fd_0_is_linked_not_refused(tmp_path, monkeypatch, libc):
    """An agent started with its stdin closed can be given fd 0 by perf_event_open(2):
    only a negative return is its error."""
    (tmp_path / "cgroup_mkdir").mkdir()
    (tmp_path / "cgroup_mkdir" / "id").write_text("544\n")
    monkeypatch.setattr(cgroup_watch, "_TRACEFS", tmp_path)
    monkeypatch.setattr(libc, "syscall", lambda *_a: 0)
    linked: list[tuple[int, int, int]] = []
    monkeypatch.setattr(bpfsys, "link_create", lambda *a: linked.append(a) or 78)
    closed: list[int] = []
    close = os.close
    monkeypatch.setattr(os, "close", lambda fd: closed.append(fd) if fd == 0 else close(fd))
    assert cgroup_watch.tracepoint_link(51, "cgroup_mkdir") == 78
    assert linked == [(51, 0, 41)] and closed == [0]


class LibBcc:
    """libbcc's ring buffer calls (libbpf's ring_buffer) as RingConsumer makes them,
    recorded: the ring is an opaque handle, NULL (None) when libbpf cannot open it."""

    def __init__(self) -> None:
        self.ring: int | None = 0x5A5A
        self.calls: list[tuple[Any, ...]] = []
        self.callback: Any = None

    def bpf_new_ringbuf(self, map_fd: int, callback: Any, ctx: Any) -> int | None:
        self.calls.append(("new", map_fd, ctx))
        self.callback = callback
        return self.ring

    def bpf_poll_ringbuf(self, ring: int, timeout_ms: int) -> None:
        self.calls.append(("poll", ring, timeout_ms))

    def bpf_free_ringbuf(self, ring: int) -> None:
        self.calls.append(("free", ring))


@pytest.fixture
def libbcc(monkeypatch):
    from bcc import libbcc as real

    fake = LibBcc()
    monkeypatch.setattr(real, "lib", fake)
    return fake


def test_the_ring_consumer_reads_the_named_ring_calls_back_polls_and_frees_it_once(libbcc):
    """The kernel half (libbpf's epoll on the ring) runs in
    tests/integration/test_managed_cgroups.py; here what the consumer asks of libbcc."""
    got: list[tuple[Any, ...]] = []
    program = {b"cgroup_events": SimpleNamespace(map_fd=33), b"other": SimpleNamespace(map_fd=34)}
    ring = RingConsumer(program, b"cgroup_events", lambda *a: got.append(a) or 7)
    assert libbcc.calls == [("new", 33, None)]
    buf = ct.create_string_buffer(b"abcd")
    # libbpf calls back through C, with the record's address and size
    assert libbcc.callback(None, ct.addressof(buf), 4) == 7
    assert got == [(None, ct.addressof(buf), 4)]
    ring.poll(100)
    ring.close()
    ring.close()  # twice: freed once
    assert libbcc.calls[1:] == [("poll", 0x5A5A, 100), ("free", 0x5A5A)]


def test_a_ring_libbpf_cannot_open_is_an_error_naming_it(libbcc):
    libbcc.ring = None
    with pytest.raises(OSError) as refused:
        RingConsumer({b"cgroup_events": SimpleNamespace(map_fd=33)}, b"cgroup_events", print)
    assert str(refused.value) == "cannot open the ring buffer cgroup_events"
