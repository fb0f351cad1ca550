"""bench-start: what an agent start costs, and where (a DaemonSet pod's time to ready).

Every start compiles the kernel programs with BCC (there is no object cache) and reads four
task_struct offsets from the kernel's BTF. This prints, each next to its floor in the same
run:

- the CPU of each program's compile, next to BCC's own floor (a program that includes only
  <uapi/linux/bpf.h>: every compile pays it);
- the CPU of the BTF offsets;
- a whole agent start in the test world (managed cgroup, redirect, metrics), wall time to
  its `ready` event and its CPU, next to the interpreter importing the agent and nothing
  else;
- that agent's stop, SIGTERM to exit (what a restart without a handover waits for).

    python -m tests.bench.bench_start [--runs N]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.attest.btf import offset_cflags
from agent.attest.events import compile_flags
from agent.bpfload import compile_program
from agent.inject.cgroup_watch import tracepoint_offsets
from agent.inject.redirect import compile_flags as redirect_flags
from tests.kernel import bpf_pin_dir
from tests.world import build_world, server_table

FLOOR = b"#include <uapi/linux/bpf.h>\nint nothing(void *ctx) { return 0; }\n"


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def median_cpu(work: Callable[[], object], runs: int) -> float:
    spent = []
    for _ in range(runs):
        before = cpu()
        work()
        spent.append(cpu() - before)
    return statistics.median(spent)


def compile_and_drop(names: tuple[str, ...], flags: list[str]) -> Callable[[], None]:
    def work() -> None:
        compile_program(*names, cflags=flags).cleanup()

    return work


def programs(runs: int) -> None:
    from bcc import BPF

    floor = median_cpu(lambda: BPF(text=FLOOR).cleanup(), runs)
    with bpf_pin_dir("credless-bench") as pins:
        pinned = f'-DPIN_DIR="{pins}"'
        events = compile_flags(64, str(pins))
        watch = ["-DWATCH_LEVELS=2ULL", *tracepoint_offsets()]
        injecting = redirect_flags(pins) + watch
        # the last is what an agent with inject.managed_cgroups compiles, one object
        # (agent/bpfload.py); one that does not inject compiles the first only
        for names, flags in (
            (("process_events",), events),
            (("redirect",), redirect_flags(pins)),
            (("cgroup_watch",), [pinned, *watch]),
            (("redirect", "cgroup_watch"), injecting),
            (
                ("process_events", "redirect", "cgroup_watch"),
                events + [f for f in injecting if f not in events],
            ),
        ):
            spent = median_cpu(compile_and_drop(names, flags), runs)
            print(
                f"start-bench: program={'+'.join(names)} compile_cpu_s={spent:.2f}"
                f" (bcc floor {floor:.2f})"
            )
    print(f"start-bench: btf_offsets_cpu_s={median_cpu(offset_cflags.__wrapped__, runs):.2f}")


DISCARD = "http://127.0.0.1:9/mcp"  # never dialled: the agent only redirects it


def agent_starts(runs: int) -> None:
    # a start as a service manager makes it (`python -m agent run`), not the test suite's
    # fork of a zygote that imported the agent already (tests/zygote.py); and its CPU is
    # ours to count only as our own child's
    os.environ["CREDLESS_TEST_AGENT_EXEC"] = "1"
    imports = []
    for _ in range(runs):
        before = children_cpu()
        subprocess.run([sys.executable, "-c", "import agent.cli, agent.daemon"], check=True)
        imports.append(children_cpu() - before)
    ready, spent, stopped = [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            before = children_cpu()
            with build_world(Path(tmp), "spiffe://example.org/bench") as world:
                started = time.perf_counter()
                # a server (passthrough: no authorization server) so that it injects
                agent = world.start_agent(server_table("bench", DISCARD, mode="passthrough"))
                ready.append(time.perf_counter() - started)
                stopping = time.perf_counter()
                agent.stop()  # SIGTERM: every component stopped, every BPF link detached
                stopped.append(time.perf_counter() - stopping)
            spent.append(children_cpu() - before)  # the agent is reaped: its whole life
    print(
        f"start-bench: agent ready_s={statistics.median(ready):.2f} "
        f"cpu_s={statistics.median(spent):.2f} "
        f"(interpreter and imports only: cpu_s={statistics.median(imports):.2f})"
    )
    print(f"start-bench: agent stop_s={statistics.median(stopped):.2f} (SIGTERM to exit)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="median of this many (default 3)")
    args = ap.parse_args()
    programs(args.runs)
    agent_starts(args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
