"""Attestation on the real kernel: exact selectors, exec, exit, and the `ps` surface."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.attest.attestor import Attestor
from agent.config import AttestSection
from tests.helpers import wait_for
from tests.kernel import cgroup_child, copied_binaries, enter_cgroup

pytestmark = pytest.mark.kernel

NOBODY, NOGROUP = 65534, 65534


@pytest.fixture
def attestor():
    registry = CollectorRegistry()
    a = Attestor(AttestSection(exit_grace_seconds=1.0), registry=registry)
    a.start()
    a.registry = registry
    try:
        yield a
    finally:
        a.stop()


def test_exact_selectors_for_a_copied_binary_as_another_uid_in_a_fresh_cgroup(attestor, procs):
    with cgroup_child() as cg, copied_binaries("sleep") as bins:
        p = subprocess.Popen(
            [str(bins["sleep"]), "30"], preexec_fn=enter_cgroup(cg, uid=NOBODY, gid=NOGROUP)
        )
        procs.append(p)
        att = attestor.attest(p.pid, timeout=5)
        assert att is not None
        sha = hashlib.sha256(bins["sleep"].read_bytes()).hexdigest()
        cg_path = "/" + cg.name
        assert att.selectors == {
            f"unix:uid:{NOBODY}",
            "unix:user:nobody",
            f"unix:gid:{NOGROUP}",
            "unix:group:nogroup",
            f"unix:path:{bins['sleep']}",
            f"unix:sha256:{sha}",
            f"cgroup:path:{cg_path}",
            f"cgroup:id:{cg.stat().st_ino}",
        }
        assert att.exe == str(bins["sleep"]) and att.comm == "copied-sleep"
        assert att.uid == NOBODY and att.cgroup_path == cg_path
        assert att.cgroup_id == cg.stat().st_ino
        assert att.lineage[0][0] == os.getpid()  # the test spawned it
        # exit: the current-pid lookup misses at once; the image answers for the grace period
        p.kill()
        p.wait()
        wait_for(lambda: attestor.attest(p.pid, timeout=0) is None, what="exit seen")
        late = wait_for(
            lambda: (
                (a := attestor.attest_image(att.tgid, att.exec_ns, timeout=0)) is not None
                and a.exited
                and a
            ),
            what="exit event processed",
        )
        assert late.selectors == att.selectors
        wait_for(
            lambda: attestor.attest_image(att.tgid, att.exec_ns, timeout=0) is None,
            timeout=10,
            what="grace period over",
        )


def test_exec_makes_a_new_image_and_the_old_one_misses(attestor, procs):
    with cgroup_child() as cg, copied_binaries("sh", "sleep") as bins:
        # the shell waits for a line on stdin, then execs into sleep
        p = subprocess.Popen(
            [str(bins["sh"]), "-c", f"read x; exec {bins['sleep']} 30"],
            stdin=subprocess.PIPE,
            preexec_fn=enter_cgroup(cg),
        )
        procs.append(p)
        first = attestor.attest(p.pid, timeout=5)
        assert first is not None and f"unix:path:{bins['sh']}" in first.selectors
        p.stdin.write(b"go\n")
        p.stdin.flush()
        second = wait_for(
            lambda: (
                (a := attestor.attest(p.pid, timeout=0.2)) is not None
                and a.exe == str(bins["sleep"])
                and a
            ),
            what="exec seen",
        )
        assert second.exec_ns > first.exec_ns and second.start_ns == first.start_ns
        assert f"unix:path:{bins['sleep']}" in second.selectors
        assert f"unix:path:{bins['sh']}" not in second.selectors
        assert attestor.attest_image(first.tgid, first.exec_ns, timeout=0) is None


def test_image_change_counter_moves_on_exec_and_exit_before_user_code_runs(attestor, procs):
    """The proxy skips its per-request bpf(2) lookup while a tgid's mapped change counter
    stays put; so the counter must move on exec and on exit, and already have moved by the
    time the new image can write anything."""
    src = attestor.source
    with cgroup_child() as cg, copied_binaries("sh", "cat") as bins:
        # the shell execs into cat on a line; cat echoes the next line back: once that echo
        # is read, the new image has run, and the counter must already show the exec
        p = subprocess.Popen(
            [str(bins["sh"]), "-c", f"read x; exec {bins['cat']}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=enter_cgroup(cg),
        )
        procs.append(p)
        wait_for(lambda: src.kernel_image(p.pid) is not None, what="process seen")
        before = src.image_changes(p.pid)
        assert before is not None, "image change counters are not mapped on this kernel"
        time.sleep(0.2)  # the process idles (blocked on read): that is what is tested
        assert src.image_changes(p.pid) == before  # nothing happened to it: no movement
        p.stdin.write(b"go\nhello\n")
        p.stdin.flush()
        assert p.stdout.readline() == b"hello\n"
        after_exec = src.image_changes(p.pid)
        assert after_exec > before
        p.stdin.close()
        p.wait(10)
        wait_for(lambda: src.image_changes(p.pid) > after_exec, 5, what="exit counted")
        assert src.kernel_image(p.pid) is None


def test_unknown_pid_is_a_miss(attestor):
    assert attestor.attest(2**22 + 11, timeout=0.1) is None


def test_processes_that_predate_the_agent_are_seeded(procs):
    p = subprocess.Popen(["sleep", "30"])
    procs.append(p)
    # exec'd before the attestor starts: it is seeded from /proc, never seen by an event
    wait_for(lambda: os.readlink(f"/proc/{p.pid}/exe").endswith("/sleep"), 10, what="exec")
    a = Attestor(AttestSection(), registry=CollectorRegistry())
    a.start()
    try:
        att = a.attest(p.pid, timeout=5)
        assert att is not None and att.exe.endswith("/sleep")
        assert att.lineage and att.lineage[0][0] == os.getpid()
    finally:
        a.stop()


# A parent that makes its child take a pid below its own, as happens once the pid counter
# wraps: it sets the namespace's last pid low (root may: ns_last_pid), then forks sleep and
# prints both pids.
LOW_CHILD = """
import os, subprocess, sys
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(sys.argv[1])
child = subprocess.Popen(["sleep", "30"])
print(os.getpid(), child.pid, flush=True)
sys.stdin.read()
child.kill()
child.wait()
"""


def test_a_predating_child_with_a_lower_pid_than_its_parent_has_its_lineage(procs):
    """Seeding reads /proc in pid order; after a wrap a child comes before its parent, and its
    attestation must still name the parent (a sub-agent's policy depends on it)."""
    parent = subprocess.Popen(
        [sys.executable, "-c", LOW_CHILD, "300"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(parent)
    ppid, child = (int(x) for x in parent.stdout.readline().split())
    # another fork on the host may take 301 first; below the parent is what matters
    assert child < ppid, (child, ppid)
    wait_for(lambda: os.readlink(f"/proc/{child}/exe").endswith("/sleep"), 10, what="exec")
    a = Attestor(AttestSection(), registry=CollectorRegistry())
    a.start()
    try:
        att = a.attest(child, timeout=5)
        assert att is not None and att.exe.endswith("/sleep")
        assert [t for t, _e, _x in att.lineage][:2] == [ppid, os.getpid()], att.lineage
    finally:
        a.stop()
        parent.stdin.close()
        parent.wait(10)


def test_metrics_count_events_and_no_loss(attestor, procs):
    for _ in range(20):
        subprocess.run(["true"], check=True)

    def execs_counted():
        text = generate_latest(attestor.registry).decode()
        n = float(text.split('credless_attest_events_total{type="exec"} ')[1].split()[0])
        return n >= 20 and text

    text = wait_for(execs_counted, what="20 exec events counted")
    assert 'credless_bpf_events_lost_total{program="process_events"} 0.0' in text
