"""Discovery's fetching, caching and trust routing, at the edges `make mutate` found unpinned
(docs/mutation.md, "Triage"): which URLs are asked and in what order, which answers count,
how long a document is believed, which trust each request is verified by, and what an
operator reads when discovery fails. Sans-IO: every request goes to an httpx MockTransport
(nothing is dialled) and time is an injected clock."""

from __future__ import annotations

import asyncio
import json
import ssl

import httpx
import pytest

from agent.oauth import discovery as disc
from agent.oauth import errors
from agent.oauth.discovery import SERVER_TLS, Discovery, ServerMetadata, TlsRouter
from agent.oauth.trust import (
    AuthorizationServerCertificateRefused,
    McpServerCertificateRefused,
    ServerTls,
)

MCP = "https://mcp.example/mcp"
PATH_PRM = "https://mcp.example/.well-known/oauth-protected-resource/mcp"
ROOT_PRM = "https://mcp.example/.well-known/oauth-protected-resource"
AS = "https://as.example"
AS_META = f"{AS}/.well-known/oauth-authorization-server"
OIDC = f"{AS}/.well-known/openid-configuration"


def prm(servers=(AS,), **over) -> dict:
    return {"resource": MCP, "authorization_servers": list(servers), **over}


def as_doc(issuer: str = AS, **over) -> dict:
    return {"issuer": issuer, "token_endpoint": f"{issuer}/token", **over}


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Net:
    """The MCP server and the authorization server, as documents by URL. `docs` may change
    between calls; `challenge` is the probe's WWW-Authenticate (its status: `status`)."""

    def __init__(self, docs: dict | None = None, challenge: str = 'Bearer realm="x"'):
        self.docs = dict(docs or {})
        self.challenge = challenge
        self.status = 401
        self.requests: list[httpx.Request] = []
        self.fail: dict[str, Exception] = {}  # url -> raised instead of answering

    @property
    def asked(self) -> list[str]:
        return [f"{r.method} {r.url}" for r in self.requests]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        url = str(request.url)
        if url in self.fail:
            raise self.fail[url]
        if request.method == "POST":
            headers = {"WWW-Authenticate": self.challenge} if self.challenge else {}
            return httpx.Response(self.status, headers=headers)
        doc = self.docs.get(url)
        if doc is None:
            return httpx.Response(404)
        if isinstance(doc, bytes):
            return httpx.Response(200, content=doc)
        return httpx.Response(200, json=doc)


def run(net: Net, call, **kw):
    """call(Discovery) over net; its result, or the OAuthError it raised."""

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(net)) as http:
            try:
                return await call(Discovery(http, **kw))
            except errors.OAuthError as e:
                return e

    return asyncio.run(main())


# ------------------------------------------------------------------------- what is cached


def test_resource_metadata_is_believed_for_ttl_seconds_then_read_again():
    """The default ttl is 300 s: a document read at t is served from memory until t+300,
    then read again (a server that moved its authorization server is followed)."""
    clock = Clock()
    net = Net({PATH_PRM: prm()})

    async def call(d):
        first = await d.resource(MCP)
        n = len(net.requests)
        net.docs[PATH_PRM] = prm(servers=["https://as2.example"])
        clock.t += 299.5
        assert await d.resource(MCP) == first and len(net.requests) == n
        clock.t += 0.5  # 300 s old: stale
        again = await d.resource(MCP)
        assert len(net.requests) > n
        return first, again

    first, again = run(net, call, clock=clock)
    assert first.authorization_servers == (AS,)
    assert again.authorization_servers == ("https://as2.example",)


def test_authorization_server_metadata_is_believed_for_ttl_seconds_then_read_again():
    clock = Clock()
    net = Net({AS_META: as_doc()})

    async def call(d):
        first = await d.server(AS)
        assert net.asked == [f"GET {AS_META}"]
        net.docs[AS_META] = as_doc(token_endpoint=f"{AS}/token2")
        clock.t += 9.9
        assert await d.server(AS) == first and len(net.requests) == 1
        clock.t += 0.1
        return await d.server(AS)

    again = run(net, call, clock=clock, ttl=10)
    assert again.token_endpoint == f"{AS}/token2" and len(net.requests) == 2


