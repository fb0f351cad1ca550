"""Discovery: from an MCP server URL to its authorization server's token endpoint.

Order (MCP authorization, RFC 9728, RFC 8414):
1. the `resource_metadata` parameter of the server's 401 `WWW-Authenticate` challenge, if it
   is on the server's own origin;
2. else the well-known protected-resource URL with the MCP path, then without it;
3. an authorization server the resource names (which one: service.py, by the allow list),
   whose metadata is read from /.well-known/oauth-authorization-server, then the OpenID
   discovery URLs.
Every document must name what it was fetched for (`resource`, `issuer`); a mismatch is an
error, not a warning: it is how a hostile resource would point the agent at its own server.
Every URL fetched, and every endpoint the metadata names, must be https or http to a
loopback host (trust.py). Results are cached for `ttl` seconds; configured values bypass
discovery entirely.

A challenge's `resource_metadata` URL on another origin (scheme, host, port) is *ignored*,
never fetched: the challenge comes from an unauthenticated exchange, and a URL chosen there
would make the agent (root, on the host network) GET anything the server likes. RFC 9728
§3 derives the metadata URL from the resource identifier, so the well-known URLs on the
server's origin are where its metadata lives; a server whose metadata is hosted elsewhere
still works if it also publishes it at those well-known URLs. Ignored rather than refused:
refusing would gain nothing, since the server controls its own well-known documents anyway
(which face the same checks). The ignored URL is reported (audited by the service as
oauth.refused, check = resource_metadata_origin).

Two parties, two trusts, one client: a request to the MCP server (the probe, its resource
metadata) carries that server's trust (trust.server_tls(), the decision the proxy's upstream
connections follow too) in its SERVER_TLS extension, which TlsRouter, the client's
transport, verifies it by; a request to the authorization server carries none and is
verified against oauth.ca_file. A certificate that does not verify is a CertificateRefused
naming which of the two parties it was.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from agent import jsondoc
from agent.oauth import trust
from agent.oauth.errors import DiscoveryError, MetadataMismatch, unavailable
from agent.oauth.trust import (
    AuthorizationServerCertificateRefused,
    CertificateRefused,
    McpServerCertificateRefused,
    ServerTls,
)
from agent.observe.logging import get_logger

log = get_logger("oauth")

_PARAM = re.compile(r'([A-Za-z0-9_!#$%&\'*+.^`|~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]+)')
_SCHEME = re.compile(r"([A-Za-z0-9_!#$%&'*+.^`|~-]+)(?=\s|$|,)")
# a challenge is a few hundred bytes; a server's longer one is read this far only, since the
# quoted-string pattern may scan to the end from each position it is tried at
MAX_CHALLENGE = 8192


def canonical_resource(url: str) -> str:
    """The canonical MCP server URI (RFC 8707 resource): lowercase scheme and host, no
    fragment, no trailing slash."""
    p = urlsplit(url)
    if p.scheme not in ("http", "https") or not p.netloc:
        raise DiscoveryError(f"{url!r} is not an absolute http(s) URL")
    path = p.path.rstrip("/")
    return urlunsplit((p.scheme.lower(), p.netloc.lower(), path, p.query, ""))


def parse_www_authenticate(header: str) -> dict[str, dict[str, str]]:
    """{scheme (lowercase): {param: value}} from a WWW-Authenticate value (RFC 9110 §11.6.1).

    Tolerant by design: it only needs to find auth-params such as resource_metadata, scope,
    error and algs, in one or several challenges.
    """
    out: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    header = header[:MAX_CHALLENGE]
    pos = 0
    while pos < len(header):
        m_param = _PARAM.match(header, pos)
        if m_param and current is not None:
            value = m_param.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            current[m_param.group(1).lower()] = value
            pos = m_param.end()
        else:
            m_scheme = _SCHEME.match(header, pos)  # at pos: no copy of the rest each time
            if m_scheme:
                current = out.setdefault(m_scheme.group(1).lower(), {})
                pos = m_scheme.end()
            else:
                pos += 1
        while pos < len(header) and header[pos] in " ,\t":
            pos += 1
    return out


def _well_known(url: str, name: str, *, keep_path: bool) -> str:
    p = urlsplit(url)
    path = p.path.rstrip("/")
    suffix = path if keep_path and path else ""
    return urlunsplit((p.scheme, p.netloc, f"/.well-known/{name}{suffix}", "", ""))


@dataclass(frozen=True)
class ResourceMetadata:
    resource: str
    authorization_servers: tuple[str, ...]
    scopes_supported: tuple[str, ...] = ()
    dpop_bound_access_tokens_required: bool = False
    challenge_scope: str | None = None  # the scope the 401 challenge asked for, if any
    ignored_metadata_url: str | None = None  # the challenge's, when on another origin
    # the auth schemes the server's 401 challenge named (lower case: "bearer", "dpop"); empty
    # when it sent no challenge or the metadata came from the cache without one
    challenge_schemes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServerMetadata:
    issuer: str
    token_endpoint: str
    registration_endpoint: str | None = None
    introspection_endpoint: str | None = None
    revocation_endpoint: str | None = None
    token_endpoint_auth_methods_supported: tuple[str, ...] = ()
    dpop_signing_alg_values_supported: tuple[str, ...] = ()
    raw: dict = field(default_factory=dict, compare=False)


# the request extension naming the ServerTls an MCP server's request is verified by
SERVER_TLS = "credless.server_tls"
SYSTEM_STORE = ServerTls("", "the system store")


@dataclass(frozen=True)
class Peer:
    """A party discovery talks to: the trust it is verified by, and the error a certificate
    failure is. `route`: the request carries tls (SERVER_TLS) for TlsRouter; else the
    client's default trust (oauth.ca_file) applies, which tls describes."""

    tls: ServerTls
    refused: type[CertificateRefused]
    route: bool

    def extensions(self) -> dict[str, Any]:
        return {SERVER_TLS: self.tls} if self.route else {}


