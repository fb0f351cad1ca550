"""`credless doctor`'s kubelet checks: does the agent reach its kubelet, does the serving
certificate verify, does the token get /pods, and does it hold more than it needs?

The kubelet is asked for real, with the agent's own token and CA (agent.attest.kubelet),
and each failing answer is turned into the exact fix: the setting, the RBAC manifest to
apply, or the grant to drop.

Apart from the host checks (host.py): these talk to a peer and need the configuration's
[attest.kubelet] section, and their fixes are about RBAC and TLS, not the kernel.
"""

from __future__ import annotations

import os

from agent.attest.kubelet import DEFAULT_CA_FILE, KubeletClient, Probe
from agent.attest.kubelet_errors import KubeletError
from agent.attest.kubelet_settings import expand_server_name, expand_url
from agent.config import KubeletSection
from agent.doctor.model import CheckResult, DoctorOptions

_SELF_SIGNED_FIX = (
    "if the kubelet's serving certificate is self-signed (kubeadm's default, "
    "/var/lib/kubelet/pki/kubelet.crt on the node), mount that file read-only and set "
    "attest.kubelet.ca_file to it and server_name to the node's host name; or sign serving "
    "certificates with the cluster CA (kubelet serverTLSBootstrap: true, then approve the "
    "kubelet-serving CSRs); insecure_skip_verify = true only as the last resort "
    "(deploy/k8s/README.md)"
)
_DROP_PROXY = (
    "if every kubelet is 1.33+ with KubeletFineGrainedAuthz on: kubectl delete "
    "clusterrolebinding credless-kubelet-proxy (and drop rbac-nodes-proxy.yaml from "
    "deploy/k8s/kustomization.yaml), then run credless doctor on each node: kubelet_authz "
    "must still pass"
)


def _trust(k: KubeletSection, server_name: str) -> str:
    """Which of the three serving-CA choices the configuration makes."""
    if k.insecure_skip_verify:
        return "NOT verified (insecure_skip_verify = true)"
    which = "the cluster CA" if k.ca_file == DEFAULT_CA_FILE else "the configured bundle"
    name = f", name {server_name!r}" if server_name else ""
    return f"verified against {which} ({k.ca_file}{name})"


def check_kubelet(opts: DoctorOptions) -> list[CheckResult]:
    """Can the agent reach its kubelet, does the serving certificate verify, does the token
    get /pods, and does it hold more than it needs? Three results, one per question."""
    k = opts.kubelet
    if k is None or not k.enabled:
        return [
            CheckResult(
                "kubelet",
                True,
                "not checked: attest.kubelet.enabled is false in the --config given "
                "(or no --config); processes in pods get no k8s: selectors",
                required=False,
            )
        ]
    try:
        # getattr: a configuration schema without server_name has nothing to expand
        server_name = expand_server_name(getattr(k, "server_name", "") or "", os.environ)
        url = expand_url(k.url, os.environ)
        client = KubeletClient(
            url,
            token_file=k.token_file,
            ca_file=k.ca_file,
            insecure_skip_verify=k.insecure_skip_verify,
            server_name=server_name or None,
        )
    except (KubeletError, ValueError) as e:
        return [CheckResult.failed("kubelet_tls", str(e), "fix the [attest.kubelet] settings")]
    trust = _trust(k, server_name)
    try:
        pods = client.probe("/pods")
    except KubeletError as e:
        if e.outcome == "local_config" and "token" in str(e):
            return [
                CheckResult("kubelet_tls", True, f"not reached: no token to send ({trust})"),
                CheckResult.failed(
                    "kubelet_authz",
                    str(e),
                    "mount the agent's service account token (automountServiceAccountToken) "
                    "or set attest.kubelet.token_file",
                ),
            ]
        fix = {
            "tls_verify": _SELF_SIGNED_FIX,
            "local_config": "point attest.kubelet.ca_file at a readable PEM bundle",
            "unreachable": "check attest.kubelet.url: the node's address (NODE_IP from "
            "status.hostIP) and the kubelet's --port (10250)",
            "timeout": "check attest.kubelet.url and that the kubelet is healthy",
        }.get(e.outcome, "check attest.kubelet.url and the kubelet's TLS settings")
        return [
            CheckResult.failed("kubelet_tls", f"{e!s} [{trust}]", fix),
            CheckResult.failed("kubelet_authz", "not checked", "fix kubelet_tls first"),
        ]
    results = [_tls_result(k, url, trust, verifies_anyway=_verifies_anyway(k, url, server_name))]
    if pods.error is not None:
        results.append(
            CheckResult.failed("kubelet_authz", str(pods.error), _authz_fix(pods.error, pods))
        )
        return results
    results.append(
        CheckResult("kubelet_authz", True, f"the token from {k.token_file} gets 200 on /pods")
    )
    results.append(_grant_result(client))
    return results