def test_invalidate_forgets_every_document():
    net = Net({PATH_PRM: prm(), AS_META: as_doc()})

    async def call(d):
        await d.resource(MCP)
        await d.server(AS)
        n = len(net.requests)
        d.invalidate()
        await d.resource(MCP)
        await d.server(AS)
        return len(net.requests) - n

    assert run(net, call) > 2  # both read again: the probe, the resource's, the AS's


def test_a_resource_and_an_issuer_spelt_alike_are_cached_apart():
    """The cache is keyed by what a document is, not only by its URL: an issuer that is
    also an MCP server URL gets authorization server metadata, not resource metadata."""
    net = Net(
        {
            "https://mcp.example/.well-known/oauth-protected-resource/mcp": prm(),
            "https://mcp.example/.well-known/oauth-authorization-server/mcp": as_doc(MCP),
        }
    )

    async def call(d):
        res = await d.resource(MCP)
        srv = await d.server(MCP)
        return res, srv

    res, srv = run(net, call)
    assert isinstance(srv, ServerMetadata) and srv.issuer == MCP
    assert res.authorization_servers == (AS,)


def test_a_challenge_of_its_own_is_read_afresh_not_served_from_the_cache():
    """A 401 names the scope the server now asks for: resource(url, challenge) reads it,
    even with a cached document, and that read refreshes the cache."""
    net = Net({PATH_PRM: prm()})

    async def call(d):
        plain = await d.resource(MCP)
        n = len(net.requests)
        net.docs[PATH_PRM] = prm(servers=["https://as2.example"])
        fresh = await d.resource(MCP, 'Bearer scope="tools:call"')
        assert len(net.requests) > n
        cached = await d.resource(MCP)
        return plain, fresh, cached

    plain, fresh, cached = run(net, call)
    assert plain.challenge_scope is None and fresh.challenge_scope == "tools:call"
    assert fresh.authorization_servers == ("https://as2.example",)
    assert cached == fresh


def test_concurrent_readers_share_one_probe_and_a_later_reader_reads_again():
    clock = Clock()
    net = Net({PATH_PRM: prm()})

    async def call(d):
        a, b = await asyncio.gather(d.resource(MCP), d.resource(MCP))
        assert a == b
        assert [u for u in net.asked if u.startswith("POST")] == [f"POST {MCP}"]
        clock.t += 1000  # expired: the finished read is not handed out again
        net.docs[PATH_PRM] = prm(servers=["https://as2.example"])
        return await d.resource(MCP)

    later = run(net, call, clock=clock)
    assert later.authorization_servers == ("https://as2.example",)
    assert [u for u in net.asked if u.startswith("POST")] == [f"POST {MCP}"] * 2


def test_a_reader_that_gives_up_does_not_cancel_the_read_others_wait_on():
    async def main():
        probed, gate = asyncio.Event(), asyncio.Event()
        seen: list[str] = []

        async def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request.method)
            if request.method == "POST":
                probed.set()
                await gate.wait()
                return httpx.Response(401, headers={"WWW-Authenticate": "Bearer"})
            return httpx.Response(200, json=prm())

        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            d = Discovery(http)
            quitter = asyncio.ensure_future(d.resource(MCP))
            waiter = asyncio.ensure_future(d.resource(MCP))
            await probed.wait()  # the shared read is under way
            quitter.cancel()
            gate.set()
            meta = await waiter
            return meta, quitter.cancelled(), seen

    meta, cancelled, seen = asyncio.run(main())
    assert cancelled and meta.authorization_servers == (AS,)
    assert seen.count("POST") == 1


def test_concurrent_readers_of_an_authorization_server_share_one_read():
    """Two hundred first requests at once each read the AS's metadata on a connection of
    their own, and on a loaded node waited out the HTTP client's pool (test_oauth.py's
    two hundred concurrent requests failed so, "no connection free within 10.0 s"). They
    share one read now; a reader after it has expired reads again."""
    clock = Clock()
    net = Net({AS_META: as_doc()})

    async def call(d):
        metas = await asyncio.gather(*(d.server(AS) for _ in range(200)))
        assert all(m == metas[0] for m in metas)
        assert net.asked == [f"GET {AS_META}"]
        clock.t += 1000  # expired: the finished read is not handed out again
        return await d.server(AS)

    later = run(net, call, clock=clock)
    assert later.token_endpoint == f"{AS}/token"
    assert net.asked == [f"GET {AS_META}"] * 2


