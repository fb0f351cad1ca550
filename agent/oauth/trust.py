"""What discovery may believe, and where the agent may send what it has.

Discovery starts from an unauthenticated request to an MCP server, so everything it learns
first comes from a party the agent does not trust yet: a hostile MCP server answers the
probe, a hostile authorization server (AS) answers metadata and token requests. The rules
(issue 15, item 6; docs/security.md):

- **Which AS may receive a server's assertions** (JWT-SVIDs, software statements): those in
  the server's `authorization_servers` setting, plus its `issuer` if set; with neither, the
  first AS discovered for it, pinned in `<state_dir>/oauth/authorization_servers.json` so a
  later change of the server's metadata is refused, across restarts too. An AS not allowed is
  never contacted at all (not even for its metadata).
- **Which URLs the agent uses on a server's word**: https, or http only to a loopback host
  (127.0.0.0/8, ::1, `localhost`). A host *name* that resolves to loopback does not count:
  only what the URL itself says is checked, before any connection.
- **Which origin metadata may come from**: a challenge's `resource_metadata` URL on another
  origin than the MCP server's is ignored (see discovery.py).
- **Which certificates the agent believes**: one decision per MCP server, server_tls(), for
  every connection credless makes to it (discovery's 401 probe and metadata reads, the
  requests the proxy relays): its `ca_file`, else `inject.upstream_ca_file`, else the
  system store. Authorization servers are verified against `oauth.ca_file`. A certificate
  that does not verify is a CertificateRefused naming the party and the cause; nothing is
  sent to that server.

This module holds the checks themselves; discovery.py, tokens.py and service.py apply them.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from agent.fsutil import atomic_write
from agent.oauth.errors import InsecureEndpoint, TrustRefused
from agent.urls import origin


def host_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host literal names (brackets allowed), an IPv4-mapped IPv6 one as the
    IPv4 address the kernel takes it for (::ffff:0.0.0.0 is 0.0.0.0); None for a name."""
    try:
        ip = ipaddress.ip_address(host.lower().strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback_host(host: str) -> bool:
    """A loopback address literal (127.0.0.0/8, ::1, IPv4-mapped 127.x) or `localhost`.
    Any other name is not loopback here, whatever it resolves to."""
    if host.lower().strip("[]") == "localhost":
        return True
    ip = host_address(host)
    return ip is not None and ip.is_loopback


def insecure_reason(url: object) -> str | None:
    """None when url is https, or http to a loopback host; else what is wrong with it."""
    if not isinstance(url, str):
        return "not a URL"
    try:
        p = urlsplit(url)
        host = p.hostname
        p.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        return "not a valid URL"
    if p.scheme not in ("https", "http") or not host:
        return "not an absolute https URL"
    if p.scheme == "http" and not is_loopback_host(host):
        return (
            "plain http to a host that is not loopback: https is required (http is "
            "allowed only to 127.0.0.0/8, ::1 or localhost)"
        )
    return None


def check_endpoint(url: object, what: str) -> str:
    """url itself when the agent may use it for `what`; else InsecureEndpoint."""
    reason = insecure_reason(url)
    if reason is None and isinstance(url, str):  # (a URL that is not a str has a reason)
        return url
    raise InsecureEndpoint(
        f"{what} {url!r} refused: {reason}", url=url if isinstance(url, str) else None
    )


def same_origin(a: str, b: str) -> bool:
    oa = origin(a)
    return oa is not None and oa == origin(b)


def _issuer_key(url: str) -> tuple:
    o = origin(url)
    if o is None:
        return (url,)
    p = urlsplit(url)
    return o, p.path.rstrip("/"), p.query


def choose_authorization_server(named: Iterable[str], allowed: Iterable[str]) -> str | None:
    """The first AS the metadata names that is allowed, spelt as allowed (the operator's
    spelling is the issuer identifier the agent uses); None when none is. Names compare with
    case-insensitive scheme and host, default ports and a trailing slash ignored; paths
    (tenants) must be equal."""
    wanted = {_issuer_key(a): a for a in allowed}
    for n in named:
        hit = wanted.get(_issuer_key(n))
        if hit is not None:
            return hit
    return None


class PinStore:
    """Authorization servers pinned on first discovery, one per (server name, resource), in
    <state_dir>/oauth/authorization_servers.json (0600, written atomically). A pin is never
    moved by the agent: to trust another AS, list it in the server's `authorization_servers`
    or delete the entry (or the file) while the agent is stopped."""

    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / "oauth" / "authorization_servers.json"
        self._lock = threading.Lock()

    @staticmethod
    def _key(server: str, resource: str) -> str:
        return f"{server} {resource}"

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # fail closed: an unreadable pin file must not become "nothing pinned"
            raise TrustRefused(
                f"{self.path}: cannot read pinned authorization servers "
                f"({e}); fix or remove the file"
            ) from None
        if not isinstance(data, dict):
            raise TrustRefused(f"{self.path}: not a JSON object; fix or remove the file")
        return data

    def get(self, server: str, resource: str) -> str | None:
        with self._lock:
            entry = self._read().get(self._key(server, resource))
        return entry.get("issuer") if isinstance(entry, dict) else None

    def pin(self, server: str, resource: str, issuer: str) -> str:
        """Pin issuer unless an AS is pinned already; return the pinned one."""
        with self._lock:
            data = self._read()
            entry = data.get(self._key(server, resource))
            if isinstance(entry, dict) and isinstance(entry.get("issuer"), str):
                return entry["issuer"]
            data[self._key(server, resource)] = {
                "server": server,
                "resource": resource,
                "issuer": issuer,
                "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True).encode(), 0o600)
            return issuer


@functools.cache
def verifying_context(ca_file: str = "") -> ssl.SSLContext:
    """A TLS client context verifying servers against ca_file (empty: the system store),
    hostname checked, TLS 1.2 at least, HTTP/1.1. One per file, shared by everything that
    connects with it (the proxy's pool, discovery's client): built once, read only after."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@dataclass(frozen=True)
class ServerTls:
    """How credless verifies one MCP server's certificate: the CA bundle and which setting
    chose it (said in every error about it)."""

    ca_file: str  # empty: the system store
    source: str  # "servers[NAME].ca_file", "inject.upstream_ca_file" or "the system store"

    @property
    def context(self) -> ssl.SSLContext:
        return verifying_context(self.ca_file)

    def describe(self) -> str:
        return f"{self.source} ({self.ca_file})" if self.ca_file else self.source


def server_tls(name: str, ca_file: str, upstream_ca_file: str) -> ServerTls:
    """The one trust decision for MCP server `name` (its [[servers]] ca_file, and
    inject.upstream_ca_file): used by discovery's probe and metadata reads and by the
    proxy's upstream connections alike, so that they cannot disagree."""
    if ca_file:
        return ServerTls(ca_file, f"servers[{name}].ca_file")
    if upstream_ca_file:
        return ServerTls(upstream_ca_file, "inject.upstream_ca_file")
    return ServerTls("", "the system store")


def authorization_server_tls(oauth_ca_file: str) -> ServerTls:
    return (
        ServerTls(oauth_ca_file, "oauth.ca_file")
        if oauth_ca_file
        else ServerTls("", "the system store")
    )


def certificate_failure(exc: BaseException | None) -> str | None:
    """What failed in a TLS handshake somewhere in exc's chain (the OpenSSL reason, e.g.
    "certificate verify failed: unable to get local issuer certificate"); None when exc
    is not a TLS failure."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {exc.verify_message or exc.reason}"
        if isinstance(exc, ssl.SSLError):
            return f"TLS handshake failed: {exc.reason or exc}"
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


class CertificateRefused(TrustRefused, kind="certificate"):
    """A server's certificate did not verify, so nothing was sent to it. The message names
    the party, the cause and the setting that chose the CA it was verified against."""

    party = "server"
    setting = ""

    def __init__(self, url: str, cause: str, tls: ServerTls):
        super().__init__(
            f"the {self.party}'s certificate did not verify ({cause}) at {url}; it was "
            f"verified against {tls.describe()}. Nothing was sent to it. If it is the right "
            f"server, set {self.setting} to the CA bundle that issued its certificate",
            url=url,
        )


class McpServerCertificateRefused(CertificateRefused, kind="mcp_server_certificate"):
    party = "MCP server"
    setting = "its servers.ca_file (or inject.upstream_ca_file)"


class AuthorizationServerCertificateRefused(
    CertificateRefused, kind="authorization_server_certificate"
):
    party = "authorization server"
    setting = "oauth.ca_file"


def refuse_certificate(
    exc: BaseException,
    url: str,
    tls: ServerTls,
    refused: type[CertificateRefused] = AuthorizationServerCertificateRefused,
) -> None:
    """Raise refused(url, cause, tls) when exc is a TLS failure: the server answered with a
    certificate that did not verify against tls, so nothing was sent to it. That is not
    "unavailable" (retrying will not help; the trust setting might); any other exc is left
    to the caller."""
    cause = certificate_failure(exc)
    if cause is not None:
        raise refused(url, cause, tls) from None
