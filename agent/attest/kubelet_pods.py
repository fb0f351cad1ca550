"""The kubelet's pod list as the agent needs it: PodInfo by pod uid, from a /pods body.

A container id from the cgroup path (resolvers.py) is looked up in `PodInfo.containers`.
The parser is sans-IO and strict: the body is untrusted input at the trust boundary, so
every field it reads is type-checked, and anything that is not a v1 PodList is a
KubeletError that says where it went wrong.

Apart from the HTTP client (kubelet.py) because parsing and fetching are separate jobs:
the parser is exercised on recorded bodies (tests/testdata/kubelet) with no TLS, token or
socket, and the selectors are built from what it returns.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from agent import jsondoc
from agent.attest.kubelet_errors import KubeletError

__all__ = ["ContainerRef", "PodInfo", "parse_pod_list"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
# Regular, init and ephemeral (kubectl debug) containers can all make outbound calls.
_STATUS_LISTS = ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses")


@dataclass(frozen=True)
class ContainerRef:
    name: str
    image: str
    image_id: str


@dataclass(frozen=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    service_account: str
    node_name: str
    labels: Mapping[str, str] = field(hash=False)
    containers: Mapping[str, ContainerRef] = field(hash=False)  # bare 64-hex id -> ref


def parse_pod_list(doc: bytes | str) -> dict[str, PodInfo]:
    """PodInfo by pod uid from a kubelet /pods body (a v1 PodList). Raises KubeletError."""
    try:
        # Decoded here rather than by json.loads, which would guess UTF-16/32 from the
        # first bytes: the kubelet writes UTF-8, and anything else is not its answer.
        data = jsondoc.loads(doc.decode("utf-8") if isinstance(doc, bytes) else doc)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise KubeletError(f"kubelet /pods response is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise KubeletError(
            "kubelet /pods response is not a JSON object "
            f"(want a v1 PodList, got {_json_type(data)})"
        )
    kind, version = data.get("kind"), data.get("apiVersion")
    if (kind, version) != ("PodList", "v1"):
        raise KubeletError(
            f"kubelet /pods response has kind {kind!r} apiVersion {version!r}, "
            "want 'PodList' 'v1'; check that the URL is the kubelet's"
        )
    items = data.get("items")
    if items is None:  # Go encodes an empty list as null
        return {}
    if not isinstance(items, list):
        raise KubeletError(f"kubelet /pods response: 'items' is {_json_type(items)}, want a list")
    pods = (_parse_pod(item, f"items[{i}]") for i, item in enumerate(items))
    return {pod.uid: pod for pod in pods}


def _parse_pod(item: Any, where: str) -> PodInfo:
    pod = _object(item, where)
    meta = _object(pod.get("metadata"), f"{where}.metadata")
    spec = _object(pod.get("spec") or {}, f"{where}.spec")
    status = _object(pod.get("status") or {}, f"{where}.status")
    return PodInfo(
        uid=_required_string(meta, "uid", f"{where}.metadata"),
        namespace=_required_string(meta, "namespace", f"{where}.metadata"),
        name=_required_string(meta, "name", f"{where}.metadata"),
        # serviceAccount is the deprecated alias of serviceAccountName. Unset, the pod runs
        # as the namespace's `default` account (what the ServiceAccount admission plugin
        # fills in); in kubelet output that is seen only for static pods.
        service_account=(
            _optional_string(spec, "serviceAccountName", f"{where}.spec")
            or _optional_string(spec, "serviceAccount", f"{where}.spec")
            or "default"
        ),
        node_name=_optional_string(spec, "nodeName", f"{where}.spec"),
        labels=MappingProxyType(_labels(meta.get("labels"), f"{where}.metadata.labels")),
        containers=MappingProxyType(_containers(status, f"{where}.status")),
    )


def _containers(status: dict, where: str) -> dict[str, ContainerRef]:
    refs: dict[str, ContainerRef] = {}
    for key in _STATUS_LISTS:
        statuses = status.get(key)
        if statuses is None:
            continue
        if not isinstance(statuses, list):
            raise KubeletError(
                f"kubelet /pods response: {where}.{key} is {_json_type(statuses)}, want a list"
            )
        for j, entry in enumerate(statuses):
            cs = _object(entry, f"{where}.{key}[{j}]")
            cid = _bare_container_id(cs.get("containerID"))
            if cid is None:
                continue  # not started yet (pending pod): nothing in a cgroup can match it
            refs[cid] = ContainerRef(
                name=_required_string(cs, "name", f"{where}.{key}[{j}]"),
                image=_optional_string(cs, "image", f"{where}.{key}[{j}]"),
                image_id=_optional_string(cs, "imageID", f"{where}.{key}[{j}]"),
            )
    return refs


def _bare_container_id(value: Any) -> str | None:
    """`containerd://<id>`, `docker://<id>`, `cri-o://<id>` -> `<id>`, if 64 hex."""
    if not isinstance(value, str):
        return None
    scheme, sep, cid = value.partition("://")
    # Anything else can never equal an id taken from a cgroup path, so it is dropped.
    return cid if scheme and sep and _HEX64.fullmatch(cid) else None


def _labels(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    labels = _object(value, where)
    if not all(isinstance(v, str) for v in labels.values()):
        raise KubeletError(f"kubelet /pods response: {where} has a non-string value")
    return dict(labels)


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise KubeletError(
            f"kubelet /pods response: {where} is {_json_type(value)}, want an object"
        )
    return value


def _required_string(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise KubeletError(
            f"kubelet /pods response: {where}.{key} is missing or not a non-empty string"
        )
    return value


def _optional_string(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise KubeletError(
            f"kubelet /pods response: {where}.{key} is {_json_type(value)}, want a string"
        )
    return value


def _json_type(value: Any) -> str:
    for py, name in (
        (bool, "boolean"),
        (dict, "object"),
        (list, "array"),
        (str, "string"),
        ((int, float), "number"),
    ):
        if isinstance(value, py):
            return name
    return "null"
