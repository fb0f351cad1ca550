"""The Kubernetes manifests validate offline (strict) and agree with each other and with the
agent's config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from agent import config, config_values
from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
VENV_BIN = Path(sys.executable).parent
# The Kubernetes API the manifests are checked against (kubernetes-validate ships its schemas).
K8S_VERSION = "1.33.0"


# ------------------------------------------------------------------------- kubernetes
def _manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(path: str) -> dict:
    (doc,) = _docs(K8S / path)
    return doc


def _agent_config(tmp_path: Path) -> config.Config:
    data = _one("configmap.yaml")["data"]
    (tmp_path / "credless.toml").write_text(data["credless.toml"])
    return config.load(tmp_path / "credless.toml")


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == [p.name for p in _manifests()]


def test_manifests_validate_strictly_against_kubernetes_schemas():
    # strict really is strict: an unknown field is refused
    bad = _one("daemonset.yaml")
    bad["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    for path in _manifests():
        for doc in _docs(path):
            if path.name == "podmonitor.yaml":
                # a prometheus-operator CRD: kubernetes-validate has no schema for it, checked
                # in test_podmonitor_matches_the_crd_and_selects_the_daemonset instead
                with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
                continue
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# The part of monitoring.coreos.com/v1 PodMonitor's openAPIV3Schema (prometheus-operator
# example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml) that the manifest
# uses; unknown fields are refused, as the API server's structural pruning would drop them.
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "action": {
            "enum": [
                "replace",
                "Replace",
                "keep",
                "Keep",
                "drop",
                "Drop",
                "hashmod",
                "HashMod",
                "labelmap",
                "LabelMap",
                "labeldrop",
                "LabelDrop",
                "labelkeep",
                "LabelKeep",
                "lowercase",
                "Lowercase",
                "uppercase",
                "Uppercase",
                "keepequal",
                "KeepEqual",
                "dropequal",
                "DropEqual",
            ]
        },
        "modulus": {"type": "integer"},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "separator": {"type": "string"},
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "targetLabel": {"type": "string"},
    },
}
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
    r"(([0-9]+)s)?(([0-9]+)ms)?)$",
}
PODMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {"type": "object"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "matchExpressions": {"type": "array"},
                    },
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": _RELABEL},
                            "metricRelabelings": {"type": "array", "items": _RELABEL},
                        },
                    },
                },
            },
        },
    },
}


def _pod_spec() -> dict:
    return _one("daemonset.yaml")["spec"]["template"]["spec"]


def _metrics_port(tmp_path: Path) -> int:
    address = config_values.parse_listen(_agent_config(tmp_path).metrics.listen)
    assert address is not None
    return address[1]


def test_podmonitor_matches_the_crd_and_selects_the_daemonset(tmp_path):
    pm = _one("podmonitor.yaml")
    jsonschema.validate(pm, PODMONITOR_SCHEMA)
    ds = _one("daemonset.yaml")
    assert pm["metadata"]["namespace"] == ds["metadata"]["namespace"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # by number: the pod declares no ports (test_daemonset_hands_over_on_update)
    endpoints = pm["spec"]["podMetricsEndpoints"]
    assert [e.get("portNumber") for e in endpoints] == [_metrics_port(tmp_path)] * len(endpoints)


def test_metrics_service_and_ports_reach_the_agents_metrics_endpoint(tmp_path):
    svc = _one("service-metrics.yaml")
    ds = _one("daemonset.yaml")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    cfg = _agent_config(tmp_path)
    host, port = config_values.parse_listen(cfg.metrics.listen)
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {port}
    # Prometheus scrapes the pod IP (the node's, with hostNetwork): not reachable on loopback
    assert cfg.metrics.expose and host in ("0.0.0.0", "::")  # noqa: S104, cfg.metrics.listen
    container = _pod_spec()["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] == port and get.get("host") == "127.0.0.1", probe
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_daemonset_hands_over_on_update(tmp_path):
    """A rollout is a handover on each node (docs/restart.md): the new pod starts beside the
    old one (maxSurge 1, never an agent-less moment: maxUnavailable 0), takes over through
    the handover socket on the run_dir hostPath, and can be scheduled there at all: a
    hostNetwork pod's declared ports are hostPorts, which two pods on a node cannot share."""
    ds = _one("daemonset.yaml")
    strategy = ds["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    spec = _pod_spec()
    container = spec["containers"][0]
    assert "--take-over" in container["args"] and container["args"][0] == "run"
    assert not any("ports" in c for c in spec["containers"]), "hostPorts block the surge pod"
    cfg = _agent_config(tmp_path)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    run = volumes[mounts[cfg.agent.run_dir]["name"]]
    assert run["hostPath"]["path"] == cfg.agent.run_dir  # handover.sock: both pods see it
    # the old pod serves its connections out, then drains: within the grace period
    assert spec["terminationGracePeriodSeconds"] >= 2 * cfg.inject.drain_seconds
    # the new pod is ready only once it took over: readiness is the agent's /readyz
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_daemonset_mounts_what_the_config_uses(tmp_path):
    spec = _pod_spec()
    container = spec["containers"][0]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert {m["name"] for m in mounts.values()} == set(volumes), "unused or missing volumes"
    cfg = _agent_config(tmp_path)

    def host_path(mount_path: str) -> str:
        return volumes[mounts[mount_path]["name"]]["hostPath"]["path"]

    assert spec["hostPID"] and spec["hostNetwork"]
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert host_path(cfg.agent.state_dir) == cfg.agent.state_dir
    assert host_path(cfg.agent.run_dir) == cfg.agent.run_dir
    assert volumes[mounts[cfg.agent.run_dir]["name"]]["hostPath"]["type"] == "DirectoryOrCreate"
    assert cfg.workload_api.socket.startswith(cfg.agent.run_dir + "/")
    assert host_path("/sys/fs/bpf") == "/sys/fs/bpf"
    assert cfg.agent.bpf_pin_dir.startswith("/sys/fs/bpf/")
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    for ro in (
        "/sys/fs/cgroup",
        "/sys/kernel/tracing",
        "/lib/modules",
        "/usr/src",
        "/etc/credless",
    ):
        assert mounts[ro]["readOnly"] is True, ro
    # the files credless.toml names are in the ConfigMap mounted at /etc/credless
    data = _one("configmap.yaml")["data"]
    assert (
        volumes[mounts["/etc/credless"]["name"]]["configMap"]["name"]
        == _one("configmap.yaml")["metadata"]["name"]
    )
    assert "subPath" not in mounts["/etc/credless"], "subPath mounts never see updates"
    for path in (cfg.identity.entries_file, cfg.policy.file):
        assert Path(path).parent == Path("/etc/credless") and Path(path).name in data, path
    assert container["args"] == ["run", "--take-over", "--config", "/etc/credless/credless.toml"]
    # ${VAR}s in the kubelet URL come from the container's environment
    env = {e["name"]: e for e in container["env"]}
    for var in re.findall(r"\$\{(\w+)\}", cfg.attest.kubelet.url):
        assert env[var]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert cfg.attest.kubelet.enabled
    assert (
        os.path.expandvars(cfg.attest.kubelet.url.replace("${NODE_IP}", "10.0.0.7"))
        == "https://10.0.0.7:10250"
    )
    assert container["securityContext"]["privileged"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def _bound_rules(*files: str) -> dict[str, list[dict]]:
    """ClusterRole rules bound to the agent's service account, by file, checking that each
    file is one ClusterRole and one ClusterRoleBinding of it to that account."""
    sa = _one("serviceaccount.yaml")
    bound = {}
    for name in files:
        role, binding = _docs(K8S / name)
        assert role["kind"] == "ClusterRole" and binding["kind"] == "ClusterRoleBinding"
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": sa["metadata"]["name"],
                "namespace": sa["metadata"]["namespace"],
            }
        ]
        bound[name] = role["rules"]
    assert _pod_spec()["serviceAccountName"] == sa["metadata"]["name"]
    return bound


