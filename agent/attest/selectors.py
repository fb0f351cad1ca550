"""Attestations and their selectors, in SPIRE's textual forms.

Operators write registration entries with selectors they already know from SPIRE
(`unix:uid:1000`, `k8s:ns:prod`, ...), so the forms and meanings follow SPIRE's workload
attestors: unix uid/gid are the *effective* ids (SPIRE's unix plugin takes uids[1]), user
and group names are resolved in the agent's (host's) user database, `k8s:` selectors come
from the kubelet's view of the pod. credless adds `cgroup:path:`, `cgroup:id:`,
`container:id:` and `container:runtime:` for hosts without Kubernetes.
"""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from agent.attest.procfs import ProcInfo


@dataclass(frozen=True)
class Attestation:
    """Who a process image is: a frozen snapshot, safe to hand to other components."""

    tgid: int
    exec_ns: int
    start_ns: int
    ppid: int
    comm: str
    exe: str
    sha256: str | None
    uid: int  # effective
    gid: int  # effective
    real_uid: int
    real_gid: int
    groups: tuple[int, ...]
    cgroup_path: str | None
    cgroup_id: int
    lineage: tuple[tuple[int, int, str], ...]  # ancestors (tgid, exec_ns, exe), nearest first
    selectors: frozenset[str]
    container_id: str | None = None
    pod: Any = None  # agent.attest.kubelet_pods.PodInfo when known
    exited: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return {
            "pid": self.tgid,
            "exec_ns": self.exec_ns,
            "start_ns": self.start_ns,
            "ppid": self.ppid,
            "comm": self.comm,
            "exe": self.exe,
            "sha256": self.sha256,
            "uid": self.uid,
            "gid": self.gid,
            "cgroup": self.cgroup_path,
            "cgroup_id": self.cgroup_id,
            "exited": self.exited,
            "pod": f"{self.pod.namespace}/{self.pod.name}" if self.pod else None,
            "lineage": [{"pid": t, "exe": e} for t, _, e in self.lineage],
            "selectors": sorted(self.selectors),
        }


@lru_cache(maxsize=4096)
def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


@lru_cache(maxsize=4096)
def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def unix_selectors(info: ProcInfo) -> set[str]:
    euid, egid = info.status.uids[1], info.status.gids[1]
    out = {f"unix:uid:{euid}", f"unix:gid:{egid}", f"unix:path:{info.exe}"}
    if (name := _user_name(euid)) is not None:
        out.add(f"unix:user:{name}")
    if (name := _group_name(egid)) is not None:
        out.add(f"unix:group:{name}")
    for g in info.status.groups:
        out.add(f"unix:supplementary_gid:{g}")
        if (name := _group_name(g)) is not None:
            out.add(f"unix:supplementary_group:{name}")
    if info.sha256:
        out.add(f"unix:sha256:{info.sha256}")
    return out


def cgroup_selectors(cgroup_path: str | None, cgroup_id: int, facts: Any) -> set[str]:
    out = {f"cgroup:id:{cgroup_id}"}
    if cgroup_path:
        out.add(f"cgroup:path:{cgroup_path}")
    if facts is None:
        return out
    if facts.user_manager_uid is not None:
        # Below user@UID.service a user creates cgroups of any name, including ones shaped
        # like another workload's container scope or a system unit: nothing in such a path
        # is evidence of anything but the user, so only user-scoped selectors come from it.
        out.add(f"systemd:user:{facts.user_manager_uid}")
        if facts.systemd_unit:
            out.add(f"systemd:user-unit:{facts.systemd_unit}")
        return out
    if facts.systemd_unit:
        out.add(f"systemd:id:{facts.systemd_unit}")
    if facts.systemd_slice:
        out.add(f"systemd:slice:{facts.systemd_slice}")
    if facts.container_id:
        out.add(f"container:id:{facts.container_id}")
        if facts.container_runtime:
            out.add(f"container:runtime:{facts.container_runtime}")
            if facts.container_runtime == "docker":
                out.add(f"docker:id:{facts.container_id}")
    return out


def k8s_selectors(pod: Any, container_id: str | None) -> set[str]:
    """Pod selectors only for a process inside one of the pod's containers: other processes
    in the pod's cgroup (conmon, pause) are not the workload."""
    ref = pod.containers.get(container_id) if pod is not None and container_id else None
    if ref is None:
        return set()
    out = {
        f"k8s:ns:{pod.namespace}",
        f"k8s:sa:{pod.service_account}",
        f"k8s:pod-name:{pod.name}",
        f"k8s:pod-uid:{pod.uid}",
        f"k8s:node-name:{pod.node_name}",
    }
    for k, v in pod.labels.items():
        out.add(f"k8s:pod-label:{k}:{v}")
    out.add(f"k8s:container-name:{ref.name}")
    if ref.image:
        out.add(f"k8s:container-image:{ref.image}")
    return out
