"""The kubelet client and `credless doctor` against a FAKE kubelet (tests/fakes/kubelet.py)
over real TLS on 127.0.0.1, one per authorization mode the kubelet has had: before 1.32
(`nodes/proxy`, old 403 wording), 1.32 (gate off by default), 1.33+ (KubeletFineGrainedAuthz
on: `nodes/pods` or `nodes/proxy`), with the gate turned either way; and one per serving-CA
choice: a certificate from the cluster CA, kubeadm's self-signed default, the insecure
fallback. Every request is counted by outcome in a real prometheus registry."""

from __future__ import annotations

import socket
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent import doctor
from agent.attest.kubelet import KubeletClient
from agent.attest.kubelet_errors import OUTCOMES, KubeletError
from agent.attest.kubelet_settings import expand_server_name
from agent.config import KubeletSection
from tests.fakes.kubelet import FakeKubelet, KubeletVersion, running, self_signed_serving_cert
from tests.tlsca import TestCA

TOKEN = "eyJhbGciOiJSUzI1NiJ9.a3ViZWxldC10ZXN0LXRva2Vu.c2lnbmF0dXJl"
AGENT = "system:serviceaccount:credless:credless"
POD_UID = "6513270e-269e-4d37-b2a7-4de452e6b438"
PODS = {
    "kind": "PodList",
    "apiVersion": "v1",
    "items": [{"metadata": {"uid": POD_UID, "name": "app", "namespace": "payments"}}],
}
PODS_ONLY = {"nodes/pods"}
BOTH = {"nodes/pods", "nodes/proxy"}


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = TestCA(tmp_path, "cluster CA")
    bootstrap_cert, bootstrap_key = ca.issue("kubelet-serving", ("worker-1", "127.0.0.1"))
    self_signed = tmp_path / "kubeadm"
    self_signed.mkdir()
    kubeadm_cert, kubeadm_key = self_signed_serving_cert(self_signed, "worker-1")
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    return {
        "cluster_ca": ca.cert_path,
        "bootstrap_cert": bootstrap_cert,
        "bootstrap_key": bootstrap_key,
        "kubeadm_cert": kubeadm_cert,
        "kubeadm_key": kubeadm_key,
        "token": token,
    }


@pytest.fixture
def start(pki):
    """start(version, grants, cert="bootstrap"|"kubeadm") -> a running FakeKubelet."""
    with ExitStack() as stack:

        def make(version: KubeletVersion, grants: set[str], cert: str = "bootstrap") -> FakeKubelet:
            fake = FakeKubelet(
                pki[f"{cert}_cert"],
                pki[f"{cert}_key"],
                version,
                tokens={TOKEN: AGENT},
                grants={AGENT: set(grants)},
                pods=PODS,
            )
            return stack.enter_context(running(fake))

        yield make


def _client(fake: FakeKubelet, pki, registry: CollectorRegistry, **kw) -> KubeletClient:
    options = {"token_file": str(pki["token"]), "ca_file": str(pki["cluster_ca"]), **kw}
    return KubeletClient(fake.url, min_refresh_interval=0, registry=registry, **options)


def _counts(registry: CollectorRegistry) -> dict[str, float]:
    counts = {
        o: registry.get_sample_value("credless_kubelet_requests_total", {"outcome": o})
        for o in OUTCOMES
    }
    return {o: n for o, n in counts.items() if n}


def _no_token(exc: BaseException) -> None:
    assert TOKEN not in str(exc) and TOKEN not in repr(exc)


# (version, gate, grants) -> the RBAC resource a 403 must name, or None for 200
MATRIX = [
    ((1, 30), None, PODS_ONLY, "nodes/proxy"),
    ((1, 30), None, BOTH, None),
    ((1, 31), None, {"nodes/proxy"}, None),
    ((1, 32), None, PODS_ONLY, "nodes/proxy"),
    ((1, 32), True, PODS_ONLY, None),
    ((1, 33), None, PODS_ONLY, None),
    ((1, 33), None, {"nodes/proxy"}, None),
    ((1, 33), None, set(), "nodes/pods"),
    ((1, 33), False, PODS_ONLY, "nodes/proxy"),
    ((1, 34), None, {"nodes/stats", "nodes/healthz"}, "nodes/pods"),
    ((1, 36), None, PODS_ONLY, None),
]


