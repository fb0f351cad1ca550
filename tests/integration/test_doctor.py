"""`credless doctor` on the real kernel, and with a check made to fail; its kubelet checks
against a FAKE kubelet (tests/fakes/kubelet.py; the matrix is in test_kubelet_authz.py)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.attest import cgroupfs
from tests.kernel import bpf_program_ids, programs_left_behind

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
    "managed_cgroups",  # not checked without a --config naming patterns
    "kubelet",  # not enabled without a --config that enables it
]
KUBELET = ["kubelet_tls", "kubelet_authz", "kubelet_grant"]
TOKEN = "agent.token.value"
AGENT = "system:serviceaccount:credless:credless"


@dataclass
class DoctorRun:
    returncode: int
    stdout: str
    stderr: str
    pid: int  # the doctor's own: it names its throwaway cgroup after it

    @property
    def throwaway_cgroup(self) -> Path:
        """The cgroup this run attached its connect4 check to (agent/doctor/host.py); a
        doctor running alongside has another."""
        return Path(cgroupfs.cgroup2_root()) / f"credless-doctor-{self.pid}"


def _doctor(credless_cmd, *args) -> DoctorRun:
    with subprocess.Popen(
        [*credless_cmd, "doctor", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as p:
        out, err = p.communicate(timeout=120)
    return DoctorRun(p.returncode, out, err, p.pid)


def test_doctor_passes_on_this_machine(credless_cmd):
    r = _doctor(credless_cmd, "--json")
    report = json.loads(r.stdout)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert r.returncode == 0, failed
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == EXPECTED
    connect4 = next(c for c in report["checks"] if c["name"] == "cgroup_connect4")
    assert str(r.throwaway_cgroup) in connect4["detail"]  # the check made it ...
    assert not r.throwaway_cgroup.exists()  # ... and removed it


def test_doctor_text_output_one_line_per_check(credless_cmd):
    r = _doctor(credless_cmd)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert [ln.split()[1] for ln in lines] == EXPECTED
    assert all(ln.split()[0] == "ok" for ln in lines)


@pytest.fixture
def kubelet_config(tmp_path):
    """kubelet_config(version, grants) -> a credless.toml whose [attest.kubelet] is a
    running FAKE kubelet of that version, granting the agent's token those resources."""
    from contextlib import ExitStack

    from tests.fakes.kubelet import FakeKubelet, running
    from tests.tlsca import TestCA

    ca = TestCA(tmp_path)
    cert, key = ca.issue("kubelet")
    (tmp_path / "token").write_text(TOKEN)
    with ExitStack() as stack:

        def make(version, grants: set[str]) -> Path:
            fake = FakeKubelet(cert, key, version, {TOKEN: AGENT}, {AGENT: grants})
            stack.enter_context(running(fake))
            path = tmp_path / "credless.toml"
            path.write_text(
                "[attest.kubelet]\nenabled = true\n"
                f'url = "{fake.url}"\ntoken_file = "{tmp_path / "token"}"\n'
                f'ca_file = "{ca.cert_path}"\n'
            )
            return path

        yield make


def test_doctor_on_a_node_whose_kubelet_serves_pods(credless_cmd, kubelet_config):
    from tests.fakes.kubelet import KubeletVersion

    config = kubelet_config(KubeletVersion((1, 33)), {"nodes/pods"})
    r = _doctor(credless_cmd, "--json", "--config", str(config))
    report = json.loads(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    by_name = {c["name"]: c for c in report["checks"]}
    assert [c["name"] for c in report["checks"]] == EXPECTED[:-1] + KUBELET
    assert all(by_name[n]["ok"] for n in KUBELET)
    assert by_name["kubelet_grant"]["detail"].startswith("least privilege")


def test_doctor_on_an_old_kubelet_names_the_grant_to_add(credless_cmd, kubelet_config):
    from tests.fakes.kubelet import KubeletVersion

    config = kubelet_config(KubeletVersion((1, 31)), {"nodes/pods"})
    r = _doctor(credless_cmd, "--config", str(config))
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.split()[1] == "kubelet_authz")
    assert lines[i].split()[0] == "missing"
    assert "answered 403 Forbidden: this kubelet authorizes GET /pods as 'nodes/proxy'" in lines[i]
    assert lines[i + 1].strip().startswith("fix: this kubelet has no fine-grained authorization")
    assert "kubectl apply -f deploy/k8s/rbac-nodes-proxy.yaml" in lines[i + 1]
    assert "agent.token.value" not in r.stdout + r.stderr


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
    before = bpf_program_ids()
    assert _doctor(credless_cmd).returncode == 0
    assert programs_left_behind(before) == set()
