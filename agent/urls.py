"""Which server a URL names: its origin (scheme, host, port), read one way everywhere.

The OAuth trust checks (agent/oauth/trust.py: which origin metadata may come from, which
authorization server an issuer is) and the Workload API's refusal of audiences naming an
authorization server (agent/identity/workload_api.py) both ask it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str, userinfo: bool = False) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, scheme and host lower case, the default port
    filled in; None for anything else. A URL with userinfo is None unless userinfo is true:
    where a URL is to be trusted, its "host" is easily misread (https://good@evil/); where
    one is to be refused for the host it names, the userinfo changes nothing."""
    try:
        p = urlsplit(url)
        host, port = p.hostname, p.port
    except ValueError:
        return None
    scheme = p.scheme.lower()
    if scheme not in DEFAULT_PORTS or not host:
        return None
    if not userinfo and (p.username is not None or p.password is not None):
        return None
    return scheme, host.lower(), port or DEFAULT_PORTS[scheme]