@pytest.mark.parametrize(
    "minor, gate, grants, want",
    MATRIX,
    ids=[
        f"1.{m[1]}{'' if g is None else '-gate-' + str(g).lower()}-{'+'.join(sorted(r)) or 'none'}"
        for m, g, r, _ in MATRIX
    ],
)
def test_each_kubelet_mode_and_grant(start, pki, minor, gate, grants, want):
    fake = start(KubeletVersion(minor, gate), grants)
    registry = CollectorRegistry()
    client = _client(fake, pki, registry)
    if want is None:
        pod = client.pod(POD_UID)
        assert pod is not None and pod.namespace == "payments"
        assert _counts(registry) == {"ok": 1}
        return
    with pytest.raises(KubeletError) as exc:
        client.pod(POD_UID)
    err = exc.value
    assert (err.status, err.outcome, err.grant) == (403, "forbidden", want)
    text = str(err)
    assert f"grant {AGENT} 'get' on '{want}'" in text
    if want == "nodes/proxy":
        assert "authorizes GET /pods as 'nodes/proxy' only" in text
        assert "deploy/k8s/rbac-nodes-proxy.yaml: a broad grant" in text
        assert "turn KubeletFineGrainedAuthz on" in text
    else:
        assert "(deploy/k8s/rbac.yaml); this kubelet has fine-grained authorization" in text
    _no_token(err)
    assert _counts(registry) == {"forbidden": 1}
    assert [r.authorization for r in fake.requests] == [f"Bearer {TOKEN}"]


def test_the_old_and_new_403_wordings_both_name_the_grant(start, pki):
    old = start(KubeletVersion((1, 29)), PODS_ONLY)
    new = start(KubeletVersion((1, 33), gate=False), PODS_ONLY)
    for fake, said in (
        (old, "subresource=proxy)"),
        (new, "subresource(s)=[proxy])"),
    ):
        probe = _client(fake, pki, CollectorRegistry()).probe("/pods")
        assert probe.status == 403 and probe.forbidden is not None
        assert (probe.forbidden.user, probe.forbidden.subresources) == (AGENT, ("proxy",))
        assert probe.error is not None and probe.error.grant == "nodes/proxy"
        assert str(probe.error).endswith(f"resource=nodes, {said})")


def test_an_unknown_token_is_401_and_counted(start, pki, tmp_path):
    fake = start(KubeletVersion((1, 33)), PODS_ONLY)
    other = tmp_path / "other-token"
    other.write_text("not.the.agents")
    registry = CollectorRegistry()
    with pytest.raises(KubeletError) as exc:
        _client(fake, pki, registry, token_file=str(other)).pod(POD_UID)
    assert (exc.value.status, exc.value.outcome, exc.value.grant) == (401, "unauthorized", None)
    assert "--authentication-token-webhook" in str(exc.value)
    assert _counts(registry) == {"unauthorized": 1}


def test_a_kubelet_echoing_the_token_as_the_user_does_not_leak_it(start, pki):
    fake = start(KubeletVersion((1, 30)), set())
    fake.tokens = {TOKEN: TOKEN}  # the 403 says "user=<the token>"
    probe = _client(fake, pki, CollectorRegistry()).probe("/pods")
    assert probe.forbidden is not None and probe.forbidden.user == "[redacted]"
    assert probe.error is not None
    _no_token(probe.error)
    checks = _doctor(fake.url, pki)
    assert not any(TOKEN in f"{c.detail} {c.fix}" for c in checks.values())


def test_every_outcome_is_exported_from_zero():
    registry = CollectorRegistry()
    KubeletClient("https://127.0.0.1:10250", registry=registry)
    text = generate_latest(registry).decode()
    for outcome in OUTCOMES:
        assert f'credless_kubelet_requests_total{{outcome="{outcome}"}} 0.0' in text


