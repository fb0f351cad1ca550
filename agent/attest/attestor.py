"""The attestor: answers "who is process P?" for the identity, injection and policy components.

Pipeline: kernel events (events.py) → process table (table.py) → enrichment queue → one
enrichment thread reads /proc (procfs.py), resolves cgroup metadata (resolvers.py, kubelet.py)
and computes selectors (selectors.py), once per image.

Trust rules:
- An answer is only given for an image the kernel says is current (the `process_images`
  map, updated in the tracepoints before the event is published), or one that exited less
  than the grace period ago when asked by image key. A pid now running something else, or
  reused by another process, is a miss: never a wrong identity.
- /proc is read *then* the kernel map is checked again: exec_ns only moves forward, so if it
  still names our image after the read, everything read belonged to our image.
- An image that could not be enriched (it exited first, or was not readable) has no
  attestation: fail closed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from agent.attest import procfs, resolvers
from agent.attest.cgroupfs import cgroup2_root
from agent.attest.selectors import Attestation, cgroup_selectors, k8s_selectors, unix_selectors
from agent.attest.table import EV_EXIT, ProcessEvent, ProcessImage, ProcessTable
from agent.config import AttestSection
from agent.observe.logging import get_logger

log = get_logger("attest")

_BOOTTIME = time.CLOCK_BOOTTIME


# /proc's start time is in clock ticks, the kernel's in ns: the same process within a tick
START_TOLERANCE_NS = 20_000_000


class _LostEventsCollector:
    def __init__(self, attestor: Attestor):
        self._attestor = attestor

    def collect(self):
        c = CounterMetricFamily(
            "credless_bpf_events_lost",
            "Process events the kernel could not put in the ring buffer",
            labels=["program"],
        )
        c.add_metric(["process_events"], self._attestor.lost_events())
        yield c


class Attestor:
    name = "attest"

    def __init__(
        self,
        cfg: AttestSection,
        registry: Any = None,
        kubelet: Any = None,
        event_source_factory: Any = None,
        pin_dir: str | None = None,
    ):
        self.cfg = cfg
        self.table = ProcessTable(grace_seconds=cfg.exit_grace_seconds)
        self.hasher = procfs.ExeHasher()
        self.kubelet = kubelet
        self._queue: queue.SimpleQueue[ProcessImage | None] = queue.SimpleQueue()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listeners: list = []
        self._event_listeners: list = []
        if event_source_factory is None:
            from agent.attest.events import ProcessEventSource

            event_source_factory = ProcessEventSource
        self.source = event_source_factory(self._on_event, cfg.ring_buffer_pages, pin_dir)
        self._started = False
        self._init_metrics(registry)

    def _init_metrics(self, registry: Any) -> None:
        kw = {"registry": registry} if registry is not None else {"registry": None}
        self.m_events = Counter(
            "credless_attest_events", "Process lifecycle events consumed", ["type"], **kw
        )
        self.m_lookups = Counter(
            "credless_attest_lookups", "Attestation lookups by result", ["result"], **kw
        )
        self.m_enrich = Histogram(
            "credless_attest_enrich_seconds",
            "From the kernel event to the finished attestation",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            **kw,
        )
        self.m_enrich_fail = Counter(
            "credless_attest_enrich_failures",
            "Images that could not be attested, by reason",
            ["reason"],
            **kw,
        )
        self.m_live = Gauge("credless_attest_processes", "Live processes in the table", **kw)
        self.m_live.set_function(lambda: len(self.table))
        if registry is not None:
            registry.register(_LostEventsCollector(self))
        for t in ("exec", "fork", "exit"):
            self.m_events.labels(t)
        for r in ("hit", "miss", "exited"):
            self.m_lookups.labels(r)

    def share_kernel_object(self, other: Any) -> None:
        """Have the process event programs compiled into other's object when this starts
        (agent/attest/events.SharesTheObject: the redirect's), not into one of their own."""
        self.source.shared_with = other

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.source.start()  # attach first, then seed: nothing falls between the two
        seeded = self._seed_from_proc()
        for target, name in (
            (self._enrich_loop, "attest-enrich"),
            (self._expire_loop, "attest-expire"),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._started = True
        log.info("attestation started", seeded_processes=seeded)

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self.source.stop()
        for t in self._threads:
            t.join(5)
        self._threads.clear()
        self._started = False

    def ready(self) -> tuple[bool, str]:
        if not self._started:
            return False, "process event tracepoints not attached"
        return True, f"tracking {len(self.table)} processes"

    def lost_events(self) -> int:
        return self.source.lost() if self._started else 0

    def add_listener(self, fn) -> None:
        """fn(image, attestation) after each enrichment (called on the enrichment thread)."""
        self._listeners.append(fn)

    def add_event_listener(self, fn) -> None:
        """fn(event) for each kernel event (called on the ring buffer thread: keep it short)."""
        self._event_listeners.append(fn)

    # ------------------------------------------------------------ events
    def _on_event(self, ev: ProcessEvent) -> None:
        img = self.table.apply(ev)
        self.m_events.labels({1: "exec", 2: "fork", 3: "exit"}.get(ev.type, "other")).inc()
        if img is not None and ev.type != EV_EXIT:
            self._queue.put(img)
        for fn in self._event_listeners:
            fn(ev)
        with self._cv:
            self._cv.notify_all()

    def _seed_from_proc(self) -> int:
        """Seed the table (and the kernel's image map) with the processes already running.
        All are added before any is attested: an attestation records its lineage when it is
        made, and /proc is read in pid order, which is not birth order once pids wrap (a
        child at pid 532 under a parent at 32762). Attested as it was read, such a child had
        no parent, so no sub-agent policy (policy.subagents) applied to it."""
        now = time.clock_gettime_ns(_BOOTTIME)
        seeded: list[tuple[ProcessImage, procfs.ProcInfo]] = []
        for pid in procfs.list_pids():
            try:
                info = procfs.read_process(pid, None, self.hasher)
            except (procfs.ProcessGone, ValueError):
                continue
            if info.status.tgid != pid:
                continue
            start_ns = exec_ns = procfs.start_ns_from_ticks(info.start_ticks)
            if not self.source.seed_image(pid, start_ns, start_ns):
                # an exec or fork since attach already describes it; or, with a map handed
                # over by the agent this one takes over from, the kernel's times of it
                known = self.source.kernel_image(pid)
                if (
                    not getattr(self.source, "reuse_pinned_images", False)
                    or known is None
                    or abs(known[0] - start_ns) > START_TOLERANCE_NS  # not this process
                ):
                    continue
                start_ns, exec_ns = known
            img = ProcessImage(
                tgid=pid,
                exec_ns=exec_ns,
                start_ns=start_ns,
                ppid=info.status.ppid,
                uid=info.status.uids[0],
                gid=info.status.gids[0],
                cgroup_id=0,
                comm=info.status.name,
                filename=info.exe,
                source="proc",
            )
            if self.table.seed(img):
                seeded.append((img, info))
        self.table.link_parents()  # every parent is in the table now, whatever its pid
        for img, info in seeded:
            self._finish(img, info, now)
        return len(seeded)

    # ------------------------------------------------------------ enrichment
    def _enrich_loop(self) -> None:
        while not self._stop.is_set():
            img = self._queue.get()
            if img is None:
                return
            try:
                self._enrich(img)
            except Exception:  # never let one image stop attestation for all
                log.exception("enrichment failed", pid=img.tgid)
                img.enrich_error = "internal error"
                self.m_enrich_fail.labels("error").inc()
            with self._cv:
                self._cv.notify_all()

    def _enrich(self, img: ProcessImage) -> None:
        if img.replaced or img.exited_at is not None:
            img.enrich_error = "gone before enrichment"
            self.m_enrich_fail.labels("gone").inc()
            return
        try:
            info = procfs.read_process(img.tgid, img.start_ns, self.hasher)
        except procfs.ProcessGone as e:
            img.enrich_error = str(e)
            self.m_enrich_fail.labels("gone").inc()
            return
        current = self.source.kernel_image(img.tgid)
        if current is None or current[1] != img.exec_ns:
            img.enrich_error = "exec'd or exited while being read"
            self.m_enrich_fail.labels("gone").inc()
            return
        self._finish(img, info, img.event_ts_ns)

    def _finish(self, img: ProcessImage, info: procfs.ProcInfo, event_ts: int | None) -> None:
        facts = None
        if info.cgroup_path:
            try:
                facts = resolvers.resolve_cgroup(info.cgroup_path)
            except resolvers.CgroupPathError as e:
                # outside the agent's cgroup namespace: attest without cgroup-derived facts
                log.warning("cgroup path not resolvable", pid=img.tgid, error=str(e))
        pod = None
        if (
            self.kubelet is not None
            and facts is not None
            and facts.pod_uid
            and facts.container_id
            and facts.user_manager_uid is None
        ):
            try:
                pod = self.kubelet.pod(facts.pod_uid)
            except Exception as e:  # noqa: BLE001 — kubelet down: attest without k8s selectors, say so
                log.warning("kubelet lookup failed", pod_uid=facts.pod_uid, error=str(e))
        cgroup_id = img.cgroup_id or self._cgroup_id(info.cgroup_path)
        selectors = unix_selectors(info) | cgroup_selectors(info.cgroup_path, cgroup_id, facts)
        selectors |= k8s_selectors(pod, facts.container_id if facts else None)
        lineage = tuple(
            (p.tgid, p.exec_ns, p.enrichment.exe if p.enrichment else p.filename)
            for p in self.table.lineage(img)
        )
        img.enrichment = Attestation(
            tgid=img.tgid,
            exec_ns=img.exec_ns,
            start_ns=img.start_ns,
            ppid=info.status.ppid,
            comm=img.comm,
            exe=info.exe,
            sha256=info.sha256,
            uid=info.status.uids[1],
            gid=info.status.gids[1],
            real_uid=info.status.uids[0],
            real_gid=info.status.gids[0],
            groups=info.status.groups,
            cgroup_path=info.cgroup_path,
            cgroup_id=cgroup_id,
            lineage=lineage,
            selectors=frozenset(selectors),
            container_id=facts.container_id if facts else None,
            pod=pod,
        )
        log.debug("process attested", pid=img.tgid, exe=info.exe, selectors=sorted(selectors))
        if event_ts:
            self.m_enrich.observe(max(0, time.clock_gettime_ns(_BOOTTIME) - event_ts) / 1e9)
        for fn in self._listeners:
            fn(img, img.enrichment)

    def _cgroup_id(self, path: str | None) -> int:
        from agent.attest.cgroupfs import cgroup_id

        root = cgroup2_root(self.cfg.cgroup_root)
        try:
            return cgroup_id(root, path) if root and path else 0
        except OSError:
            return 0

    def _expire_loop(self) -> None:
        while not self._stop.wait(max(0.2, self.cfg.exit_grace_seconds / 4)):
            self.table.expire()

    # ------------------------------------------------------------ queries
    def attest(self, pid: int, timeout: float = 1.0) -> Attestation | None:
        """The attestation of the image pid runs *now*; None when unknown or unattestable."""
        current = self.source.kernel_image(pid)
        if current is None:
            self.m_lookups.labels("miss").inc()
            return None
        return self.attest_image(pid, current[1], timeout)

    def attest_image(self, tgid: int, exec_ns: int, timeout: float = 1.0) -> Attestation | None:
        """The attestation of image (tgid, exec_ns): live, or exited within the grace period.

        Waits up to `timeout` for the event and its enrichment to be processed, since a
        lookup may race the ring buffer for a process that has just started.
        """
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                img = self.table.image(tgid, exec_ns)
                if img is not None and (img.enrichment is not None or img.enrich_error):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if img is None:
                    kernel = self.source.kernel_image(tgid)
                    if kernel is None or kernel[1] != exec_ns:
                        break  # not current, and not exited within the grace period
                self._cv.wait(min(remaining, 0.05))
        if img is None or img.enrichment is None:
            self.m_lookups.labels("miss").inc()
            return None
        if img.exited_at is not None:
            self.m_lookups.labels("exited").inc()
            return replace(img.enrichment, exited=True)
        self.m_lookups.labels("hit").inc()
        return img.enrichment

    def ancestors(self, att: Attestation) -> Iterator[Attestation]:
        """The attestations of the images that started att's, nearest first, as each was
        attested, though it has exited or exec'd since (agent/attest/table.py keeps them
        by reference); those never attested (gone before their /proc could be read) are
        left out. Nothing when att's own image is no longer known."""
        img = self.table.image(att.tgid, att.exec_ns)
        if img is None:
            return
        for a in self.table.lineage(img):
            if a.enrichment is not None:
                yield a.enrichment

    def snapshot(self) -> list[Attestation]:
        return [img.enrichment for img in self.table.live() if img.enrichment is not None]
