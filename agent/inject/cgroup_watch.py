"""Keeps the redirect's `managed_cgroups` map following inject.managed_cgroups patterns as
cgroups appear, disappear and are made again (every systemd service restart).

bpf/cgroup_watch.c (its comment says why a tracepoint, and how no process in a new cgroup
connects uncredentialed before the decision) marks a new cgroup at a depth a pattern has
as PENDING and publishes its path; here the path is matched (agent/inject/cgroup_match.py)
and the entry becomes MANAGED or is deleted. A removed cgroup's entry is deleted in the
kernel; here it is audited. Both changes are audited (`cgroup.managed`,
`cgroup.unmanaged`) and counted (credless_managed_cgroup_changes_total).

The tracepoint links are pinned next to the redirect's (agent.bpf_pin_dir): while no agent
runs, a re-created managed cgroup is PENDING, so refused, never let out. A starting agent
attaches its own programs, then replaces the pins, then reads the cgroup tree once
(reconcile) to decide what it did not see.
"""

from __future__ import annotations

import ctypes as ct
import os
import platform
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily

from agent import bpfsys
from agent.inject.cgroup_match import MAX_CGROUP_DEPTH, CgroupMatcher, cgroups_at
from agent.observe.logging import AuditLog, get_logger

log = get_logger("inject.cgroups")

MANAGED, PENDING = 1, 2  # bpf/cgroup_watch.h
MKDIR, RMDIR = 1, 2
PATH_LEN = 512
LINKS = {"mkdir": "link_cgroup_mkdir", "rmdir": "link_cgroup_rmdir"}
SOURCE = "cgroup_watch"  # bpf/cgroup_watch.c, compiled into the redirect's object
_TRACEFS = Path("/sys/kernel/tracing/events/cgroup")
_FIELDS = {"root": "TP_ROOT_OFF", "level": "TP_LEVEL_OFF", "id": "TP_ID_OFF", "path": "TP_PATH_OFF"}

_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}[platform.machine()]
_PERF_TYPE_TRACEPOINT = 2
_PERF_FLAG_FD_CLOEXEC = 8
_BPF_PERF_EVENT = 41  # enum bpf_attach_type
_libc = ct.CDLL(None, use_errno=True)


def tracepoint_offsets(event: str = "cgroup_mkdir") -> list[str]:
    """-D flags with the byte offsets of the tracepoint's fields, from its format file."""
    text = (_TRACEFS / event / "format").read_text()
    flags = []
    for name, macro in _FIELDS.items():
        m = re.search(rf"field:[^;]*[ \]]{name}(\[\])?;\s*offset:(\d+);", text)
        if m is None:
            raise RuntimeError(f"tracepoint cgroup:{event} has no field {name}")
        flags.append(f"-D{macro}={m.group(2)}")
    return flags


class _PerfEventAttr(ct.Structure):  # PERF_ATTR_SIZE_VER0
    _fields_ = [
        ("type", ct.c_uint32),
        ("size", ct.c_uint32),
        ("config", ct.c_uint64),
        ("sample_period", ct.c_uint64),
        ("sample_type", ct.c_uint64),
        ("read_format", ct.c_uint64),
        ("flags", ct.c_uint64),
        ("wakeup_events", ct.c_uint32),
        ("bp_type", ct.c_uint32),
        ("config1", ct.c_uint64),
    ]


def tracepoint_link(prog_fd: int, event: str) -> int:
    """Attach prog to cgroup:<event> through a BPF link (pinnable, unlike the perf event
    BCC attaches with); returns the link's fd."""
    tp_id = int((_TRACEFS / event / "id").read_text())
    attr = _PerfEventAttr(_PERF_TYPE_TRACEPOINT, ct.sizeof(_PerfEventAttr), tp_id, 1)
    attr.wakeup_events = 1
    # pid -1, cpu 0: a tracepoint's program runs on every CPU whatever the event's CPU
    pfd = _libc.syscall(_PERF_EVENT_OPEN, ct.byref(attr), -1, 0, -1, _PERF_FLAG_FD_CLOEXEC)
    if pfd < 0:
        err = ct.get_errno()
        raise OSError(err, f"perf_event_open(cgroup:{event}): {os.strerror(err)}")
    try:
        return bpfsys.link_create(prog_fd, pfd, _BPF_PERF_EVENT)
    finally:
        os.close(pfd)  # the link holds the event


class WatchLost:
    """credless_cgroup_watch_events_lost (mkdir/rmdir events the kernel could not publish)
    and credless_cgroup_watch_map_full."""

    def __init__(self, watch: CgroupWatch):
        self.watch = watch

    def collect(self):
        c = CounterMetricFamily(
            "credless_cgroup_watch_events_lost",
            "cgroup mkdir/rmdir events the kernel could not publish (the tree is re-read)",
        )
        c.add_metric([], self.watch.lost())
        yield c
        full = CounterMetricFamily(
            "credless_cgroup_watch_map_full",
            "New cgroups not held PENDING because managed_cgroups was full",
        )
        full.add_metric([], self.watch.lost(index=1))
        yield full