def test_a_reader_of_an_authorization_server_that_gives_up_cancels_no_other():
    async def main():
        asked, gate = asyncio.Event(), asyncio.Event()
        seen: list[str] = []

        async def handler(request: httpx.Request) -> httpx.Response:
            seen.append(str(request.url))
            asked.set()
            await gate.wait()
            return httpx.Response(200, json=as_doc())

        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            d = Discovery(http)
            quitter = asyncio.ensure_future(d.server(AS))
            waiter = asyncio.ensure_future(d.server(AS))
            await asked.wait()  # the shared read is under way
            quitter.cancel()
            gate.set()
            meta = await waiter
            return meta, quitter.cancelled(), seen

    meta, cancelled, seen = asyncio.run(main())
    assert cancelled and meta.issuer == AS
    assert seen == [AS_META]


# --------------------------------------------------------------------- the unauthenticated probe


def test_the_probe_is_a_json_rpc_ping_an_mcp_server_accepts():
    """MCP Streamable HTTP: a POST must accept both JSON and an event stream (a server may
    answer 406 before it ever challenges), and carry a JSON-RPC request."""
    net = Net({PATH_PRM: prm()})
    run(net, lambda d: d.resource(MCP))
    probe = net.requests[0]
    assert probe.method == "POST" and str(probe.url) == MCP
    assert probe.headers["accept"] == "application/json, text/event-stream"
    assert json.loads(probe.content) == {"jsonrpc": "2.0", "id": 0, "method": "ping"}
    assert "authorization" not in probe.headers


@pytest.mark.parametrize("status", [401, 403])
def test_a_401_or_403_challenge_is_read(status):
    net = Net(challenge='Bearer error="insufficient_scope", scope="a b"')
    net.status = status
    assert run(net, lambda d: d.challenge(MCP)) == {
        "bearer": {"error": "insufficient_scope", "scope": "a b"}
    }


@pytest.mark.parametrize("status", [200, 400, 404, 500])
def test_a_www_authenticate_on_any_other_answer_is_no_challenge(status):
    net = Net(challenge='Bearer scope="a"')
    net.status = status
    assert run(net, lambda d: d.challenge(MCP)) == {}


def test_a_probe_without_a_challenge_header_reads_none():
    net = Net(challenge="")
    assert run(net, lambda d: d.challenge(MCP)) == {}


def _tls_failure(request: httpx.Request) -> httpx.ConnectError:
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_message = "unable to get local issuer certificate"
    err = httpx.ConnectError("handshake", request=request)
    err.__cause__ = cause
    return err


def test_a_probe_that_gets_no_answer_says_which_request_to_which_url():
    net = Net()
    net.fail[MCP] = httpx.ConnectError("connection refused")
    err = run(net, lambda d: d.challenge(MCP))
    assert isinstance(err, errors.ServerUnavailable) and err.url == MCP
    assert str(err) == (
        f"unauthenticated probe of the MCP server to {MCP}: could not connect (connection refused)"
    )


# ------------------------------------------------------------------------- which trust verifies


MCP_TLS = ServerTls("/etc/credless/mcp-ca.pem", "servers[tools].ca_file")
AS_TLS = ServerTls("/etc/credless/as-ca.pem", "oauth.ca_file")


def test_mcp_requests_carry_the_servers_trust_and_as_requests_carry_none():
    asked_tls: list[str] = []
    net = Net({PATH_PRM: prm(), AS_META: as_doc()})

    def mcp_tls(url: str) -> ServerTls:
        asked_tls.append(url)
        return MCP_TLS

    async def call(d):
        await d.resource(MCP)
        await d.server(AS)

    run(net, call, mcp_tls=mcp_tls, as_tls=AS_TLS)
    by_url = {f"{r.method} {r.url}": r.extensions.get(SERVER_TLS) for r in net.requests}
    assert by_url == {f"POST {MCP}": MCP_TLS, f"GET {PATH_PRM}": MCP_TLS, f"GET {AS_META}": None}
    assert set(asked_tls) == {MCP}