def _grants(rules: list[dict]) -> set[str]:
    """RBAC rules as the `nodes/<sub>` resources they allow `get` on (core group only)."""
    assert all(r["apiGroups"] == [""] and r["verbs"] == ["get"] for r in rules), rules
    return {res for r in rules for res in r["resources"]}


def test_rbac_grants_get_on_nodes_pods_and_separately_on_nodes_proxy():
    from agent.attest.kubelet_errors import RBAC_FILES

    bound = _bound_rules("rbac.yaml", "rbac-nodes-proxy.yaml")
    assert _grants(bound["rbac.yaml"]) == {"nodes/pods"}
    assert _grants(bound["rbac-nodes-proxy.yaml"]) == {"nodes/proxy"}
    # the kubelet client's 403 names these files for these grants
    for resource, path in RBAC_FILES.items():
        name = Path(path).name
        assert path == f"deploy/k8s/{name}" and _grants(bound[name]) == {resource}
    # the broad grant is its own binding, so that dropping it is one delete
    (_, binding) = _docs(K8S / "rbac-nodes-proxy.yaml")
    from agent.doctor import kubelet as doctor

    assert f"kubectl delete clusterrolebinding {binding['metadata']['name']}" in doctor._DROP_PROXY
    assert (
        "rbac-nodes-proxy.yaml"
        in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    )


