"""bench-attest: an exec storm against the real attestor; every exec must be seen.

Spawns EXECS short processes (two shell loops of /bin/true, as fast as the machine allows)
plus a burst of BURST concurrent ones (/bin/sleep), all in a throwaway cgroup, while the
attestor runs in this process. Counts the exec events that arrive for that cgroup, reads the
kernel's loss counter, measures event-to-attestation latency for the images that lived long
enough to be read, and this process's CPU time (the spawners are children, not counted).

Prints one line:
attest-bench: execs=N seen=N lost=N p99_enrich_ms=X agent_cpu_s=Y
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import subprocess
import threading
import time

from prometheus_client import CollectorRegistry

from agent.attest.attestor import Attestor
from agent.attest.table import EV_EXEC
from agent.config import AttestSection
from tests.helpers import wait_for
from tests.kernel import cgroup_child, enter_cgroup


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--execs", type=int, default=20000)
    ap.add_argument("--burst", type=int, default=2000)
    args = ap.parse_args()

    attestor = Attestor(AttestSection(), registry=CollectorRegistry())
    attestor.start()
    seen = {"n": 0}
    drained = threading.Event()
    latencies: list[float] = []
    lock = threading.Lock()
    try:
        with cgroup_child("credless-bench") as cg:
            cg_id = cg.stat().st_ino

            def on_event(ev):
                if (
                    ev.type == EV_EXEC
                    and ev.cgroup_id == cg_id
                    and ev.filename.rsplit("/", 1)[-1] in ("true", "sleep")
                ):
                    seen["n"] += 1

            def on_attested(img, _att):
                if img.cgroup_id != cg_id:
                    return
                if img.comm == "cat":  # the sentinel below, not part of the storm
                    drained.set()
                elif img.event_ts_ns:
                    lat = (time.clock_gettime_ns(time.CLOCK_BOOTTIME) - img.event_ts_ns) / 1e6
                    with lock:
                        latencies.append(lat)

            attestor.add_event_listener(on_event)
            attestor.add_listener(on_attested)
            lost_before = attestor.lost_events()
            cpu_before = cpu_seconds()
            half = args.execs // 2
            loops = [
                subprocess.Popen(
                    ["bash", "-c", f"for ((i=0;i<{n};i++)); do /bin/true; done"],
                    preexec_fn=enter_cgroup(cg),
                )
                for n in (half, args.execs - half)
            ]
            t0 = time.monotonic()
            for p in loops:
                p.wait()
            storm_s = time.monotonic() - t0
            burst = subprocess.Popen(
                ["bash", "-c", f"for i in {{1..{args.burst}}}; do /bin/sleep 1 & done; wait"],
                preexec_fn=enter_cgroup(cg),
            )
            burst.wait()
            expected = args.execs + args.burst
            with contextlib.suppress(TimeoutError):  # a shortfall is the figure printed
                wait_for(lambda: seen["n"] >= expected, 30, interval=0.1, what="every exec")
            # enrichment is one FIFO queue: once a process exec'd now is attested, every
            # image queued before it has been
            sentinel = subprocess.Popen(["cat"], stdin=subprocess.PIPE, preexec_fn=enter_cgroup(cg))
            drained.wait(30)
            sentinel.kill()
            sentinel.wait()
            cpu = cpu_seconds() - cpu_before
            lost = attestor.lost_events() - lost_before
    finally:
        attestor.stop()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan")
    print(
        f"# storm: {args.execs} execs in {storm_s:.1f}s ({args.execs / storm_s:.0f}/s), "
        f"attested before exit: {len(latencies)}",
        flush=True,
    )
    print(
        f"attest-bench: execs={expected} seen={seen['n']} lost={lost} "
        f"p99_enrich_ms={p99:.2f} agent_cpu_s={cpu:.2f}",
        flush=True,
    )
    return 0 if seen["n"] == expected and lost == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