@pytest.mark.parametrize("mcp_tls", [None, lambda _url: MCP_TLS])
def test_an_mcp_server_certificate_that_does_not_verify_names_the_mcp_server(mcp_tls):
    """The refusal names the party and the trust it was verified against: the server's own
    (servers.ca_file), or without one the client's default (as_tls)."""
    net = Net()
    net.fail[MCP] = _tls_failure(httpx.Request("POST", MCP))
    err = run(net, lambda d: d.challenge(MCP), mcp_tls=mcp_tls, as_tls=AS_TLS)
    assert type(err) is McpServerCertificateRefused and err.url == MCP
    want = MCP_TLS if mcp_tls else AS_TLS
    assert want.describe() in str(err)
    assert all(SERVER_TLS not in r.extensions for r in net.requests) == (mcp_tls is None)


def test_a_metadata_read_whose_certificate_does_not_verify_names_its_party():
    net = Net()
    net.fail[PATH_PRM] = _tls_failure(httpx.Request("GET", PATH_PRM))
    net.fail[AS_META] = _tls_failure(httpx.Request("GET", AS_META))
    kw = {"mcp_tls": lambda _url: MCP_TLS, "as_tls": AS_TLS}
    mcp_err = run(net, lambda d: d.resource(MCP), **kw)
    as_err = run(net, lambda d: d.server(AS), **kw)
    assert type(mcp_err) is McpServerCertificateRefused and mcp_err.url == PATH_PRM
    assert MCP_TLS.describe() in str(mcp_err)
    assert type(as_err) is AuthorizationServerCertificateRefused and as_err.url == AS_META
    assert AS_TLS.describe() in str(as_err)


def test_a_metadata_read_that_gets_no_answer_says_which_request():
    net = Net()
    net.fail[PATH_PRM] = httpx.ConnectError("refused")
    net.fail[AS_META] = httpx.ConnectError("refused")
    mcp_err = run(net, lambda d: d.resource(MCP))
    as_err = run(net, lambda d: d.server(AS))
    assert isinstance(mcp_err, errors.ServerUnavailable) and mcp_err.url == PATH_PRM
    assert (
        str(mcp_err)
        == f"protected resource metadata request to {PATH_PRM}: could not connect (refused)"
    )
    assert isinstance(as_err, errors.ServerUnavailable) and as_err.url == AS_META
    assert (
        str(as_err)
        == f"authorization server metadata request to {AS_META}: could not connect (refused)"
    )


# ----------------------------------------------------------------- which documents are read


def test_metadata_is_asked_for_as_json():
    net = Net({PATH_PRM: prm(), AS_META: as_doc()})

    async def call(d):
        await d.resource(MCP)
        await d.server(AS)

    run(net, call)
    gets = [r for r in net.requests if r.method == "GET"]
    assert len(gets) == 2 and all(r.headers["accept"] == "application/json" for r in gets)


def test_an_answer_that_is_not_json_is_an_error_naming_the_url():
    net = Net({PATH_PRM: b"<html>login</html>"})
    err = run(net, lambda d: d.resource(MCP))
    assert type(err) is errors.DiscoveryError
    assert str(err) == f"{PATH_PRM} did not return JSON" and err.url == PATH_PRM


def test_an_answer_nested_too_deep_is_not_json_either():
    net = Net({PATH_PRM: b"[" * 100_000 + b"]" * 100_000})
    err = run(net, lambda d: d.resource(MCP))
    assert type(err) is errors.DiscoveryError
    assert str(err) == f"{PATH_PRM} did not return JSON" and err.url == PATH_PRM


def test_resource_metadata_urls_are_tried_in_order_and_the_failure_lists_them():
    """The challenge's own URL (same origin) first, then the well-known URL with the MCP
    path, then without; each once. The error says what was tried and what to do."""
    here = "https://mcp.example/custom/prm"
    net = Net(challenge=f'Bearer resource_metadata="{here}"')
    err = run(net, lambda d: d.resource(MCP))
    assert net.asked == [f"POST {MCP}", f"GET {here}", f"GET {PATH_PRM}", f"GET {ROOT_PRM}"]
    assert type(err) is errors.DiscoveryError and err.url == MCP
    assert str(err) == (
        f"no protected resource metadata for {MCP}; tried {here} (HTTP 404), "
        f"{PATH_PRM} (HTTP 404), {ROOT_PRM} (HTTP 404); or configure the server's issuer"
    )


