"""How asking the kubelet can go wrong, in words an operator can act on.

The outcome vocabulary (`credless_kubelet_requests_total{outcome}` and KubeletError.outcome),
KubeletError itself, and the parser of the kubelet's 403 body, which names the user it
authenticated and the `nodes` subresources it checked, so the error says which one to grant.

Apart from the HTTP client (kubelet.py) because the sans-IO pod-list parser
(kubelet_pods.py) and the settings expansion (kubelet_settings.py) raise KubeletError too,
and neither should have to import an HTTP client to do so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["OUTCOMES", "RBAC_FILES", "Forbidden", "KubeletError", "parse_forbidden"]

# What became of one request to the kubelet: the `outcome` label of
# credless_kubelet_requests_total, and KubeletError.outcome.
OUTCOMES = (
    "ok",  # 200 and a pod list
    "unauthorized",  # 401: the kubelet did not accept the token
    "forbidden",  # 403: the token's identity lacks the RBAC grant
    "http_error",  # any other HTTP status
    "tls_verify",  # the serving certificate did not verify
    "tls_error",  # any other TLS failure
    "timeout",
    "unreachable",  # connection refused, no route, ...
    "bad_response",  # not HTTP, too large, or not a pod list
    "local_config",  # the token file, CA file or url could not be used: nothing was sent
)

# The kubelet's 403 body (pkg/kubelet/server/server.go, authorization filter). Since 1.32 it
# lists every subresource it tried, e.g. "subresource(s)=[pods proxy]"; before, the one.
_FORBIDDEN = re.compile(
    r"Forbidden \(user=(?P<user>[^,()]{1,256}), verb=(?P<verb>[a-z]{1,16}), "
    r"resource=(?P<resource>[a-z]{1,32}), "
    r"subresource(?:\(s\)=\[(?P<subs>[a-z ]{0,128})\]|=(?P<sub>[a-z]{0,32}))\)"
)
# Where the grants live in the manifests, for the error an operator reads.
RBAC_FILES = {
    "nodes/pods": "deploy/k8s/rbac.yaml",
    "nodes/proxy": "deploy/k8s/rbac-nodes-proxy.yaml",
}


class KubeletError(Exception):
    """The kubelet could not be asked, or its answer was not a pod list.

    `status` is the HTTP status code when the kubelet answered with an error; `outcome` is
    one of OUTCOMES; `grant` is the RBAC resource to grant (`nodes/pods`, `nodes/proxy`)
    when a 403 said which one this kubelet checks. Messages never contain the bearer token.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        outcome: str = "bad_response",
        grant: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome
        self.grant = grant


@dataclass(frozen=True)
class Forbidden:
    """What a kubelet's 403 says it checked: the user it authenticated and the `nodes`
    subresources it tried, in order (any one of them would have allowed the request)."""

    user: str
    verb: str
    subresources: tuple[str, ...]

    @property
    def fine_grained(self) -> bool:
        """The kubelet authorizes with KubeletFineGrainedAuthz: a subresource other than
        `proxy` was tried for a path that only `proxy` covered before."""
        return len(self.subresources) > 1 and self.subresources[-1] == "proxy"

    @property
    def grant(self) -> str | None:
        """The narrowest grant that would allow it, as an RBAC resource."""
        if not self.subresources:
            return None
        return f"nodes/{self.subresources[0]}"


def parse_forbidden(body: bytes | str) -> Forbidden | None:
    """The kubelet's 403 message, or None if the body is not one."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    m = _FORBIDDEN.search(text[:4096])
    if m is None or m.group("resource") != "nodes":
        return None
    subs = m.group("subs")
    subresources = tuple(subs.split()) if subs is not None else (m.group("sub"),)
    return Forbidden(m.group("user"), m.group("verb"), tuple(s for s in subresources if s))
