"""`credless doctor` on the real kernel, and with a check made to fail."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agent.attest import cgroupfs

pytestmark = pytest.mark.kernel

EXPECTED = [
    "capabilities",
    "bpf_syscall",
    "kernel_headers",
    "tracefs",
    "bpffs",
    "btf",
    "cgroup_v2",
    "bcc_tracepoint",
    "cgroup_connect4",
]


def _doctor(credless_cmd, *args):
    return subprocess.run(
        [*credless_cmd, "doctor", *args], capture_output=True, text=True, timeout=120
    )


def _leftover_doctor_cgroups() -> list[str]:
    root = cgroupfs.cgroup2_root()
    return [p.name for p in Path(root).glob("credless-doctor-*")]


def test_doctor_passes_on_this_machine(credless_cmd):
    r = _doctor(credless_cmd, "--json")
    report = json.loads(r.stdout)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert r.returncode == 0, failed
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == EXPECTED
    assert _leftover_doctor_cgroups() == []


def test_doctor_text_output_one_line_per_check(credless_cmd):
    r = _doctor(credless_cmd)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert [ln.split()[1] for ln in lines] == EXPECTED
    assert all(ln.split()[0] == "ok" for ln in lines)


def test_doctor_fails_with_fix_for_missing_cgroup_mount(credless_cmd, tmp_path):
    missing = tmp_path / "no-cgroup-here"
    r = _doctor(credless_cmd, "--cgroup-root", str(missing))
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.split()[1] == "cgroup_v2")
    assert lines[i].split()[0] == "missing"
    assert f"no cgroup2 filesystem at {missing} (per /proc/mounts)" in lines[i]
    assert lines[i + 1].strip() == (
        "fix: mount -t cgroup2 none /sys/fs/cgroup/unified, or set "
        "attest.cgroup_root to the cgroup2 mount point"
    )
    report = json.loads(_doctor(credless_cmd, "--json", "--cgroup-root", str(missing)).stdout)
    by_name = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is False
    assert by_name["cgroup_connect4"]["ok"] is False
    assert by_name["bpf_syscall"]["ok"] is True


def test_doctor_rejects_a_directory_that_is_not_a_cgroup2_mount(credless_cmd, tmp_path):
    r = _doctor(credless_cmd, "--json", "--cgroup-root", str(tmp_path))
    report = json.loads(r.stdout)
    assert r.returncode == 1
    assert {c["name"] for c in report["checks"] if not c["ok"]} == {"cgroup_v2", "cgroup_connect4"}


def test_doctor_leaves_no_bpf_program_attached(credless_cmd):
    before = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True)
    _doctor(credless_cmd)
    after = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True)
    names = lambda out: sorted(p.get("name", "") for p in json.loads(out.stdout or "[]"))  # noqa: E731
    assert [n for n in names(after) if n.startswith("doctor")] == []
    assert len(names(after)) <= len(names(before))