def test_a_challenge_naming_the_well_known_url_fetches_it_once():
    net = Net(challenge=f'Bearer resource_metadata="{PATH_PRM}"')
    run(net, lambda d: d.resource(MCP))
    assert net.asked == [f"POST {MCP}", f"GET {PATH_PRM}", f"GET {ROOT_PRM}"]


def test_the_first_document_found_is_used_and_later_urls_not_asked():
    net = Net({PATH_PRM: prm(), ROOT_PRM: prm(servers=["https://evil.example"])})
    meta = run(net, lambda d: d.resource(MCP))
    assert meta.authorization_servers == (AS,)
    assert f"GET {ROOT_PRM}" not in net.asked


def test_the_root_document_is_used_when_the_path_one_is_missing():
    net = Net({ROOT_PRM: prm()})
    meta = run(net, lambda d: d.resource(MCP))
    assert meta.authorization_servers == (AS,)


def test_a_dpop_challenge_is_read_when_there_is_no_bearer_one():
    here = "https://mcp.example/dpop/prm"
    net = Net({here: prm()}, challenge=f'DPoP algs="ES256", resource_metadata="{here}", scope="s"')
    meta = run(net, lambda d: d.resource(MCP))
    assert net.asked == [f"POST {MCP}", f"GET {here}"]
    assert meta.challenge_scope == "s" and meta.challenge_schemes == ("dpop",)


def test_the_bearer_challenge_is_read_before_the_dpop_one():
    net = Net(
        {PATH_PRM: prm()},
        challenge='DPoP scope="from-dpop", Bearer scope="from-bearer"',
    )
    meta = run(net, lambda d: d.resource(MCP))
    assert meta.challenge_scope == "from-bearer"
    assert meta.challenge_schemes == ("dpop", "bearer")


def test_metadata_read_without_a_challenge_names_no_schemes():
    net = Net({PATH_PRM: prm()}, challenge="")
    meta = run(net, lambda d: d.resource(MCP))
    assert meta.challenge_schemes == () and meta.challenge_scope is None


def test_an_ignored_off_origin_metadata_url_is_reported_with_what_to_expect():
    evil = "https://evil.example/prm"
    reports: list[tuple[str, str]] = []
    net = Net({PATH_PRM: prm()}, challenge=f'Bearer resource_metadata="{evil}"')
    meta = run(net, lambda d: d.resource(MCP, report=lambda url, why: reports.append((url, why))))
    assert meta.ignored_metadata_url == evil
    assert reports == [
        (
            evil,
            f"the 401 challenge of {MCP} names resource metadata at {evil!r}, not on the "
            "server's origin: ignored, never fetched; the well-known URLs on the server's "
            "origin are used instead (RFC 9728 §3)",
        )
    ]


def test_a_same_origin_metadata_url_is_not_reported():
    here = "https://mcp.example/custom/prm"
    reports: list = []
    net = Net({here: prm()}, challenge=f'Bearer resource_metadata="{here}"')
    meta = run(net, lambda d: d.resource(MCP, report=lambda *a: reports.append(a)))
    assert reports == [] and meta.ignored_metadata_url is None


def test_an_empty_challenge_string_probes_the_server():
    net = Net({PATH_PRM: prm()}, challenge='Bearer scope="probed"')
    meta = run(net, lambda d: d.resource(MCP, ""))
    assert net.asked[0] == f"POST {MCP}" and meta.challenge_scope == "probed"


# ------------------------------------------------------------ the authorization server's


def test_authorization_server_metadata_urls_for_an_issuer_with_a_path():
    """RFC 8414 §3.1 inserts the well-known part between host and path; OpenID Connect
    Discovery also appends it to the issuer."""
    issuer = f"{AS}/tenant/"
    net = Net()
    err = run(net, lambda d: d.server(issuer))
    urls = [
        f"{AS}/.well-known/oauth-authorization-server/tenant",
        f"{AS}/.well-known/openid-configuration/tenant",
        f"{AS}/tenant/.well-known/openid-configuration",
    ]
    assert net.asked == [f"GET {u}" for u in urls]
    assert type(err) is errors.DiscoveryError and err.url == issuer
    assert str(err) == (
        f"no authorization server metadata for {issuer}; tried "
        + ", ".join(f"{u} (HTTP 404)" for u in urls)
    )


