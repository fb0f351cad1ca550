"""Deployment files: the systemd unit verifies cleanly, the Kubernetes manifests validate
offline against the Kubernetes schemas, and what they embed is valid for the agent."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.33.0"


def test_systemd_unit_verifies_without_any_warning(tmp_path):
    unit = tmp_path / "credless.service"
    credless = Path(sys.executable).parent / "credless"
    unit.write_text((REPO / "deploy/systemd/credless.service").read_text()
                    .replace("/usr/local/bin/credless", str(credless)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    # exits 0 on warnings too: any output is a failure
    assert r.returncode == 0 and (r.stdout + r.stderr).strip() == "", r.stdout + r.stderr


def test_systemd_exposure_score_is_what_the_readme_says(tmp_path):
    unit = tmp_path / "credless.service"
    shutil.copy(REPO / "deploy/systemd/credless.service", unit)
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                       capture_output=True, text=True)
    score = re.search(r"Overall exposure level for credless.service: ([\d.]+)", r.stdout)
    assert score, r.stdout[-2000:] + r.stderr
    assert f"exposure {score.group(1)}" in (REPO / "deploy/systemd/README.md").read_text()


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == [p.name for p in _manifests()]


def test_manifests_validate_strictly_against_kubernetes_schemas():
    builtin = [p for p in _manifests() if p.name != "podmonitor.yaml"]
    r = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict",
                        "-k", K8S_VERSION, *map(str, builtin)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed") == sum(
        len([d for d in yaml.safe_load_all(p.read_text()) if d]) for p in builtin)


def test_podmonitor_crd_shape():
    # PodMonitor is a prometheus-operator CRD, not in the Kubernetes schemas: check the
    # fields the operator needs, and that it selects the DaemonSet's pods and port.
    pm = yaml.safe_load((K8S / "podmonitor.yaml").read_text())
    ds = yaml.safe_load((K8S / "daemonset.yaml").read_text())
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in ds["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports


@pytest.mark.parametrize("key", ["credless.toml", "entries.toml", "policy.toml"])
def test_configmap_files_are_valid_for_the_agent(tmp_path, key, credless_cmd):
    data = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    if key == "credless.toml":
        r = subprocess.run([*credless_cmd, "check-config", str(tmp_path / key)],
                           capture_output=True, text=True)
    elif key == "policy.toml":
        r = subprocess.run([*credless_cmd, "policy", "check", str(tmp_path / key)],
                           capture_output=True, text=True)
    else:
        from agent.identity import entries
        from agent.identity.spiffeid import TrustDomain
        assert len(entries.load(tmp_path / key, TrustDomain.parse("example.org"))) == 1
        return
    assert r.returncode == 0, r.stderr


def test_dashboard_uses_only_registered_metric_names():
    dash = json.loads((REPO / "deploy/grafana/credless-dashboard.json").read_text())
    used = set()
    for panel in dash["panels"]:
        for t in panel["targets"]:
            used |= set(re.findall(r"\b(credless_[a-z0-9_]+)", t["expr"]))
    source = "\n".join(p.read_text() for p in (REPO / "agent").rglob("*.py"))
    registered = set(re.findall(r'"(credless_[a-z0-9_]+)"', source))
    suffixes = ("_total", "_bucket", "_count", "_sum", "_info")
    for name in used:
        base = name
        for s in suffixes:
            if name.endswith(s) and name[: -len(s)] in registered:
                base = name[: -len(s)]
        assert base in registered, f"{name} is not a metric the agent registers"
