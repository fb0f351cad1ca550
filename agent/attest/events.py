"""Loads bpf/process_events.c and turns its ring buffer into ProcessEvent values.

A thin loader: the programs and the event layout live in bpf/; this module computes the
kernel-specific compile flags, polls the ring buffer on one thread, and exposes the two
kernel-side facts user space needs: how many events the kernel could not record, and which
image a live tgid runs right now (the `process_images` map), with a memory-mapped count of
changes per tgid slot (`image_changes`) so that asking again is usually not a syscall.
"""

from __future__ import annotations

import ctypes as ct
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from agent import bpfsys
from agent.attest.btf import offset_cflags
from agent.attest.table import ProcessEvent
from agent.bpfload import compile_program
from agent.observe.logging import get_logger

log = get_logger("attest.events")

_EXIT_FORMAT = Path("/sys/kernel/tracing/events/sched/sched_process_exit/format")
_BPF_NOEXIST = 1
IMAGE_CHANGE_SLOTS = 65536  # bpf/process_events.c's default


def _has_group_dead() -> bool:
    """Kernels since 6.16 say in sched_process_exit whether the whole process ended."""
    try:
        return "group_dead" in _EXIT_FORMAT.read_text()
    except OSError:
        return False


def compile_flags(ring_pages: int, pin_dir: str | None) -> list[str]:
    """The -D flags bpf/process_events.c is compiled with on the running kernel."""
    flags = [*offset_cflags(), f"-DRINGBUF_PAGES={ring_pages}"]
    if _has_group_dead():
        flags.append("-DHAVE_GROUP_DEAD")
    if pin_dir:
        flags.append(f'-DPIN_DIR="{pin_dir}"')
    return flags


class SharesTheObject(Protocol):
    """Kernel programs compiled into this source's object rather than one of their own
    (agent/inject/redirect.Redirector): it compiles the object, these sources first."""

    def compile_with(self, first: Iterable[str] = (), first_flags: Iterable[str] = ()) -> Any: ...


