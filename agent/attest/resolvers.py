"""What a cgroup v2 path says about the process inside it: systemd unit, container, pod.

Pure functions, no I/O: the caller reads `/proc/<pid>/cgroup` (see cgroupfs.py) and
passes the path after `0::`. Everything here is a statement about *names* in that path.
Names are only as trustworthy as whoever could create the directory, so the rules
below are strict about shape (a `docker-foo.scope` is a unit, not a container) and
`CgroupFacts.user_manager_uid` says when a non-root user chose the names.

Rules, in the order they are applied:

1. Container: the *deepest* component that is a container cgroup wins. Nested setups
   (kind or k3d nodes seen from the host, docker-in-docker) put the workload's container
   below the node's container, and the workload is the thing being attested.
   Recognised shapes, `<id>` always exactly 64 lower-case hex digits:
     docker-<id>.scope            docker, systemd cgroup driver (also cri-dockerd)
     docker/<id>                  docker, cgroupfs driver (parent must be `docker`)
     cri-containerd-<id>.scope    containerd CRI, systemd driver
     <id> directly in a pod dir   kubelet cgroupfs driver; the path does not name the
                                  runtime (containerd or cri-dockerd), so runtime is None
                                  and the kubelet's `containerID` scheme is the authority
     crio-<id>.scope, crio-<id>   CRI-O, systemd and cgroupfs managers
     libpod-<id>.scope, libpod-<id>  podman, systemd and cgroupfs managers
   `crio-conmon-<id>` and `libpod-conmon-<id>` hold conmon, the runtime's monitor
   process, not the container: they are reported as units, never as containers.
2. Components *below* the chosen container (`/init.scope` of a container running
   systemd, crun's `container` sub-group, anything the container created) are ignored
   for every fact: they were named by the workload, not by the host.
3. Pod: the deepest kubelet pod cgroup above the container (or anywhere, when there is
   no container). systemd driver: `<root>kubepods[-<qos>]-pod<uid>.slice` directly in
   `<root>kubepods[-<qos>].slice`; the uid has `_` for `-` (systemd reserves `-` for
   slice nesting) and is reported dashed. cgroupfs driver: `pod<uid>` in `kubepods`,
   `kubepods/burstable` or `kubepods/besteffort`. Static pods have a 32-hex uid (the
   kubelet hashes the manifest); it is reported as-is, matching the kubelet's /pods.
   QoS: no class segment means guaranteed.
4. systemd unit: the innermost `.service`/`.scope` component within rule 2's limit, so a
   container's own scope (`docker-<id>.scope`) is its unit, and a user service
   (`user@1000.service/app.slice/foo.service`) is `foo.service`. Slice: the innermost
   `.slice` above the unit (or anywhere, without a unit); None directly under the root.

A pod uid alone does not make a process a pod's container (conmon sits in the pod slice
too): attest Kubernetes workloads only when `container_id` is set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CgroupFacts", "CgroupPathError", "resolve_cgroup"]


class CgroupPathError(ValueError):
    """The string is not a cgroup v2 path that can be resolved from this namespace."""


@dataclass(frozen=True)
class CgroupFacts:
    systemd_unit: str | None = None
    systemd_slice: str | None = None
    container_runtime: str | None = None  # "docker" | "containerd" | "crio" | "podman"
    container_id: str | None = None  # full 64-hex id
    pod_uid: str | None = None  # dashed 8-4-4-4-12, or 32 hex for static pods
    qos_class: str | None = None  # "guaranteed" | "burstable" | "besteffort"
    # The uid whose systemd user manager (user@<uid>.service) owns the subtree the facts
    # came from. That user chose every name below it, container and pod names included,
    # so selectors for system units and root containers must not trust such facts.
    user_manager_uid: int | None = None


_HEX64 = re.compile(r"[0-9a-f]{64}")
# A container scope: the prefix names the runtime; `.scope` is mandatory where the
# runtime only ever uses systemd naming for that prefix (docker, cri-containerd).
_CONTAINER = re.compile(
    r"(?P<prefix>docker|cri-containerd|crio|libpod)-(?P<conmon>conmon-)?"
    r"(?P<id>[0-9a-f]{64})(?P<scope>\.scope)?"
)
_RUNTIME = {"docker": "docker", "cri-containerd": "containerd", "crio": "crio", "libpod": "podman"}
_SCOPE_REQUIRED = frozenset({"docker", "cri-containerd"})

_UUID_DASHED = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_UUID_SYSTEMD = r"[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}"
_STATIC_UID = r"[0-9a-f]{32}"
# `<root>` is the kubelet's --cgroup-root turned into a slice prefix (kind: `kubelet-`).
_POD_SLICE = re.compile(
    r"(?P<parent>(?:[a-z0-9_.]+-)*kubepods(?:-(?P<qos>burstable|besteffort))?)"
    rf"-pod(?P<uid>{_UUID_SYSTEMD}|{_STATIC_UID})\.slice"
)
_POD_DIR = re.compile(rf"pod(?P<uid>{_UUID_DASHED}|{_STATIC_UID})")
_QOS_DIRS = frozenset({"burstable", "besteffort"})

# systemd unit names: ASCII letters, digits, `:_.\-`, one optional `@` for templates.
_UNIT = re.compile(r"[A-Za-z0-9:_.\\-]+(?:@[A-Za-z0-9:_.\\-]*)?\.(?:service|scope)")
_SLICE = re.compile(r"[A-Za-z0-9:_.\\-]+\.slice")
_USER_MANAGER = re.compile(r"user@(?P<uid>[0-9]+)\.service")


def resolve_cgroup(path: str) -> CgroupFacts:
    """Facts named by a cgroup v2 path such as `/system.slice/nginx.service`.

    Raises CgroupPathError for a path that is not absolute or that climbs out of the
    reader's cgroup namespace (`/../..`): such a path cannot be placed in the hierarchy.
    """
    parts = _components(path)
    pods = {i: pod for i in range(len(parts)) if (pod := _pod_at(parts, i))}

    container: tuple[int, str | None, str] | None = None
    for i in range(len(parts)):
        found = _container_at(parts, i, pods)
        if found:
            container = (i, *found)  # keep going: the deepest one wins (rule 1)
    limit = container[0] + 1 if container else len(parts)
    visible = parts[:limit]  # rule 2

    pod_index = max((i for i in pods if i < limit), default=None)
    pod_uid, qos = pods[pod_index] if pod_index is not None else (None, None)

    unit_index = _innermost(visible, _UNIT)
    slice_end = unit_index if unit_index is not None else limit
    slice_index = _innermost(visible[:slice_end], _SLICE)

    return CgroupFacts(
        systemd_unit=visible[unit_index] if unit_index is not None else None,
        systemd_slice=visible[slice_index] if slice_index is not None else None,
        container_runtime=container[1] if container else None,
        container_id=container[2] if container else None,
        pod_uid=pod_uid,
        qos_class=qos,
        user_manager_uid=_user_manager_uid(visible),
    )


def _components(path: str) -> list[str]:
    if not path.startswith("/"):
        raise CgroupPathError(
            f"cgroup path {path!r} is not absolute: pass the part after '0::' of a "
            "/proc/<pid>/cgroup line, e.g. '/system.slice/nginx.service'"
        )
    parts = [p for p in path.split("/") if p]
    if ".." in parts:
        raise CgroupPathError(
            f"cgroup path {path!r} lies outside the reader's cgroup namespace; run the "
            "agent in the host cgroup namespace (on Kubernetes: a privileged container, "
            "which containerd and CRI-O keep there) so paths start at the real root"
        )
    return parts


def _container_at(
    parts: list[str], i: int, pods: dict[int, tuple[str, str]]
) -> tuple[str | None, str] | None:
    """(runtime, id) if parts[i] is a container's own cgroup, else None."""
    name = parts[i]
    m = _CONTAINER.fullmatch(name)
    if m:
        if m["conmon"]:
            return None  # conmon, the runtime's monitor: not the container itself
        if m["prefix"] in _SCOPE_REQUIRED and not m["scope"]:
            return None
        return _RUNTIME[m["prefix"]], m["id"]
    if _HEX64.fullmatch(name) and i > 0:
        if parts[i - 1] == "docker":
            return "docker", name
        if i - 1 in pods and _POD_DIR.fullmatch(parts[i - 1]):
            return None, name  # kubelet cgroupfs layout: the runtime is not in the path
    return None


def _pod_at(parts: list[str], i: int) -> tuple[str, str] | None:
    """(uid, qos class) if parts[i] is a kubelet pod cgroup, else None."""
    parent = parts[i - 1] if i > 0 else ""
    m = _POD_SLICE.fullmatch(parts[i])
    if m:
        # systemd enforces that `a-b.slice` lives in `a.slice`; a directory that merely
        # looks like a pod slice elsewhere was made by hand, not by the kubelet.
        if parent != m["parent"] + ".slice":
            return None
        return m["uid"].replace("_", "-"), m["qos"] or "guaranteed"
    m = _POD_DIR.fullmatch(parts[i])
    if m:
        if parent == "kubepods":
            return m["uid"], "guaranteed"
        if parent in _QOS_DIRS and i > 1 and parts[i - 2] == "kubepods":
            return m["uid"], parent
    return None


def _innermost(parts: list[str], pattern: re.Pattern[str]) -> int | None:
    for i in range(len(parts) - 1, -1, -1):
        if pattern.fullmatch(parts[i]):
            return i
    return None


def _user_manager_uid(parts: list[str]) -> int | None:
    for name in parts:
        m = _USER_MANAGER.fullmatch(name)
        if m:
            return int(m["uid"])
    return None