class TlsRouter(httpx.AsyncBaseTransport):
    """The OAuth client's transport: a request carrying SERVER_TLS (to an MCP server) is
    verified by that trust, any other (to an authorization server) by `default`'s."""

    def __init__(self, default: httpx.AsyncBaseTransport):
        self._default = default
        self._by_ca: dict[str, httpx.AsyncHTTPTransport] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        tls = request.extensions.get(SERVER_TLS)
        if not isinstance(tls, ServerTls):
            return await self._default.handle_async_request(request)
        transport = self._by_ca.get(tls.ca_file)
        if transport is None:
            transport = self._by_ca[tls.ca_file] = httpx.AsyncHTTPTransport(
                verify=tls.context, trust_env=False
            )
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self._default.aclose()
        for t in self._by_ca.values():
            await t.aclose()
        self._by_ca.clear()


class Discovery:
    def __init__(
        self,
        http: httpx.AsyncClient,
        ttl: float = 300.0,
        clock=time.monotonic,
        mcp_tls: Callable[[str], ServerTls] | None = None,
        as_tls: ServerTls = SYSTEM_STORE,
    ):
        """http: the client (its transport a TlsRouter, for mcp_tls to take effect);
        mcp_tls(url): how the MCP server at url is verified (None: as the client verifies
        by default); as_tls: how the client verifies by default (for error messages)."""
        self.http = http
        self._as = Peer(as_tls, AuthorizationServerCertificateRefused, route=False)
        self._mcp_tls = mcp_tls
        self.ttl = ttl
        self.clock = clock
        self._cache: dict[tuple[str, str], tuple[float, Any]] = {}
        # resource metadata being read, by resource: concurrent readers (a token pre-fetch on
        # exec and the process's first request) share one probe of the MCP server
        self._reading: dict[str, asyncio.Future[ResourceMetadata]] = {}
        # authorization server metadata being read, by issuer (shared the same way)
        self._reading_as: dict[str, asyncio.Future[ServerMetadata]] = {}
        # every authorization server endpoint discovered so far (never expires: a JWT-SVID
        # for any of them is a client assertion there; see OAuthService.assertion_audiences).
        # Replaced whole, never changed in place: other threads read it without a lock.
        self.endpoints: frozenset[str] = frozenset()

    def _cached(self, kind: str, key: str):
        hit = self._cache.get((kind, key))
        if hit and self.clock() - hit[0] < self.ttl:
            log.debug("discovery cache hit", kind=kind, key=key)
            return hit[1]
        return None

    def invalidate(self) -> None:
        self._cache.clear()

    def _mcp_peer(self, mcp_url: str) -> Peer:
        if self._mcp_tls is None:
            return Peer(self._as.tls, McpServerCertificateRefused, route=False)
        return Peer(self._mcp_tls(mcp_url), McpServerCertificateRefused, route=True)

    async def _get_json(self, url: str, peer: Peer, what: str) -> tuple[int, Any]:
        """GET a JSON document; what: the request, in words (for its failure)."""
        try:
            r = await self.http.get(
                url, headers={"Accept": "application/json"}, extensions=peer.extensions()
            )
        except httpx.HTTPError as e:
            trust.refuse_certificate(e, url, peer.tls, peer.refused)
            raise unavailable(e, what, url) from None
        log.debug("discovery fetched", what=what, url=url, status=r.status_code)
        if r.status_code != 200:
            return r.status_code, None
        try:
            return 200, jsondoc.loads(r.content)
        except ValueError:
            raise DiscoveryError(f"{url} did not return JSON", url=url) from None

    async def challenge(self, mcp_url: str) -> dict[str, dict[str, str]]:
        """Ask the MCP server without credentials and read its 401 challenge (if any)."""
        body = {"jsonrpc": "2.0", "id": 0, "method": "ping"}
        peer = self._mcp_peer(mcp_url)
        try:
            r = await self.http.post(
                mcp_url,
                json=body,
                headers={"Accept": "application/json, text/event-stream"},
                extensions=peer.extensions(),
            )
        except httpx.HTTPError as e:
            trust.refuse_certificate(e, mcp_url, peer.tls, peer.refused)
            raise unavailable(e, "unauthenticated probe of the MCP server", mcp_url) from None
        challenge = r.headers.get("www-authenticate", "") if r.status_code in (401, 403) else ""
        log.debug(
            "MCP server probed", url=mcp_url, status=r.status_code, challenge=challenge or None
        )
        return parse_www_authenticate(challenge) if challenge else {}

    async def resource(
        self,
        mcp_url: str,
        www_authenticate: str | None = None,
        report: Callable[[str, str], None] | None = None,
    ) -> ResourceMetadata:
        """The protected resource metadata of mcp_url. `report(url, reason)` is told of a
        challenge's metadata URL that was ignored (another origin)."""
        resource = canonical_resource(mcp_url)
        cached = self._cached("prm", resource)
        if cached is not None and www_authenticate is None:
            return cached
        if www_authenticate is not None:  # a challenge of its own: read for this caller
            return await self._read_resource(mcp_url, resource, www_authenticate, report)
        reading = self._reading.get(resource)
        if reading is None:
            reading = asyncio.ensure_future(self._read_resource(mcp_url, resource, None, report))
            self._reading[resource] = reading
            reading.add_done_callback(lambda _f: self._reading.pop(resource, None))
        # shielded: a caller that gives up does not cancel the read the others wait on
        return await asyncio.shield(reading)

    async def _read_resource(
        self,
        mcp_url: str,
        resource: str,
        www_authenticate: str | None,
        report: Callable[[str, str], None] | None,
    ) -> ResourceMetadata:
        with_path = _well_known(mcp_url, "oauth-protected-resource", keep_path=True)
        root = _well_known(mcp_url, "oauth-protected-resource", keep_path=False)
        for url in (with_path, root):
            trust.check_endpoint(url, f"protected resource metadata URL of {resource}")
        challenges = (
            parse_www_authenticate(www_authenticate)
            if www_authenticate
            else await self.challenge(mcp_url)
        )
        params = challenges.get("bearer") or challenges.get("dpop") or {}
        candidates = []
        ignored = params.get("resource_metadata") or None
        if ignored and trust.same_origin(ignored, mcp_url):
            candidates.append(ignored)
            ignored = None
        elif ignored and report is not None:
            report(
                ignored,
                f"the 401 challenge of {resource} names resource metadata at "
                f"{ignored!r}, not on the server's origin: ignored, never fetched; the "
                "well-known URLs on the server's origin are used instead (RFC 9728 §3)",
            )
        candidates += [with_path, root]
        tried = []
        peer = self._mcp_peer(mcp_url)  # every candidate is on the MCP server's origin
        for url in dict.fromkeys(candidates):
            status, doc = await self._get_json(url, peer, "protected resource metadata request")
            tried.append(f"{url} (HTTP {status})")
            if doc is None:
                continue
            # RFC 9728 §3.3: `resource` is the identifier the URL was made from: the MCP URL,
            # or, for the origin's own well-known URL, the origin
            identifiers = {resource}
            if _same_url(url, root):
                identifiers.add(canonical_resource(root.split("/.well-known/", 1)[0]))
            meta = self._parse_prm(doc, resource, url, params.get("scope"), identifiers, ignored)
            meta = dataclasses.replace(meta, challenge_schemes=tuple(challenges))
            self._cache[("prm", resource)] = (self.clock(), meta)
            return meta
        raise DiscoveryError(
            f"no protected resource metadata for {resource}; tried "
            + ", ".join(tried)
            + "; or configure the server's issuer",
            url=mcp_url,
        )

    @staticmethod
    def _parse_prm(
        doc: Any,
        resource: str,
        url: str,
        scope: str | None,
        identifiers: set[str] | None = None,
        ignored: str | None = None,
    ) -> ResourceMetadata:
        if not isinstance(doc, dict):
            raise DiscoveryError(
                f"{url}: protected resource metadata is not a JSON object", url=url
            )
        got = doc.get("resource")
        try:
            ok = isinstance(got, str) and canonical_resource(got) in (identifiers or {resource})
        except DiscoveryError:
            ok = False
        if not ok:
            raise MetadataMismatch(
                f"{url}: protected resource metadata is for resource "
                f"{got!r}, not {resource} (RFC 9728 §3.3)",
                url=url,
            )
        servers = doc.get("authorization_servers")
        if (
            not isinstance(servers, list)
            or not servers
            or not all(isinstance(s, str) for s in servers)
        ):
            raise DiscoveryError(
                f"{url}: authorization_servers must list at least one issuer", url=url
            )
        jwks = doc.get("jwks_uri")
        if jwks is not None:
            trust.check_endpoint(jwks, f"{url}: jwks_uri")
        return ResourceMetadata(
            resource,
            tuple(servers),
            _strings(doc, "scopes_supported"),
            bool(doc.get("dpop_bound_access_tokens_required")),
            scope,
            ignored,
        )

    async def server(self, issuer: str) -> ServerMetadata:
        cached = self._cached("as", issuer)
        if cached is not None:
            return cached
        # concurrent readers (many first requests at once, the start-up read of
        # agent/oauth/audiences.py) share one read: two hundred at once each opened a
        # connection of their own, and on a loaded node waited out the client's pool
        reading = self._reading_as.get(issuer)
        if reading is None:
            reading = asyncio.ensure_future(self._read_server(issuer))
            self._reading_as[issuer] = reading
            reading.add_done_callback(lambda _f: self._reading_as.pop(issuer, None))
        # shielded: a caller that gives up does not cancel the read the others wait on
        return await asyncio.shield(reading)

    async def _read_server(self, issuer: str) -> ServerMetadata:
        trust.check_endpoint(issuer, "authorization server issuer")
        p = urlsplit(issuer)
        path = p.path.rstrip("/")
        base = urlunsplit((p.scheme, p.netloc, "", "", ""))
        urls = [
            f"{base}/.well-known/oauth-authorization-server{path}",
            f"{base}/.well-known/openid-configuration{path}",
        ]
        if path:
            urls.append(f"{base}{path}/.well-known/openid-configuration")
        tried = []
        for url in urls:
            status, doc = await self._get_json(
                url, self._as, "authorization server metadata request"
            )
            tried.append(f"{url} (HTTP {status})")
            if doc is None:
                continue
            meta = self._parse_as(doc, issuer, url)
            self._cache[("as", issuer)] = (self.clock(), meta)
            self.endpoints = self.endpoints | assertion_endpoints(doc)
            return meta
        raise DiscoveryError(
            f"no authorization server metadata for {issuer}; tried " + ", ".join(tried), url=issuer
        )

    @staticmethod
    def _parse_as(doc: Any, issuer: str, url: str) -> ServerMetadata:
        if not isinstance(doc, dict) or doc.get("issuer") != issuer:
            got = doc.get("issuer") if isinstance(doc, dict) else None
            raise MetadataMismatch(
                f"{url}: metadata names issuer {got!r}, expected {issuer} (RFC 8414 §3.3)", url=url
            )
        token = doc.get("token_endpoint")
        if not isinstance(token, str):
            raise DiscoveryError(f"{url}: no usable token_endpoint", url=url)
        # every endpoint the agent could use on this document's word: https unless loopback
        # (jwks_uri too: an AS publishing its keys in clear is not one to send assertions to)
        for key in (
            "token_endpoint",
            "registration_endpoint",
            "introspection_endpoint",
            "revocation_endpoint",
            "jwks_uri",
        ):
            if doc.get(key) is not None:
                trust.check_endpoint(doc[key], f"{url}: {key}")

        def opt(key: str) -> str | None:
            v = doc.get(key)
            return v if isinstance(v, str) else None

        return ServerMetadata(
            issuer=issuer,
            token_endpoint=token,
            registration_endpoint=opt("registration_endpoint"),
            introspection_endpoint=opt("introspection_endpoint"),
            revocation_endpoint=opt("revocation_endpoint"),
            token_endpoint_auth_methods_supported=_strings(
                doc, "token_endpoint_auth_methods_supported"
            ),
            dpop_signing_alg_values_supported=_strings(doc, "dpop_signing_alg_values_supported"),
            raw=doc,
        )