class ProcessEventSource:
    # BCC's objects (BCC publishes no types), set by start() before the ring buffer thread
    # and the image lookups use them
    _event_ptr: type[ct._Pointer[Any]]  # to struct process_event, BCC's ctypes class
    _images: Any
    _lost: Any
    _lookup_elem: Any
    _images_fd: int
    _image_leaf: Any

    def __init__(
        self,
        on_event: Callable[[ProcessEvent], None],
        ring_pages: int = 2048,
        pin_dir: str | None = None,
    ):
        self._on_event = on_event
        self._pin_dir = pin_dir
        # set by an agent taking over from a running one (agent/handover.py): its pinned
        # process_images map is kept and shared, so that both agents' programs and proxies
        # read the same (start, exec) times of every process, whichever made a record
        self.reuse_pinned_images = False
        self._ring_pages = ring_pages
        self._bpf: Any = None  # BCC's BPF once started
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._changes: bpfsys.MappedCounters | None = None
        self.callback_errors = 0
        # set before start() by an agent that injects (agent/wiring.py): one object for
        # every kernel program of the agent, one BCC compile (agent/bpfload.py says why)
        self.shared_with: SharesTheObject | None = None

    def start(self) -> None:
        if self._pin_dir:
            # shared with bpf/redirect.c; a stale pin from a crashed agent is replaced, since
            # the table is re-seeded from /proc anyway
            Path(self._pin_dir).mkdir(parents=True, exist_ok=True)
            if not self.reuse_pinned_images:
                Path(self._pin_dir, "process_images").unlink(missing_ok=True)
        flags = compile_flags(self._ring_pages, self._pin_dir)
        # compiling attaches the tracepoints (BCC's TRACEPOINT_PROBE)
        if self.shared_with is not None:
            bpf = self.shared_with.compile_with(["process_events"], flags)
        else:
            bpf = compile_program("process_events", cflags=flags)
        self._bpf = bpf
        ring = bpf[b"process_events"]
        ring.open_ring_buffer(self._callback)
        # The ctypes class BCC derived from struct process_event (bpf/process_events.h).
        self._event_ptr = ct.POINTER(ring._event_class or event_class(ring))
        self._images = bpf[b"process_images"]
        from bcc import libbcc

        self._lookup_elem = libbcc.lib.bpf_lookup_elem
        self._images_fd, self._image_leaf = self._images.map_fd, self._images.Leaf
        self._lost = bpf[b"process_events_lost"]
        self._map_image_changes(bpf)
        self._thread = threading.Thread(target=self._poll, name="bpf-process-events", daemon=True)
        self._thread.start()
        log.info("process event tracepoints attached", ring_buffer_pages=self._ring_pages)

    def _callback(self, _ctx: object, data: int, _size: int) -> int:
        try:
            e = ct.cast(data, self._event_ptr).contents
            self._on_event(
                ProcessEvent(
                    type=e.type,
                    tgid=e.tgid,
                    pid=e.pid,
                    ppid=e.ppid,
                    uid=e.uid,
                    gid=e.gid,
                    start_ns=e.start_ns,
                    exec_ns=e.exec_ns,
                    cgroup_id=e.cgroup_id,
                    ts_ns=e.ts_ns,
                    comm=e.comm.decode(errors="replace"),
                    filename=e.filename.decode(errors="replace"),
                )
            )
        except Exception:  # a bad event must not stop the stream; counted and logged
            self.callback_errors += 1
            log.exception("process event handler failed")
        return 0

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._bpf.ring_buffer_poll(100)

    def _map_image_changes(self, bpf: Any) -> None:
        try:
            self._changes = bpfsys.MappedCounters(bpf[b"image_changes"].map_fd, IMAGE_CHANGE_SLOTS)
        except (OSError, KeyError) as e:  # no BPF_F_MMAPABLE (before 5.5): syscalls only
            log.warning(
                "image change counters not mapped; every image check is a bpf(2) call", error=str(e)
            )

    def image_changes(self, tgid: int) -> int | None:
        """How many times tgid's slot has changed (exec or exit of a tgid in it), read from
        kernel memory without a syscall; None when the counters are not mapped. Read it
        *before* kernel_image(): while it stays the same, that answer stays true."""
        changes = self._changes
        return changes.read(tgid) if changes is not None else None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._changes is not None:
            self._changes.close()
            self._changes = None
        if self._bpf is not None:
            self._bpf.cleanup()  # detaches the tracepoints and closes the maps
            self._bpf = None
        if self._pin_dir:
            Path(self._pin_dir, "process_images").unlink(missing_ok=True)
            try:
                Path(self._pin_dir).rmdir()  # only once nothing else is pinned there
            except OSError:
                pass

    def lost(self) -> int:
        if self._bpf is None:
            return 0
        return sum(self._lost[ct.c_int(0)])

    def pin_images(self) -> bool:
        """Pin this source's process_images map again if its pin is gone (the other agent of
        a handover unlinks the pin when it stops, whichever map it names by then); the
        redirect programs hold the map itself, the pin is for the next agent and doctor."""
        if self._bpf is None or not self._pin_dir:
            return False
        path = Path(self._pin_dir, "process_images")
        if path.exists():
            return False
        bpfsys.obj_pin(self._bpf[b"process_images"].map_fd, str(path))
        return True

    def kernel_image(self, tgid: int) -> tuple[int, int] | None:
        """(start_ns, exec_ns) of the image tgid runs now, per the kernel; None if no process."""
        # Called per proxied request: straight to bpf_lookup_elem, without BCC's table
        # wrapper (several times the cost); key and leaf are per call, callers are threads.
        key, leaf = ct.c_uint32(tgid), self._image_leaf()
        if self._lookup_elem(self._images_fd, ct.byref(key), ct.byref(leaf)):
            return None
        return leaf.start_ns, leaf.exec_ns

    def seed_image(self, tgid: int, start_ns: int, exec_ns: int) -> bool:
        """Record a pre-existing process unless the kernel already has a newer image for it."""
        key = ct.c_uint32(tgid)
        leaf = self._images.Leaf(start_ns, exec_ns)
        from bcc import libbcc

        return (
            libbcc.lib.bpf_update_elem(
                self._images.map_fd, ct.byref(key), ct.byref(leaf), _BPF_NOEXIST
            )
            == 0
        )


def event_class(ring: Any) -> Any:
    """The ctypes class BCC derived from a ring buffer's event struct (BCC names it only
    once the ring is read)."""
    from bcc.table import _get_event_class

    return _get_event_class(ring)