class RingConsumer:
    """A ring buffer map's own consumer (libbpf's ring_buffer, through libbcc), polled by
    one thread. Not BCC's open_ring_buffer: that adds the ring to its object's one consumer,
    which attestation's thread polls in the agent's one object (agent/attest/events.py), and
    a libbpf ring_buffer may neither be added to while polled nor polled by two threads."""

    def __init__(self, program: Any, name: bytes, callback: Callable[[Any, int, int], int]):
        from bcc import libbcc

        self._lib = libbcc.lib
        self._callback = libbcc._RINGBUF_CB_TYPE(callback)  # kept alive: C calls it
        self._ring = self._lib.bpf_new_ringbuf(program[name].map_fd, self._callback, None)
        if not self._ring:
            raise OSError(f"cannot open the ring buffer {name.decode()}")

    def poll(self, timeout_ms: int) -> None:
        self._lib.bpf_poll_ringbuf(self._ring, timeout_ms)

    def close(self) -> None:
        if self._ring:
            self._lib.bpf_free_ringbuf(self._ring)
            self._ring = None


class CgroupWatch:
    """The tracepoint programs, their ring buffer, and the decisions about new cgroups."""

    def __init__(
        self,
        pin_dir: Path,
        cgroup_root: str,
        matcher: CgroupMatcher,
        audit: AuditLog | None = None,
        registry: CollectorRegistry | None = None,
    ):
        self.pin_dir = pin_dir
        self.root = cgroup_root
        self.matcher = matcher
        self.audit = audit
        self._bpf: Any = None  # BCC's BPF once started
        self._links: list[int] = []
        self._lock = threading.Lock()  # reconcile and events: one decision at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ring: RingConsumer | None = None
        self._lost_seen = 0
        self._paths: dict[int, str] = {}  # the MANAGED entries' cgroups
        self.m_changes = Counter(
            "credless_managed_cgroup_changes",
            "Cgroups that became managed (appeared matching a pattern) or stopped being",
            ["change"],
            registry=registry,
        )
        self.m_managed = Gauge(
            "credless_managed_cgroups", "Cgroups matching inject.managed_cgroups", registry=registry
        )
        if registry is not None:
            registry.register(WatchLost(self))

    # ------------------------------------------------------------ lifecycle
    def cflags(self) -> list[str]:
        """The -D flags bpf/cgroup_watch.c is compiled with, into the redirect's object
        (agent/bpfload.py says why one object): the depths the patterns name, and the
        tracepoint's field offsets."""
        mask = sum(1 << level for level in self.matcher.levels)
        return [f"-DWATCH_LEVELS={mask}ULL", *tracepoint_offsets()]

    def start(self, program: Any) -> None:
        """Attach the watcher's programs of `program` (the redirect's bcc.BPF, compiled with
        cflags(); its owner cleans it up), pin their links, and decide the tree as it is."""
        from bcc import BPF

        self._bpf = program
        ring = program[b"cgroup_events"]
        self._ring = RingConsumer(program, b"cgroup_events", self._callback)
        from agent.attest.events import event_class

        self._event_ptr = ct.POINTER(ring._event_class or event_class(ring))
        self._map = program[b"managed_cgroups"]
        for event in LINKS:
            fn = program.load_func(f"credless_cgroup_{event}".encode(), BPF.TRACEPOINT)
            self._links.append(tracepoint_link(fn.fd, f"cgroup_{event}"))
        self._pin_links()
        self.reconcile()
        self._thread = threading.Thread(
            target=self._poll, args=(self._ring,), name="bpf-cgroup-watch", daemon=True
        )
        self._thread.start()
        unmatched = self.matcher.unmatched(self.root)
        log.info(
            "watching cgroups for inject.managed_cgroups",
            patterns=self.matcher.patterns,
            managed=self.managed_paths(),
            matching_nothing_yet=unmatched,
        )

    def _pin_links(self) -> None:
        # this agent's programs run before an earlier pin goes: no instant without a watcher
        for fd, pin_name in zip(self._links, LINKS.values(), strict=True):
            pin = self.pin_dir / pin_name
            pin.unlink(missing_ok=True)
            bpfsys.obj_pin(fd, str(pin))

    def reclaim(self) -> None:
        """After a new agent failed to take over (agent/handover.py): pin this agent's links
        again in place of its, and decide the tree again (its configuration may have written
        entries of its own patterns)."""
        if not self._links:
            return
        self._pin_links()
        self.reconcile()

    def stop(self, detach: bool) -> None:
        self._stop.set()
        polling = False
        if self._thread is not None:
            self._thread.join(5)
            # still in a callback after 5 s: its ring is not freed under it (the process's
            # exit frees it)
            polling = self._thread.is_alive()
            self._thread = None
        if self._ring is not None and not polling:
            self._ring.close()
        self._ring = None
        if detach:
            for pin_name in LINKS.values():
                (self.pin_dir / pin_name).unlink(missing_ok=True)
        for fd in self._links:
            os.close(fd)
        self._links.clear()
        self._bpf = None  # its owner's (attestation's, or the redirect's): it cleans it up

    def _poll(self, ring: RingConsumer) -> None:
        while not self._stop.is_set():
            ring.poll(100)
            lost = self.lost()
            if lost != self._lost_seen:
                self._lost_seen = lost
                log.warning("cgroup events lost; reading the cgroup tree again", lost=lost)
                self.reconcile()

    def lost(self, index: int = 0) -> int:
        """Events the kernel could not publish (index 1: PENDING entries it could not
        write)."""
        if self._bpf is None:
            return 0
        return sum(self._bpf[b"cgroup_watch_counts"][ct.c_int(index)])

    # ------------------------------------------------------------ decisions
    def state(self) -> dict[int, int]:
        return {k.value: v.value & 0xFF for k, v in self._map.items()}

    def managed_paths(self) -> list[str]:
        return sorted(self._paths.values())

    def reconcile(self) -> None:
        """Make the map agree with the cgroup tree as it is now: every matching cgroup
        MANAGED, every other entry gone, except PENDING ones whose cgroup is not visible
        yet (their mkdir event decides them)."""
        with self._lock:
            before = self.state()
            want = {cg_id: path for path, cg_id in self.matcher.existing(self.root).items()}
            for cg_id, path in want.items():
                self._write(cg_id, MANAGED)
                if before.get(cg_id) != MANAGED:
                    self._changed("managed", path, cg_id, "present")
            stale = {i: s for i, s in before.items() if i not in want}
            seen: dict[int, str] = {}
            if stale:  # rare: a configuration changed, cgroups made while no agent ran
                seen = {i: p for p, i in cgroups_at(self.root, set(range(MAX_CGROUP_DEPTH)))}
            for cg_id, s in stale.items():
                where = seen.get(cg_id)
                if s != PENDING:  # matches no pattern now (another configuration), or gone
                    self._delete(cg_id)
                    self._changed("unmanaged", where, cg_id, "no pattern matches it")
                elif where is not None and self.matcher.matching(where):  # made since
                    self._write(cg_id, MANAGED)
                    want[cg_id] = where
                    self._changed("managed", where, cg_id, "appeared")
                elif where is not None:
                    self._delete(cg_id)
                # else: not visible yet (its mkdir event decides it), or a cgroup removed
                # while no watcher ran: PENDING names no task then, and ids are not reused
            self._paths = {cg_id: path for cg_id, path in want.items()}
            self.m_managed.set(len(self._paths))

    def _callback(self, _ctx: object, data: int, _size: int) -> int:
        try:
            e = ct.cast(data, self._event_ptr).contents
            path = e.path.decode(errors="replace")
            if len(e.path) >= PATH_LEN - 1:  # truncated: find it by id
                path = next((p for p, i in cgroups_at(self.root, {e.level}) if i == e.id), path)
            with self._lock:
                if e.type == MKDIR:
                    self._appeared(e.id, path)
                elif e.type == RMDIR:
                    self._removed(e.id, path, e.state)
        except Exception:  # a bad event must not stop the stream
            log.exception("cgroup event handler failed")
        return 0

    def _appeared(self, cg_id: int, path: str) -> None:
        if self.matcher.matching(path):
            self._write(cg_id, MANAGED)
            self._paths[cg_id] = path
            self.m_managed.set(len(self._paths))
            self._changed("managed", path, cg_id, "appeared")
        else:
            self._delete(cg_id)

    def _removed(self, cg_id: int, path: str, state: int) -> None:
        self._delete(cg_id)  # the kernel did; again, if we wrote it after
        if self._paths.pop(cg_id, None) is not None or state == MANAGED:
            self.m_managed.set(len(self._paths))
            self._changed("unmanaged", path, cg_id, "removed")

    def _write(self, cg_id: int, state: int) -> None:
        self._map[ct.c_uint64(cg_id)] = ct.c_uint32(state)

    def _delete(self, cg_id: int) -> None:
        try:
            del self._map[ct.c_uint64(cg_id)]
        except KeyError:
            pass

    def _changed(self, change: str, path: str | None, cg_id: int, reason: str) -> None:
        self.m_changes.labels(change=change).inc()
        patterns = self.matcher.matching(path) if path else []
        if self.audit is not None:
            self.audit.emit(
                f"cgroup.{change}", cgroup=path, cgroup_id=cg_id, patterns=patterns, reason=reason
            )
        log.info(f"cgroup {change}", cgroup=path, cgroup_id=cg_id, patterns=patterns, reason=reason)
