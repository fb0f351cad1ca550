"""The process table: which image each process runs, fed by kernel events. Sans-IO.

An *image* is one process running one program: the key is (tgid, exec_ns), where exec_ns is
the CLOCK_BOOTTIME instant the image began (the execve, or the fork for a child that has not
exec'd). Neither the pid (reused) nor the start time (survives execve) alone can serve:

- PID reuse: a new process with an old pid starts later, so its exec_ns differs ⇒ a miss for
  anyone holding the old key.
- exec: the same process running a new program gets a new exec_ns ⇒ the old image is
  *replaced* and lookups for it miss at once (a connection opened by the old program must
  never be served with the new program's identity, nor the reverse).
- exit: the image stays answerable for `grace` seconds so a lookup racing a just-closed
  connection still resolves; then it is gone.

The table knows nothing of BPF or /proc: events and seeds arrive as plain values, time comes
from an injected clock, so every race above is a unit test.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

EV_EXEC, EV_FORK, EV_EXIT = 1, 2, 3
LINEAGE_LIMIT = 32  # ancestors an image keeps
EVENT_NAMES = {EV_EXEC: "exec", EV_FORK: "fork", EV_EXIT: "exit"}

ImageKey = tuple[int, int]  # (tgid, exec_ns)


@dataclass(frozen=True)
class ProcessEvent:
    """A decoded bpf/process_events.h `struct process_event`."""

    type: int
    tgid: int
    pid: int
    ppid: int
    uid: int
    gid: int
    start_ns: int
    exec_ns: int
    cgroup_id: int
    ts_ns: int
    comm: str
    filename: str = ""


@dataclass
class ProcessImage:
    tgid: int
    exec_ns: int
    start_ns: int
    ppid: int
    uid: int
    gid: int
    cgroup_id: int
    comm: str
    filename: str
    source: str  # "exec", "fork" or "proc" (seeded at start-up)
    # The images that started this one, nearest first, as they were when it began (see
    # `_started_by`), held by reference: a lineage outlives its ancestors' exit, expiry and
    # exec. At most LINEAGE_LIMIT, so a process that execs in a loop keeps no more alive.
    ancestors: tuple[ProcessImage, ...] = field(default=(), repr=False, compare=False)
    exited_at: float | None = None  # clock time of exit
    replaced: bool = False  # the process exec'd another program
    enrichment: Any = None  # set once by the enricher (agent/attest/attestor.py)
    enrich_error: str | None = None
    event_ts_ns: int = 0  # CLOCK_BOOTTIME of the kernel event, for latency

    @property
    def key(self) -> ImageKey:
        return (self.tgid, self.exec_ns)


@dataclass
class TableStats:
    events: dict[str, int] = field(default_factory=lambda: {n: 0 for n in EVENT_NAMES.values()})
    expired: int = 0


class ProcessTable:
    def __init__(self, grace_seconds: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self._grace = grace_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._images: dict[ImageKey, ProcessImage] = {}
        self._current: dict[int, ImageKey] = {}  # tgid -> its live image
        self._exited: list[ImageKey] = []  # in exit order, for expiry
        self.stats = TableStats()

    # ------------------------------------------------------------ feeding
    def apply(self, ev: ProcessEvent) -> ProcessImage | None:
        """Apply one kernel event; returns the image it created (exec/fork) or ended (exit)."""
        with self._lock:
            self.stats.events[EVENT_NAMES.get(ev.type, "other")] = (
                self.stats.events.get(EVENT_NAMES.get(ev.type, "other"), 0) + 1
            )
            if ev.type == EV_EXIT:
                return self._exit(ev.tgid, ev.exec_ns)
            if ev.type not in (EV_EXEC, EV_FORK):
                return None
            replaced = None  # the image this exec replaces in its process
            if ev.type == EV_EXEC:
                old = self._images.get(self._current.get(ev.tgid, (0, -1)))
                if old is not None and old.exec_ns != ev.exec_ns:
                    replaced = old
                    old.replaced = True
                    self._images.pop(old.key, None)
            img = ProcessImage(
                tgid=ev.tgid,
                exec_ns=ev.exec_ns,
                start_ns=ev.start_ns,
                ppid=ev.ppid,
                uid=ev.uid,
                gid=ev.gid,
                cgroup_id=ev.cgroup_id,
                comm=ev.comm,
                filename=ev.filename,
                source=EVENT_NAMES[ev.type],
                event_ts_ns=ev.ts_ns,
            )
            img.ancestors = _descending(self._started_by(ev, replaced))
            self._images[img.key] = img
            self._current[ev.tgid] = img.key
            return img

    def _started_by(self, ev: ProcessEvent, replaced: ProcessImage | None) -> ProcessImage | None:
        """The image that started this event's: for a fork, the forking process's; for an
        exec, the program that called execve, as a sub-agent policy
        (policy.subagents) must see it, whatever happened to the processes since:

        - a forked child that execs: the process that forked it, though it exited or was
          reparented since (a double fork leaves the kernel's parent at exec init, or a
          subreaper);
        - a process that execs over another program (no fork): that program, since it chose
          the new one's arguments, environment and input.

        Only a process the table has not seen yet (no image: the agent started after it)
        takes its parent process as the kernel names it now."""
        if replaced is not None:
            if replaced.source == "fork":  # the forking process's program, in this process
                return replaced.ancestors[0] if replaced.ancestors else None
            return replaced
        key = self._current.get(ev.ppid)
        return self._images.get(key) if key else None

    def seed(self, img: ProcessImage) -> bool:
        """Add a process found in /proc at start-up, unless an event already described it."""
        with self._lock:
            if img.tgid in self._current:
                return False
            self._images[img.key] = img
            self._current[img.tgid] = img.key
            return True

    def link_parents(self) -> None:
        """After seeding in arbitrary pid order, give each image that has no ancestors yet
        its parent process's image, and that one's ancestors, parents first."""
        with self._lock:
            for img in list(self._images.values()):
                chain = [img]  # img, its parent, ... up to one that has its ancestors
                while len(chain) <= LINEAGE_LIMIT and not chain[-1].ancestors:
                    key = self._current.get(chain[-1].ppid)
                    parent = self._images.get(key) if key else None
                    if parent is None or any(parent is c for c in chain):  # none, or a pid loop
                        break
                    chain.append(parent)
                for child, parent in reversed(list(itertools.pairwise(chain))):
                    if not child.ancestors:
                        child.ancestors = _descending(parent)

    def _exit(self, tgid: int, exec_ns: int) -> ProcessImage | None:
        key = self._current.get(tgid)
        if key is None or (exec_ns and key[1] != exec_ns):
            return None
        del self._current[tgid]
        img = self._images[key]
        img.exited_at = self._clock()
        self._exited.append(key)
        return img

    def expire(self) -> list[ProcessImage]:
        """Drop exited images whose grace period has passed; returns them."""
        now, gone = self._clock(), []
        with self._lock:
            while self._exited:
                img = self._images.get(self._exited[0])
                if (
                    img is not None
                    and img.exited_at is not None
                    and now - img.exited_at < self._grace
                ):
                    break
                self._exited.pop(0)
                if img is not None:
                    self._images.pop(img.key, None)
                    gone.append(img)
            self.stats.expired += len(gone)
        return gone

    # ------------------------------------------------------------ queries
    def image(self, tgid: int, exec_ns: int) -> ProcessImage | None:
        """The image (tgid, exec_ns) if it is live, or exited less than `grace` ago."""
        with self._lock:
            img = self._images.get((tgid, exec_ns))
        if img is None or img.replaced:
            return None
        if img.exited_at is not None and self._clock() - img.exited_at >= self._grace:
            return None
        return img

    def current(self, tgid: int) -> ProcessImage | None:
        with self._lock:
            key = self._current.get(tgid)
            return self._images.get(key) if key else None

    def lineage(self, img: ProcessImage) -> list[ProcessImage]:
        """The images that started this one, nearest first, as they were when each began
        (`_started_by`), whether or not they still run."""
        return list(img.ancestors)

    def live(self) -> Iterator[ProcessImage]:
        with self._lock:
            images = [self._images[k] for k in self._current.values()]
        yield from images

    def __len__(self) -> int:
        with self._lock:
            return len(self._current)


def _descending(parent: ProcessImage | None) -> tuple[ProcessImage, ...]:
    """The ancestors of a child of `parent`: it, then its own, up to LINEAGE_LIMIT."""
    if parent is None:
        return ()
    return (parent, *parent.ancestors[: LINEAGE_LIMIT - 1])