def assertion_endpoints(doc: dict) -> frozenset[str]:
    """Every URL in authorization server metadata that may take a client assertion: the
    issuer, every `*_endpoint` member (token, registration, introspection, revocation, and
    those credless never calls: PAR, device authorization, CIBA, ...) and every
    `mtls_endpoint_aliases` value (RFC 8705 §5). A member credless does not know by name
    still counts: an AS accepts the URL of the endpoint being called as an assertion's
    audience, on whatever origin the document puts it."""
    urls = [v for k, v in doc.items() if k == "issuer" or k.endswith("_endpoint")]
    aliases = doc.get("mtls_endpoint_aliases")
    if isinstance(aliases, dict):
        urls += aliases.values()
    return frozenset(u for u in urls if isinstance(u, str) and u)


def _strings(doc: dict, key: str) -> tuple[str, ...]:
    """The strings of a metadata member that is a JSON array (RFC 8414 §2, RFC 9728 §2);
    anything else, a string included, is no list of one-letter values: none."""
    v = doc.get(key)
    return tuple(x for x in v if isinstance(x, str)) if isinstance(v, list) else ()


def _same_url(a: str, b: str) -> bool:
    """The same http(s) URL up to the spelling of its origin and a trailing slash."""
    pa, pb = urlsplit(a), urlsplit(b)
    return (
        trust.same_origin(a, b)
        and pa.path.rstrip("/") == pb.path.rstrip("/")
        and pa.query == pb.query
    )