# ------------------------------------------------------------------ serving certificates
@pytest.mark.parametrize(
    "cert, options, ok",
    [
        ("bootstrap", {}, True),  # serverTLSBootstrap: the cluster CA, names the node IP
        ("kubeadm", {}, False),  # kubeadm's self-signed default is not the cluster CA's
        ("kubeadm", {"ca": "kubeadm_cert"}, False),  # trusted, but names worker-1 only
        ("kubeadm", {"ca": "kubeadm_cert", "server_name": "worker-1"}, True),
        ("kubeadm", {"ca": "kubeadm_cert", "server_name": "worker-2"}, False),
        ("bootstrap", {"server_name": "worker-1"}, True),
        ("kubeadm", {"insecure_skip_verify": True}, True),  # the documented last resort
    ],
    ids=[
        "cluster-ca",
        "self-signed-vs-cluster-ca",
        "self-signed-bundle-by-ip",
        "self-signed-bundle-server-name",
        "self-signed-wrong-server-name",
        "cluster-ca-server-name",
        "insecure",
    ],
)
def test_serving_ca_choices(start, pki, cert, options, ok):
    fake = start(KubeletVersion((1, 33)), PODS_ONLY, cert=cert)
    registry = CollectorRegistry()
    ca = options.pop("ca", "cluster_ca")
    client = _client(fake, pki, registry, ca_file=str(pki[ca]), **options)
    if ok:
        assert client.pod(POD_UID) is not None
        assert _counts(registry) == {"ok": 1}
        return
    with pytest.raises(KubeletError) as exc:
        client.pod(POD_UID)
    assert exc.value.outcome == "tls_verify"
    assert str(exc.value).startswith(f"TLS verification of the kubelet at {fake.url} failed")
    assert "insecure_skip_verify last" in str(exc.value)
    assert fake.requests == []  # the token never left the client
    assert _counts(registry) == {"tls_verify": 1}


def test_a_bad_server_name_is_refused_up_front():
    with pytest.raises(ValueError, match="server_name"):
        KubeletClient("https://127.0.0.1:10250", server_name="worker-1/evil")


# ------------------------------------------------------------------------------- doctor
def _doctor(fake_url: str, pki, **kw) -> dict[str, doctor.CheckResult]:
    section = _WithServerName(
        enabled=True,
        url=fake_url,
        token_file=str(pki["token"]),
        ca_file=str(kw.pop("ca_file", pki["cluster_ca"])),
        **kw,
    )
    results = doctor.check_kubelet(doctor.DoctorOptions(kubelet=section))
    return {r.name: r for r in results}


def test_doctor_least_privilege_on_a_fine_grained_kubelet(start, pki):
    fake = start(KubeletVersion((1, 33)), PODS_ONLY)
    checks = _doctor(fake.url, pki)
    assert list(checks) == ["kubelet_tls", "kubelet_authz", "kubelet_grant"]
    assert all(c.ok for c in checks.values())
    assert checks["kubelet_tls"].detail == (
        f"reached {fake.url}; certificate verified against the configured bundle "
        f"({pki['cluster_ca']})"
    )
    assert "gets 200 on /pods" in checks["kubelet_authz"].detail
    assert checks["kubelet_grant"].detail.startswith("least privilege: nodes/pods only")
    assert "healthz/proxy" in checks["kubelet_grant"].detail
    assert doctor.exit_code(list(checks.values())) == 0


def test_doctor_warns_about_nodes_proxy_and_says_how_to_drop_it(start, pki):
    fake = start(KubeletVersion((1, 33)), BOTH)
    checks = _doctor(fake.url, pki)
    grant = checks["kubelet_grant"]
    assert (grant.ok, grant.required) == (False, False)
    assert "holds nodes/proxy" in grant.detail and "exec" in grant.detail
    assert "kubectl delete clusterrolebinding credless-kubelet-proxy" in grant.fix
    assert doctor.exit_code(list(checks.values())) == 0  # a warning: older kubelets need it


def test_doctor_on_an_old_kubelet_with_only_nodes_pods(start, pki):
    fake = start(KubeletVersion((1, 31)), PODS_ONLY)
    checks = _doctor(fake.url, pki)
    authz = checks["kubelet_authz"]
    assert checks["kubelet_tls"].ok and not authz.ok and authz.required
    assert "answered 403 Forbidden" in authz.detail
    assert "kubectl apply -f deploy/k8s/rbac-nodes-proxy.yaml" in authz.fix
    assert AGENT in authz.fix
    assert "kubelet_grant" not in checks
    assert doctor.exit_code(list(checks.values())) == 1


def test_doctor_on_a_fine_grained_kubelet_with_no_grant(start, pki):
    fake = start(KubeletVersion((1, 35)), set())
    authz = _doctor(fake.url, pki)["kubelet_authz"]
    assert not authz.ok and "kubectl apply -f deploy/k8s/rbac.yaml" in authz.fix
    assert "nodes/pods" in authz.fix


