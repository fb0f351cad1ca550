"""The cgroup watcher's user-space half (agent/inject/cgroup_watch.py): which programs of the
redirect's object it attaches and pins, what it decides about each cgroup (at start, on each
mkdir and rmdir event, after a failed handover), what it audits, and what it leaves behind.

The kernel half runs in tests/integration/test_managed_cgroups.py. Here BCC's object is
stood in for at the narrowest seam: its tables (tests/unit/bcc_tables.py), its ring buffer
(the test calls the callback BCC would, with the event bytes bpf/cgroup_watch.h lays out),
and the perf-event link and pin calls, which record what they were asked; the link fds are
pipes, so a closed link is seen as its reader's end of file. The cgroup tree is a directory
tree: a cgroup's id is its directory's inode number, as in cgroupfs."""

from __future__ import annotations

import ctypes as ct
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from bcc import BPF as BCC
from prometheus_client import CollectorRegistry

from agent import bpfsys
from agent.inject import cgroup_watch
from agent.inject.cgroup_match import CgroupMatcher
from agent.inject.cgroup_watch import MANAGED, MKDIR, PENDING, RMDIR, CgroupWatch
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

    def __getitem__(self, name: bytes) -> Any:
        assert isinstance(name, bytes)
        return self.tables[name]

    def load_func(self, name: bytes, ptype: int) -> Any:
        self.loaded.append((name, ptype))
        return SimpleNamespace(fd=self.FDS[name])

    def ring_buffer_poll(self, timeout_ms: int) -> None:
        self.polled.set()
        threading.Event().wait(timeout_ms / 1000)  # as the kernel's epoll_wait would

    def cleanup(self) -> None:
        raise AssertionError("the watch cleaned up its owner's object")


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


def event(program: Program, type: int, cg_id: int, path: str, state: int = 0) -> None:
    e = Event(type=type, level=path.count("/"), id=cg_id, state=state, marked=1)
    e.path = path.encode()
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