def test_authorization_server_metadata_urls_for_an_issuer_without_a_path():
    net = Net({OIDC: as_doc()})
    meta = run(net, lambda d: d.server(AS))
    assert net.asked == [f"GET {AS_META}", f"GET {OIDC}"]
    assert meta.token_endpoint == f"{AS}/token"


def test_every_endpoint_discovered_is_remembered_and_none_forgotten():
    """Discovery.endpoints: every AS endpoint a JWT-SVID could be an assertion for."""
    other = "https://as2.example"
    net = Net(
        {
            AS_META: as_doc(
                registration_endpoint=f"{AS}/register",
                introspection_endpoint=f"{AS}/introspect",
                revocation_endpoint=f"{AS}/revoke",
            ),
            f"{other}/.well-known/oauth-authorization-server": as_doc(other),
        }
    )

    async def call(d):
        assert d.endpoints == frozenset()
        await d.server(AS)
        await d.server(other)
        return d.endpoints

    assert run(net, call) == {
        AS,
        f"{AS}/token",
        f"{AS}/register",
        f"{AS}/introspect",
        f"{AS}/revoke",
        other,
        f"{other}/token",
    }


def test_authorization_server_metadata_that_is_not_an_object_is_refused():
    with pytest.raises(errors.MetadataMismatch) as e:
        Discovery._parse_as(["issuer", AS], AS, "u")
    assert "names issuer None" in str(e.value) and e.value.url == "u"


def test_authorization_server_metadata_keeps_the_whole_document():
    doc = as_doc(extra={"x": 1})
    assert Discovery._parse_as(doc, AS, "u").raw == doc


# --------------------------------------------------------------------------------- TlsRouter


MADE: list[FakeTransport] = []  # every FakeTransport, in the order made


class FakeTransport(httpx.AsyncBaseTransport):
    def __init__(self, verify=None, trust_env=True, name="mcp"):
        self.verify, self.trust_env, self.name = verify, trust_env, name
        self.closed = False
        self.seen: list[str] = []
        MADE.append(self)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(str(request.url))
        return httpx.Response(204)

    async def aclose(self) -> None:
        self.closed = True


def test_tls_router_verifies_each_mcp_server_by_its_own_trust(monkeypatch):
    MADE.clear()
    monkeypatch.setattr(httpx, "AsyncHTTPTransport", FakeTransport)
    contexts: dict[str, object] = {}
    monkeypatch.setattr(
        ServerTls, "context", property(lambda s: contexts.setdefault(s.ca_file, object()))
    )
    other_tls = ServerTls("/etc/other.pem", "inject.upstream_ca_file")

    async def main():
        default = FakeTransport(name="default")
        router = TlsRouter(default)
        for url, ext in [
            ("https://as.example/t", {}),
            ("https://a.example/", {SERVER_TLS: MCP_TLS}),
            ("https://b.example/", {SERVER_TLS: MCP_TLS}),
            ("https://c.example/", {SERVER_TLS: other_tls}),
            ("https://d.example/", {SERVER_TLS: "not a ServerTls"}),
        ]:
            await router.handle_async_request(httpx.Request("GET", url, extensions=ext))
        made = list(MADE[1:])
        await router.aclose()
        return default, made, router

    default, made, router = asyncio.run(main())
    assert default.seen == ["https://as.example/t", "https://d.example/"]
    assert [t.seen for t in made] == [
        ["https://a.example/", "https://b.example/"],
        ["https://c.example/"],
    ]
    assert [t.verify for t in made] == [contexts[MCP_TLS.ca_file], contexts[other_tls.ca_file]]
    assert all(t.trust_env is False for t in made)  # no SSL_CERT_FILE, no proxy from env
    assert default.closed and all(t.closed for t in made)
    assert router._by_ca == {}