def test_doctor_on_kubeadms_self_signed_certificate(start, pki):
    fake = start(KubeletVersion((1, 33)), PODS_ONLY, cert="kubeadm")
    checks = _doctor(fake.url, pki)
    tls = checks["kubelet_tls"]
    assert not tls.ok and tls.required
    assert tls.detail.startswith(f"TLS verification of the kubelet at {fake.url} failed")
    assert tls.detail.endswith(f"[verified against the configured bundle ({pki['cluster_ca']})]")
    assert "/var/lib/kubelet/pki/kubelet.crt" in tls.fix and "serverTLSBootstrap" in tls.fix
    assert checks["kubelet_authz"].detail == "not checked"
    assert fake.requests == []
    # the fallback works, and is flagged
    checks = _doctor(fake.url, pki, insecure_skip_verify=True)
    tls = checks["kubelet_tls"]
    assert (tls.ok, tls.required) == (False, False)
    assert "NOT verified" in tls.detail and "insecure_skip_verify" not in tls.fix
    assert checks["kubelet_authz"].ok


@dataclass(frozen=True)
class _WithServerName(KubeletSection):
    # attest.kubelet.server_name, until agent/config.py has it (the doctor reads it if there)
    server_name: str = ""


def test_doctor_with_the_nodes_self_signed_certificate_as_the_bundle(start, pki, monkeypatch):
    fake = start(KubeletVersion((1, 33)), PODS_ONLY, cert="kubeadm")
    monkeypatch.setenv("NODE_NAME", "worker-1")
    checks = _doctor(fake.url, pki, ca_file=pki["kubeadm_cert"], server_name="${NODE_NAME}")
    assert all(c.ok for c in checks.values()), checks
    assert checks["kubelet_tls"].detail == (
        f"reached {fake.url}; certificate verified against the configured bundle "
        f"({pki['kubeadm_cert']}, name 'worker-1')"
    )
    monkeypatch.delenv("NODE_NAME")
    (tls,) = _doctor(
        fake.url, pki, ca_file=pki["kubeadm_cert"], server_name="${NODE_NAME}"
    ).values()
    assert not tls.ok and "${NODE_NAME}" in tls.detail and "spec.nodeName" in tls.detail


@pytest.mark.parametrize(
    "name, env, want",
    [
        ("${NODE_NAME}", {"NODE_NAME": "worker-1"}, "worker-1"),
        ("${IP}", {"IP": "fd00::1"}, "fd00::1"),
        ("worker-1", {}, "worker-1"),
        ("", {}, ""),
    ],
)
def test_server_name_expansion(name, env, want):
    assert expand_server_name(name, env) == want


def test_doctor_says_when_insecure_skip_verify_is_not_needed(start, pki):
    fake = start(KubeletVersion((1, 33)), PODS_ONLY)
    tls = _doctor(fake.url, pki, insecure_skip_verify=True)["kubelet_tls"]
    assert not tls.ok and "it does verify against" in tls.detail
    assert tls.fix == "set insecure_skip_verify = false: the verified connection works"


def test_doctor_on_a_wrong_token_and_an_unreachable_kubelet(start, pki, tmp_path):
    fake = start(KubeletVersion((1, 33)), PODS_ONLY)
    pki = {**pki, "token": tmp_path / "stale"}
    pki["token"].write_text("stale.token.value")
    authz = _doctor(fake.url, pki)["kubelet_authz"]
    assert not authz.ok and authz.detail.startswith(f"kubelet at {fake.url} answered 401")
    assert "--authentication-token-webhook" in authz.fix
    with socket.socket() as s:  # a loopback port with no listener
        s.bind(("127.0.0.1", 0))
        url = f"https://127.0.0.1:{s.getsockname()[1]}"
    tls = _doctor(url, pki)["kubelet_tls"]
    assert not tls.ok and "cannot reach the kubelet" in tls.detail
    assert "status.hostIP" in tls.fix


@pytest.mark.parametrize(
    "options, trust",
    [
        ({}, "verified against the cluster CA ({ca})"),
        (
            {"ca_file": "/etc/kubelet-ca.pem"},
            "verified against the configured bundle (/etc/kubelet-ca.pem)",
        ),
        ({"insecure_skip_verify": True}, "NOT verified (insecure_skip_verify = true)"),
    ],
    ids=["cluster-ca", "bundle", "insecure"],
)
def test_doctor_names_the_serving_ca_choice(options, trust):
    from agent.attest.kubelet import DEFAULT_CA_FILE
    from agent.doctor import kubelet as doctor  # where _trust lives

    assert doctor._trust(KubeletSection(**options), "") == trust.format(ca=DEFAULT_CA_FILE)


def test_doctor_skips_the_kubelet_when_it_is_not_enabled():
    (result,) = doctor.check_kubelet(doctor.DoctorOptions())
    assert (result.name, result.ok, result.required) == ("kubelet", True, False)