@pytest.mark.parametrize(
    "minor, gate",
    [
        ((1, 29), None),
        ((1, 31), None),
        ((1, 32), None),
        ((1, 32), True),
        ((1, 33), None),
        ((1, 33), False),
        ((1, 35), None),
        ((1, 36), None),
    ],
    ids=lambda v: (
        "" if v is None else (f"gate-{v}".lower() if isinstance(v, bool) else f"1.{v[1]}")
    ),
)
def test_the_manifests_rbac_gets_pods_from_each_kubelet_version(tmp_path, minor, gate):
    """The grants the manifests bind, given to a FAKE kubelet of each authorization mode
    (tests/fakes/kubelet.py): everything kustomization.yaml applies gets /pods everywhere;
    rbac.yaml alone (nodes/proxy dropped) only where fine-grained authorization is on, and
    elsewhere a 403 that names the file to apply."""
    from agent.attest.kubelet import KubeletClient
    from agent.attest.kubelet_errors import KubeletError
    from tests.fakes.kubelet import FakeKubelet, KubeletVersion, running
    from tests.tlsca import TestCA

    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    applied = [n for n in kust if n.startswith("rbac")]
    bound = _bound_rules(*applied)
    ca = TestCA(tmp_path)
    cert, key = ca.issue("kubelet")
    (tmp_path / "token").write_text("agent.token.value")
    user = "system:serviceaccount:credless:credless"
    version = KubeletVersion(minor, gate)
    for files, want in (
        (applied, None),
        (["rbac.yaml"], None if version.fine_grained else "rbac-nodes-proxy.yaml"),
    ):
        grants = set().union(*(_grants(bound[f]) for f in files))
        fake = FakeKubelet(cert, key, version, {"agent.token.value": user}, {user: grants})
        with running(fake):
            client = KubeletClient(
                fake.url, token_file=str(tmp_path / "token"), ca_file=str(ca.cert_path)
            )
            if want is None:
                assert client.probe("/pods").status == 200, files
            else:
                with pytest.raises(KubeletError, match=f"deploy/k8s/{want}"):
                    client.pod("any")


def test_configmap_makes_the_kubelet_ca_choice_explicit(tmp_path):
    from agent.attest.kubelet import DEFAULT_CA_FILE

    text = _one("configmap.yaml")["data"]["credless.toml"]
    kubelet = _agent_config(tmp_path).attest.kubelet
    assert f'ca_file = "{DEFAULT_CA_FILE}"' in text  # the cluster CA, said, not implied
    assert "insecure_skip_verify = false" in text and not kubelet.insecure_skip_verify
    assert kubelet.ca_file == DEFAULT_CA_FILE
    assert _pod_spec().get("automountServiceAccountToken", True) is True  # token and ca.crt


@pytest.mark.parametrize("key", ["credless.toml", "entries.toml", "policy.toml"])
def test_configmap_files_are_valid_for_the_agent(tmp_path, key):
    data = _one("configmap.yaml")["data"]
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    credless = str(VENV_BIN / "credless")
    if key == "credless.toml":
        r = subprocess.run(
            [credless, "check-config", str(tmp_path / key)], capture_output=True, text=True
        )
        assert r.returncode == 0 and r.stdout.strip().endswith(": ok"), r.stdout + r.stderr
    elif key == "policy.toml":
        r = subprocess.run(
            [credless, "policy", "check", str(tmp_path / key)], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stdout + r.stderr
    else:
        from agent.identity import entries
        from agent.identity.spiffeid import TrustDomain

        loaded = entries.load(tmp_path / key, TrustDomain.parse("example.org"))
        assert len(loaded) == 1
        assert "{k8s:ns}" in data[key] and "{k8s:sa}" in data[key]


def test_containerfile_copies_what_the_wheel_needs():
    text = (K8S / "Containerfile").read_text()
    assert text.startswith("#") and "FROM debian:bookworm-slim" in text
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        if line.startswith("--from="):
            continue  # out of another stage, not the build context
        for src in line.split()[:-1]:
            # build/wheelhouse: made by deploy/k8s/build-image.sh (the wheelhouse route)
            assert src == "build/wheelhouse" or (REPO / src).exists(), src
    assert "python3-bpfcc" in text and "/usr/lib/python3/dist-packages/bcc" in text