def test_a_peer_routes_its_trust_only_when_told_to():
    assert disc.Peer(MCP_TLS, McpServerCertificateRefused, route=True).extensions() == {
        SERVER_TLS: MCP_TLS
    }
    assert disc.Peer(MCP_TLS, McpServerCertificateRefused, route=False).extensions() == {}


# ------------------------------------------------------------------ WWW-Authenticate parsing


@pytest.mark.parametrize(
    "header,expected",
    [
        ('realm="x", scope="a"', {}),  # params before any scheme belong to none
        ('Bearer ;scope="a"', {"bearer": {"scope": "a"}}),  # junk skipped one character
        (
            'Bearer realm="x" ; DPoP algs="ES256"',
            {"bearer": {"realm": "x"}, "dpop": {"algs": "ES256"}},
        ),
        ('Bearer X-Extra="1", scope="a"', {"bearer": {"x-extra": "1", "scope": "a"}}),
    ],
)
def test_a_malformed_challenge_is_read_as_far_as_it_goes(header, expected):
    """A hostile or sloppy server's challenge neither crashes discovery nor shifts a
    parameter into another's name."""
    assert disc.parse_www_authenticate(header) == expected


def test_a_challenge_is_read_only_as_far_as_its_bound():
    """A hostile server's challenge of any length costs no more than its first
    MAX_CHALLENGE characters (its quoted-string pattern may scan to the end from each
    position): what lies beyond is not read."""
    pad = "(" * (disc.MAX_CHALLENGE - len("DPoP ") - len('algs="ES256" '))
    header = 'DPoP algs="ES256" ' + pad + ' error="use_dpop_nonce"'
    assert disc.parse_www_authenticate(header) == {"dpop": {"algs": "ES256"}}
    short = 'DPoP algs="ES256" ' + "(" * 10 + ' error="use_dpop_nonce"'
    assert disc.parse_www_authenticate(short) == {
        "dpop": {"algs": "ES256", "error": "use_dpop_nonce"}
    }


def test_a_scheme_is_found_after_a_run_of_characters_none_can_start():
    assert disc.parse_www_authenticate("(((( DPoP algs=ES256") == {"dpop": {"algs": "ES256"}}


# ----------------------------------------------------------------- URL spelling and paths


@pytest.mark.parametrize(
    "a,b,same",
    [
        ("https://mcp.example/p/", "https://mcp.example/p", True),
        ("https://mcp.example/p", "https://mcp.example/p/", True),
        ("https://MCP.example:443/p", "https://mcp.example/p", True),
        ("https://mcp.example/pX", "https://mcp.example/p", False),
        ("https://mcp.example/p", "https://mcp.example/pX", False),
        ("https://mcp.example/p?a=1", "https://mcp.example/p", False),
        ("https://mcp.example/p", "https://mcp.example:8443/p", False),
    ],
)
def test_same_url_ignores_only_the_spelling_of_the_origin_and_a_trailing_slash(a, b, same):
    assert disc._same_url(a, b) is same


def test_only_the_origins_own_well_known_url_may_name_the_origin():
    """RFC 9728 §3.3: the document at the origin's well-known URL (with or without a
    trailing slash) may name the origin; one at a URL merely spelt like it may not."""
    origin_doc = prm(resource="https://mcp.example")
    ok = run(
        Net({ROOT_PRM + "/": origin_doc}, challenge=f'Bearer resource_metadata="{ROOT_PRM}/"'),
        lambda d: d.resource(MCP),
    )
    assert ok.authorization_servers == (AS,) and ok.resource == MCP
    lookalike = ROOT_PRM + "X"
    err = run(
        Net({lookalike: origin_doc}, challenge=f'Bearer resource_metadata="{lookalike}"'),
        lambda d: d.resource(MCP),
    )
    assert isinstance(err, errors.MetadataMismatch) and err.url == lookalike


@pytest.mark.parametrize(
    "mcp,asked",
    [
        ("https://mcp.example/mcp/", PATH_PRM),
        ("https://mcp.example/toolX", f"{ROOT_PRM}/toolX"),
    ],
)
def test_the_well_known_url_keeps_the_path_without_its_trailing_slash(mcp, asked):
    net = Net()
    run(net, lambda d: d.resource(mcp))
    assert net.asked[1] == f"GET {asked}"


