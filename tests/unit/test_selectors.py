"""Selectors from attestation facts, in SPIRE's forms; cgroup-name spoofing is not evidence."""

from __future__ import annotations

from agent.attest import resolvers
from agent.attest.kubelet_pods import parse_pod_list
from agent.attest.procfs import ProcInfo, ProcStatus
from agent.attest.selectors import cgroup_selectors, k8s_selectors, unix_selectors
from tests.conftest import TESTDATA

POD_UID = "6513270e-269e-4d37-b2a7-4de452e6b438"
CID = "ca7d6a7c30b2672fc2122c1073eed6c5a42e0b7706d85b6c8a983e3d51599c48"


def info(uids=(1000, 0, 0, 0), gids=(1000, 0, 0, 0), groups=(), sha="ab" * 32):
    st = ProcStatus(name="x", tgid=1, ppid=0, uids=uids, gids=gids, groups=groups)
    return ProcInfo(
        exe="/usr/bin/agent",
        sha256=sha,
        exe_dev=1,
        exe_ino=2,
        status=st,
        cgroup_path="/",
        start_ticks=1,
    )


def test_unix_selectors_use_effective_ids_like_spire():
    sels = unix_selectors(info(uids=(1000, 0, 0, 0), gids=(1000, 0, 0, 0), groups=(0,)))
    assert sels == {
        "unix:uid:0",
        "unix:user:root",
        "unix:gid:0",
        "unix:group:root",
        "unix:supplementary_gid:0",
        "unix:supplementary_group:root",
        "unix:path:/usr/bin/agent",
        f"unix:sha256:{'ab' * 32}",
    }


def test_unknown_ids_have_no_name_selector_and_unhashed_has_no_sha():
    sels = unix_selectors(info(uids=(0, 4000123, 0, 0), gids=(0, 4000123, 0, 0), sha=None))
    assert sels == {"unix:uid:4000123", "unix:gid:4000123", "unix:path:/usr/bin/agent"}


def test_systemd_service_selectors():
    path = "/system.slice/mcp-agent.service"
    sels = cgroup_selectors(path, 42, resolvers.resolve_cgroup(path))
    assert sels == {
        "cgroup:id:42",
        f"cgroup:path:{path}",
        "systemd:id:mcp-agent.service",
        "systemd:slice:system.slice",
    }


def test_docker_container_selectors():
    path = f"/system.slice/docker-{CID}.scope"
    sels = cgroup_selectors(path, 7, resolvers.resolve_cgroup(path))
    assert {f"container:id:{CID}", "container:runtime:docker", f"docker:id:{CID}"} <= sels


def test_user_delegated_cgroup_shaped_like_a_pod_gives_only_user_selectors():
    path = (
        f"/user.slice/user-1000.slice/user@1000.service/kubepods.slice/"
        f"kubepods-pod{POD_UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope"
    )
    facts = resolvers.resolve_cgroup(path)
    sels = cgroup_selectors(path, 9, facts)
    assert not any(s.startswith(("container:", "systemd:id:", "docker:")) for s in sels)
    assert "systemd:user:1000" in sels


def test_k8s_selectors_from_real_kubelet_output():
    pods = parse_pod_list((TESTDATA / "kubelet/pods.json").read_bytes())
    pod = pods[POD_UID]
    sels = k8s_selectors(pod, CID)
    assert f"k8s:pod-uid:{POD_UID}" in sels
    assert f"k8s:ns:{pod.namespace}" in sels and f"k8s:sa:{pod.service_account}" in sels
    assert f"k8s:pod-name:{pod.name}" in sels and f"k8s:node-name:{pod.node_name}" in sels
    assert f"k8s:container-name:{pod.containers[CID].name}" in sels
    assert all(f"k8s:pod-label:{k}:{v}" in sels for k, v in pod.labels.items())


def test_k8s_selectors_need_a_container_of_the_pod():
    pod = parse_pod_list((TESTDATA / "kubelet/pods.json").read_bytes())[POD_UID]
    assert k8s_selectors(pod, None) == set()  # e.g. conmon in the pod's cgroup
    assert k8s_selectors(pod, "f" * 64) == set()  # a container of another pod
    assert k8s_selectors(None, CID) == set()