def _verifies_anyway(k: KubeletSection, url: str, server_name: str) -> bool:
    """With insecure_skip_verify on: would ca_file have verified the kubelet anyway?"""
    if not k.insecure_skip_verify:
        return False
    verified = KubeletClient(
        url, token_file=k.token_file, ca_file=k.ca_file, server_name=server_name or None
    )
    try:
        verified.probe("/pods")
    except KubeletError:
        return False
    return True


def _tls_result(k: KubeletSection, url: str, trust: str, verifies_anyway: bool) -> CheckResult:
    if not k.insecure_skip_verify:
        return CheckResult("kubelet_tls", True, f"reached {url}; certificate {trust}")
    if verifies_anyway:
        return CheckResult.failed(
            "kubelet_tls",
            f"reached {url}; certificate {trust}, but it does verify against {k.ca_file}",
            "set insecure_skip_verify = false: the verified connection works",
            required=False,
        )
    return CheckResult.failed(
        "kubelet_tls",
        f"reached {url}; certificate {trust}: the agent's token goes to whatever answers "
        "at that address",
        _SELF_SIGNED_FIX.replace("; insecure_skip_verify = true only as the last resort", ""),
        required=False,
    )


def _authz_fix(error: KubeletError, probe: Probe) -> str:
    if error.status == 401:
        return (
            "the kubelet did not accept the token: check that it is the agent's current "
            "service account token and that the kubelet runs with "
            "--authentication-token-webhook (kubelet config authentication.webhook.enabled)"
        )
    if error.status == 403:
        f = probe.forbidden
        who = f.user if f is not None else "the agent's service account"
        if error.grant == "nodes/proxy":
            return (
                f"this kubelet has no fine-grained authorization: bind 'get' on nodes/proxy "
                f"to {who} (kubectl apply -f deploy/k8s/rbac-nodes-proxy.yaml), or turn "
                "KubeletFineGrainedAuthz on (kubelet 1.32+) and keep nodes/pods only"
            )
        if error.grant is not None:
            return f"bind 'get' on {error.grant} to {who} (kubectl apply -f deploy/k8s/rbac.yaml)"
        return "bind 'get' on nodes/pods (and, for kubelets before 1.33, nodes/proxy)"
    return "check the kubelet's logs"


def _grant_result(client: KubeletClient) -> CheckResult:
    """Does the token hold nodes/proxy? GET /healthz needs it (or nodes/healthz, which
    credless's RBAC does not grant), so a 200 there says it does."""
    try:
        healthz = client.probe("/healthz")
    except KubeletError as e:
        return CheckResult.failed(
            "kubelet_grant", f"cannot tell: {e}", "re-run credless doctor", required=False
        )
    if healthz.status == 200:
        return CheckResult.failed(
            "kubelet_grant",
            "the token holds nodes/proxy (it may GET /healthz): a broad grant that also "
            "reaches exec, attach and port-forward on every node's kubelet; needed only by "
            "kubelets without KubeletFineGrainedAuthz (before 1.33, or the gate off)",
            _DROP_PROXY,
            required=False,
        )
    f = healthz.forbidden
    if healthz.status == 403 and f is not None and f.fine_grained:
        return CheckResult(
            "kubelet_grant",
            True,
            "least privilege: nodes/pods only; this kubelet has KubeletFineGrainedAuthz "
            f"(GET /healthz: checked {'/'.join(f.subresources)}, neither granted)",
            required=False,
        )
    return CheckResult(
        "kubelet_grant",
        True,
        f"the token does not hold nodes/proxy (GET /healthz: {healthz.status})",
        required=False,
    )