def test_metadata_for_a_resource_spelt_one_letter_longer_is_refused():
    """canonical_resource drops trailing slashes and nothing else: a document for
    /mcpX is not one for /mcp."""
    assert disc.canonical_resource("https://mcp.example/mcpX/") == "https://mcp.example/mcpX"
    err = run(Net({PATH_PRM: prm(resource="https://mcp.example/mcpX")}), lambda d: d.resource(MCP))
    assert isinstance(err, errors.MetadataMismatch) and err.url == PATH_PRM


@pytest.mark.parametrize("tenant", ["/tenant/", "/tenantX"])
def test_authorization_server_metadata_urls_keep_the_issuer_path(tenant):
    net = Net()
    run(net, lambda d: d.server(f"{AS}{tenant}"))
    path = tenant.rstrip("/")
    assert net.asked[0] == f"GET {AS}/.well-known/oauth-authorization-server{path}"


# --------------------------------------------------------------- what an operator reads


def test_an_insecure_metadata_url_or_issuer_is_named_for_what_it_is():
    err = run(Net(), lambda d: d.resource("http://mcp.example/mcp"))
    assert isinstance(err, errors.InsecureEndpoint)
    assert str(err).startswith(
        "protected resource metadata URL of http://mcp.example/mcp "
        "'http://mcp.example/.well-known/oauth-protected-resource/mcp' refused: "
    )
    err = run(Net(), lambda d: d.server("http://as.example"))
    assert isinstance(err, errors.InsecureEndpoint)
    assert str(err).startswith("authorization server issuer 'http://as.example' refused: ")


def test_a_refused_document_names_the_url_it_came_from():
    prm_err = run(Net({PATH_PRM: prm(resource="https://evil.example")}), lambda d: d.resource(MCP))
    assert isinstance(prm_err, errors.MetadataMismatch) and prm_err.url == PATH_PRM
    assert str(prm_err).startswith(f"{PATH_PRM}: protected resource metadata is for resource")
    as_err = run(Net({AS_META: as_doc("https://evil.example")}), lambda d: d.server(AS))
    assert isinstance(as_err, errors.MetadataMismatch) and as_err.url == AS_META
    assert str(as_err).startswith(f"{AS_META}: metadata names issuer 'https://evil.example'")


@pytest.mark.parametrize(
    "doc,message",
    [
        (["not", "an", "object"], "u: protected resource metadata is not a JSON object"),
        (prm(resource="https://evil.example"), "u: protected resource metadata is for resource"),
        (prm(servers=[]), "u: authorization_servers must list at least one issuer"),
    ],
)
def test_each_resource_metadata_refusal_names_the_document_url(doc, message):
    with pytest.raises(errors.DiscoveryError) as e:
        Discovery._parse_prm(doc, MCP, "u", None)
    assert str(e.value).startswith(message) and e.value.url == "u"


def test_a_missing_token_endpoint_names_the_document_url():
    with pytest.raises(errors.DiscoveryError) as e:
        Discovery._parse_as({"issuer": AS}, AS, "u")
    assert str(e.value) == "u: no usable token_endpoint" and e.value.url == "u"


def test_a_json_null_answer_counts_as_no_document_and_is_listed_as_such():
    net = Net({PATH_PRM: b"null"}, challenge="")
    err = run(net, lambda d: d.resource(MCP))
    assert f"tried {PATH_PRM} (HTTP 200), {ROOT_PRM} (HTTP 404)" in str(err)


def test_an_ignored_metadata_url_is_reported_to_a_caller_with_its_own_challenge():
    evil = "https://evil.example/prm"
    reports: list = []
    run(
        Net({PATH_PRM: prm()}),
        lambda d: d.resource(
            MCP, f'Bearer resource_metadata="{evil}"', report=lambda *a: reports.append(a)
        ),
    )
    assert [url for url, _why in reports] == [evil]


# ------------------------------------------------------------------------- a known gap


def test_a_scopes_supported_that_is_not_a_list_is_ignored():
    meta = Discovery._parse_prm(prm(scopes_supported="tools:read"), MCP, "u", None)
    assert meta.scopes_supported == ()
