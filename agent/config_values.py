"""The checks of single configuration values: each takes a value and returns None when it is
accepted, else what is accepted (the schema engine, agent/schema.py, puts that in the error
with the key path and the bad value). The model that uses them is agent/config.py; these live
apart so the model reads as one line per key.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from agent.schema import Check

# SPIFFE-ID.md §2.1: lowercase letters, digits, '.', '-', '_'; at most 255 bytes.
TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")


def loopback_listen(v: Any) -> str | None:
    accepted = 'a loopback HOST:PORT such as "127.0.0.1:9890" or "[::1]:9890"'
    addr = parse_listen(v)
    if addr is None:
        return accepted
    try:
        if not ipaddress.ip_address(addr[0]).is_loopback:
            return accepted + " (the metrics endpoint is never exposed beyond the node)"
    except ValueError:
        return accepted
    return None


def check_trust_domain(v: Any) -> str | None:
    accepted = (
        "a SPIFFE trust domain: 1-255 characters of lowercase letters, digits, "
        "'.', '-', '_', with no scheme, port or path (e.g. \"example.org\")"
    )
    if not isinstance(v, str) or not v or len(v.encode()) > 255 or not TRUST_DOMAIN_RE.fullmatch(v):
        return accepted
    return None


def listen(example: str) -> Check:
    def check(v: Any) -> str | None:
        return None if parse_listen(v) else f'HOST:PORT such as "{example}"'

    return check


def ipv4_loopback(v: Any) -> str | None:
    return None if v.startswith("127.") else "a 127.x.y.z address"


def https_url(v: Any) -> str | None:
    return None if v.startswith("https://") else "an https:// URL"


def power_of_two(v: Any) -> str | None:
    return None if v > 0 and v & (v - 1) == 0 else "a power of two greater than 0"


def server_name(v: Any) -> str | None:
    ok = re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", v)
    return None if ok else "1-63 characters of lowercase letters, digits, '.', '_', '-'"


def port(v: Any) -> str | None:
    return None if 0 < v < 65536 else "a port 1-65535"


def parse_listen(v: str) -> tuple[str, int] | None:
    """'127.0.0.1:9890' or '[::1]:9890' -> (host, port); None when malformed."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})", v or "")
    if not m:
        return None
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        return None
    return host, port


def url(v: Any) -> str | None:
    return (
        None
        if isinstance(v, str) and re.match(r"^https?://[^/\s]+", v)
        else 'an absolute http(s) URL such as "https://mcp.example.com/mcp"'
    )


def optional_url(v: Any) -> str | None:
    return None if v == "" else url(v)


ISSUER_ACCEPTED = (
    "https, or http only to a loopback host (127.0.0.0/8, ::1, localhost), with no "
    'query or fragment, such as "https://as.example.com"'
)


def issuer(v: Any) -> str | None:
    """An authorization server issuer identifier (RFC 8414 §2) the agent may send
    assertions to: the rule it also applies at run time (agent/oauth/trust.py)."""
    from agent.oauth.trust import insecure_reason

    ok = (
        isinstance(v, str)
        and not url(v)
        and not insecure_reason(v)
        and "?" not in v
        and "#" not in v
    )
    return None if ok else "an issuer URL: " + ISSUER_ACCEPTED


def optional_issuer(v: Any) -> str | None:
    return None if v == "" else issuer(v)


def issuers(v: Any) -> str | None:
    ok = isinstance(v, list) and not any(issuer(x) for x in v)
    return None if ok else "a list of issuer URLs, each " + ISSUER_ACCEPTED


def cgroup_paths(v: Any) -> str | None:
    from agent.inject.cgroup_match import pattern_error  # the redirect's own rules

    shape = (
        "a list of cgroup paths or globs relative to the cgroup v2 root, like "
        '["/system.slice/agent.service", "/system.slice/agent-*.service"]'
    )
    if not (isinstance(v, list) and all(isinstance(p, str) for p in v)):
        return shape
    for p in v:
        err = pattern_error(p)
        if err:
            return f"{p!r} {err}; {shape}"
    return None
