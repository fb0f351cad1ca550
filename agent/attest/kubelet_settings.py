"""attest.kubelet.url and server_name with ${VAR} expanded from the agent's environment.

One ConfigMap serves every node, so the settings name the node through the downward API
(NODE_IP from status.hostIP, NODE_NAME from spec.nodeName) and are expanded at start-up.

Apart from the HTTP client (kubelet.py) because this is configuration, done once before a
client exists: the agent's wiring and `credless doctor` both expand the settings and then
build the client from the result.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

from agent.attest.kubelet_errors import KubeletError

__all__ = ["expand_server_name", "expand_url"]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_url(url: str, env: Mapping[str, str]) -> str:
    """attest.kubelet.url with ${VAR} taken from the environment (NODE_IP from the downward
    API on Kubernetes). An IPv6 address lands in brackets, as a URL host must be; a variable
    that is not set is an error naming it, not a literal "${NODE_IP}" to connect to."""
    return _expand(url, env, "attest.kubelet.url", "status.hostIP", bracket_ipv6=True)


def expand_server_name(name: str, env: Mapping[str, str]) -> str:
    """attest.kubelet.server_name with ${VAR} from the environment: one ConfigMap serves
    every node, and a self-signed kubelet certificate names its own node (NODE_NAME from
    the downward API, spec.nodeName)."""
    return _expand(name, env, "attest.kubelet.server_name", "spec.nodeName", bracket_ipv6=False)


def _expand(
    text: str, env: Mapping[str, str], setting: str, field_path: str, *, bracket_ipv6: bool
) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in env or not env[name]:
            raise KubeletError(
                f"{setting} uses ${{{name}}}, which is not set in "
                "the agent's environment (on Kubernetes: set it from the "
                f"downward API, fieldRef {field_path})",
                outcome="local_config",
            )
        value = env[name]
        if bracket_ipv6 and ":" in value and not value.startswith("["):
            try:
                ipaddress.IPv6Address(value)
                return f"[{value}]"
            except ValueError:
                pass
        return value

    return _VAR.sub(sub, text)
