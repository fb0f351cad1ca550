"""Where a server's tokens are asked for (agent/oauth/resolution.py), found by mutation
testing: which authorization server may receive its assertions (configured, pinned on first
discovery, or refused), what is pinned, audited and counted for each outcome, the scope
asked for and whether tokens are DPoP-bound.

Sans-IO: discovery is a stand-in answering from fields and recording what it was asked,
the audit log a recorder of its events, the pins a PinStore in the test's directory."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from agent.config import ServerSection
from agent.oauth.discovery import ResourceMetadata, ServerMetadata
from agent.oauth.errors import InsecureEndpoint, TrustRefused, UntrustedAuthorizationServer
from agent.oauth.resolution import (
    AdHocServer,
    Resolved,
    Resolver,
    audit_event,
    configured_authorization_servers,
)
from agent.oauth.trust import PinStore
from tests.helpers import run_async
from tests.unit import test_tokens_mutants

debug_lines = test_tokens_mutants.debug_lines  # the diagnostic stream at debug, parsed

MCP = "https://MCP.example/mcp/"
RES = "https://mcp.example/mcp"
AS = "https://as.example"
AS2 = "https://as2.example"
AS3 = "https://as3.example"
SID = "spiffe://example.org/w"


class Audit:
    """An audit log recording (event, fields) for each event."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [f for e, f in self.events if e == event]


class Discovery:
    """Discovery answering from fields: `prm` for every server's resource metadata (an
    exception is raised), `meta` per issuer; records each question. `ignored`: a challenge's
    metadata URL reported as ignored, (url, reason), before answering."""

    def __init__(
        self,
        prm: ResourceMetadata | Exception | None = None,
        meta: dict[str, ServerMetadata | Exception] | None = None,
        ignored: tuple[str, str] | None = None,
    ) -> None:
        self.prm = prm
        self.meta = meta or {}
        self.ignored = ignored
        self.asked: list[tuple] = []

    async def resource(self, url: str, challenge: str | None = None, report=None):
        self.asked.append(("resource", url, challenge))
        if self.ignored is not None:
            report(*self.ignored)
        if isinstance(self.prm, Exception):
            raise self.prm
        assert self.prm is not None, "the server was not to be asked"
        return self.prm

    async def server(self, issuer: str) -> ServerMetadata:
        self.asked.append(("server", issuer))
        meta = self.meta.get(issuer) or ServerMetadata(issuer, f"{issuer}/token")
        if isinstance(meta, Exception):
            raise meta
        return meta


def prm(*servers: str, **kw: Any) -> ResourceMetadata:
    return ResourceMetadata(RES, tuple(servers), **kw)


class World:
    def __init__(self, tmp_path) -> None:
        self.pins = PinStore(tmp_path)
        self.audit = Audit()
        self.registry = CollectorRegistry()
        counter = Counter("refused", "refusals", ["server", "check"], registry=self.registry)
        self.resolver = Resolver(self.pins, self.audit, counter)

    def refused(self, server: str, check: str) -> float:
        value = self.registry.get_sample_value("refused_total", {"server": server, "check": check})
        return value or 0.0

    def resolve(self, discovery: Discovery, server, challenge=None, sid=SID) -> Resolved:
        @run_async
        async def go():
            return await self.resolver.resolve(discovery, server, challenge, sid)

        return go()

    def refusal(self, discovery: Discovery, server, sid=SID) -> Exception:
        with pytest.raises(TrustRefused) as e:
            self.resolve(discovery, server, sid=sid)
        return e.value


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path)


def server(**kw: Any) -> ServerSection:
    return ServerSection(**{"name": "mcp", "url": MCP, **kw})


# --- the configured authorization servers ------------------------------------------------


def test_the_configured_servers_are_the_list_then_the_issuer_once():
    assert configured_authorization_servers(server()) == ()
    assert configured_authorization_servers(server(authorization_servers=[AS, AS2])) == (AS, AS2)
    assert configured_authorization_servers(server(issuer=AS)) == (AS,)
    both = server(authorization_servers=[AS2], issuer=AS)
    assert configured_authorization_servers(both) == (AS2, AS)
    again = server(authorization_servers=[AS, AS2], issuer=AS2)
    assert configured_authorization_servers(again) == (AS, AS2)


def test_the_servers_that_may_receive_assertions_are_configured_else_pinned(world):
    assert world.resolver.authorization_servers(server(authorization_servers=[AS2])) == (AS2,)
    assert world.resolver.authorization_servers(server()) == ()
    world.pins.pin("mcp", RES, AS3)  # pinned under the canonical resource
    assert world.resolver.authorization_servers(server()) == (AS3,)
    assert world.resolver.authorization_servers(server(name="other")) == ()
    # a configured list wins over a pin
    assert world.resolver.authorization_servers(server(issuer=AS)) == (AS,)


def test_an_audit_event_names_the_identity_and_server_and_needs_an_audit_log():
    audit = Audit()
    audit_event(audit, "oauth.x", SID, "mcp", a=1)
    assert audit.events == [("oauth.x", {"spiffe_id": SID, "server": "mcp", "a": 1})]
    audit_event(None, "oauth.x", SID, "mcp")  # no audit log: nothing, no error


# --- resolve: a configured issuer ------------------------------------------------------------


def test_a_configured_issuer_is_used_without_asking_the_server(world):
    meta = ServerMetadata(AS, f"{AS}/t", dpop_signing_alg_values_supported=("ES256",))
    d = Discovery(meta={AS: meta})
    got = world.resolve(d, server(issuer=AS, scope="s1 s2"), challenge='DPoP error="x"')
    assert d.asked == [("server", AS)]
    assert got == Resolved(RES, AS, meta, "s1 s2", False, None)
    assert world.audit.events == [] and not world.pins.path.exists()


def test_always_dpop_is_said_as_the_reason_a_bearer_token_is_refused(world):
    got = world.resolve(Discovery(), server(issuer=AS, dpop="always"))
    assert got.dpop is True and got.dpop_required == 'servers.dpop = "always"'


# --- resolve: discovered, pinned on first use ------------------------------------------------


def test_the_first_discovery_pins_the_first_named_server_and_audits_it(world):
    d = Discovery(prm(AS2, AS3, scopes_supported=("a", "b")))
    got = world.resolve(d, server(), challenge="Bearer x")
    assert d.asked == [("resource", MCP, "Bearer x"), ("server", AS2)]
    assert (got.resource, got.issuer, got.scope, got.dpop) == (RES, AS2, "a b", False)
    assert world.pins.get("mcp", RES) == AS2
    assert world.audit.events == [
        (
            "oauth.pinned",
            {
                "spiffe_id": SID,
                "server": "mcp",
                "resource": RES,
                "issuer": AS2,
                "path": str(world.pins.path),
            },
        )
    ]
    # the second discovery finds its pin: used, not pinned or audited again
    assert world.resolve(Discovery(prm(AS3, AS2)), server()).issuer == AS2
    assert len(world.audit.events) == 1
    stored = json.loads(world.pins.path.read_text())
    assert [e["issuer"] for e in stored.values()] == [AS2]


def test_a_server_naming_only_others_than_the_pinned_one_is_refused(world):
    world.pins.pin("mcp", RES, AS)
    d = Discovery(prm(AS2, AS3))
    e = world.refusal(d, server(), sid=SID)
    assert isinstance(e, UntrustedAuthorizationServer)
    assert (e.server, e.named, e.allowed) == ("mcp", (AS2, AS3), (AS,))
    text = str(e)
    assert f"{AS2}, {AS3}" in text and AS in text and str(world.pins.path) in text
    assert "authorization servers " in text  # two named: the plural
    assert d.asked == [("resource", MCP, None)]  # the refused AS is never asked
    assert world.pins.get("mcp", RES) == AS
    (event,) = world.audit.named("oauth.refused")
    assert event == {
        "spiffe_id": SID,
        "server": "mcp",
        "resource": RES,
        "check": "untrusted_authorization_server",
        "url": None,
        "reason": text,
        "authorization_server": AS2,
        "named": [AS2, AS3],
        "allowed": [AS],
    }
    assert world.refused("mcp", "untrusted_authorization_server") == 1


def test_one_named_server_not_allowed_is_named_in_the_singular(world):
    e = world.refusal(Discovery(prm(AS2)), server(authorization_servers=[AS, AS3]))
    text = str(e)
    assert f"authorization server {AS2}, not allowed" in text
    assert f"allowed: {AS}, {AS3} (servers.authorization_servers)" in text
    assert world.pins.get("mcp", RES) is None and world.audit.named("oauth.pinned") == []


def test_a_configured_list_picks_the_first_named_server_it_allows_and_pins_nothing(world):
    world.pins.pin("mcp", RES, AS)  # a pin is not read when servers are configured
    d = Discovery(prm(AS3, AS2))
    got = world.resolve(d, server(authorization_servers=["https://AS2.example/"]))
    assert got.issuer == "https://AS2.example/"  # spelt as configured
    assert d.asked[-1] == ("server", "https://AS2.example/")
    assert world.audit.events == [] and world.pins.get("mcp", RES) == AS


def test_an_ad_hoc_server_uses_what_it_discovers_and_pins_nothing(world):
    world.pins.pin("probe", RES, AS)  # not read for a probe's URL
    got = world.resolve(Discovery(prm(AS2)), AdHocServer(name="probe", url=MCP))
    assert got.issuer == AS2
    assert world.pins.get("probe", RES) == AS and world.audit.events == []


def test_a_pin_taken_by_another_discovery_meanwhile_refuses_this_one(world):
    class Racing(Discovery):
        async def server(self, issuer):
            world.pins.pin("mcp", RES, AS3)  # another resolution pinned first
            return await super().server(issuer)

    e = world.refusal(Racing(prm(AS2)), server())
    assert isinstance(e, UntrustedAuthorizationServer)
    assert (e.server, e.named, e.allowed) == ("mcp", (AS2,), (AS3,))
    assert AS2 in str(e) and AS3 in str(e) and str(world.pins.path) in str(e)
    assert world.pins.get("mcp", RES) == AS3
    assert world.audit.named("oauth.pinned") == []
    (event,) = world.audit.named("oauth.refused")
    assert event["authorization_server"] == AS2 and event["allowed"] == [AS3]


def test_the_same_server_pinned_by_another_discovery_meanwhile_is_used_and_audited_once(world):
    class Racing(Discovery):
        async def server(self, issuer):
            world.pins.pin("mcp", RES, issuer)  # another resolution pinned it first
            return await super().server(issuer)

    assert world.resolve(Racing(prm(AS2)), server()).issuer == AS2
    assert world.audit.events == []  # the pin is the other resolution's to audit


def test_the_pin_waits_for_the_servers_metadata(world):
    """An AS whose metadata cannot be read is not pinned: the next discovery may pick again."""
    d = Discovery(prm(AS2), meta={AS2: InsecureEndpoint("plain http", url=AS2)})
    e = world.refusal(d, server())
    assert isinstance(e, InsecureEndpoint)
    assert world.pins.get("mcp", RES) is None
    (event,) = world.audit.events
    assert event == (
        "oauth.refused",
        {
            "spiffe_id": SID,
            "server": "mcp",
            "resource": RES,
            "check": "insecure_endpoint",
            "url": AS2,
            "reason": "plain http",
        },
    )
    assert world.refused("mcp", "insecure_endpoint") == 1


def test_a_refusal_for_nobody_is_audited_under_no_identity(world):
    world.refusal(Discovery(prm(AS2)), server(authorization_servers=[AS]), sid=None)
    (event,) = world.audit.named("oauth.refused")
    assert event["spiffe_id"] is None


def test_an_untrusted_refusal_naming_no_server_audits_none(world):
    d = Discovery(UntrustedAuthorizationServer("none", server="mcp", named=(), allowed=(AS,)))
    world.refusal(d, server())
    (event,) = world.audit.named("oauth.refused")
    assert event["authorization_server"] is None and event["named"] == []
    assert event["allowed"] == [AS]


def test_an_ignored_metadata_url_is_counted_and_audited(world):
    url = "https://elsewhere.example/.well-known/oauth-protected-resource"
    d = Discovery(prm(AS), ignored=(url, "another origin"))
    world.resolve(d, server(authorization_servers=[AS]))
    assert world.audit.events == [
        (
            "oauth.refused",
            {
                "spiffe_id": SID,
                "server": "mcp",
                "resource": RES,
                "check": "resource_metadata_origin",
                "url": url,
                "reason": "another origin",
            },
        )
    ]
    assert world.refused("mcp", "resource_metadata_origin") == 1


def test_a_resolver_without_audit_log_still_counts(tmp_path):
    registry = CollectorRegistry()
    counter = Counter("refused", "refusals", ["server", "check"], registry=registry)
    resolver = Resolver(PinStore(tmp_path), None, counter)
    resolver.refused(server(), SID, RES, "c")
    assert registry.get_sample_value("refused_total", {"server": "mcp", "check": "c"}) == 1


# --- the scope and DPoP of a discovered server -----------------------------------------------


@pytest.mark.parametrize(
    ("configured", "challenge_scope", "supported", "expected"),
    [
        ("mine", "chal", ("a", "b"), "mine"),
        ("", "chal", ("a", "b"), "chal"),
        ("", None, ("a", "b"), "a b"),
        ("", "", ("a",), "a"),
        ("", None, (), ""),
    ],
)
def test_the_scope_is_configured_else_the_challenges_else_the_metadatas(
    world, configured, challenge_scope, supported, expected
):
    d = Discovery(prm(AS, challenge_scope=challenge_scope, scopes_supported=supported))
    assert world.resolve(d, server(scope=configured)).scope == expected


def test_a_discovered_server_requiring_dpop_gets_proofs_and_says_why(world):
    meta = ServerMetadata(AS, f"{AS}/t", dpop_signing_alg_values_supported=("ES256",))
    d = Discovery(prm(AS, dpop_bound_access_tokens_required=True), meta={AS: meta})
    got = world.resolve(d, server())
    assert got.dpop is True and got.metadata is meta
    assert got.dpop_required is not None and RES in got.dpop_required
    offered = Discovery(prm(AS, challenge_schemes=("bearer", "dpop")), meta={AS: meta})
    assert world.resolve(offered, server()).dpop is True
    never = Discovery(prm(AS, dpop_bound_access_tokens_required=True), meta={AS: meta})
    got = world.resolve(never, server(dpop="never"))
    assert (got.dpop, got.dpop_required) == (False, None)


# --- what an operator reads in the log -------------------------------------------------------


def oauth_lines(debug_lines) -> list[dict]:
    return [line for line in debug_lines() if line.get("component") == "oauth"]


def test_a_pin_an_ignored_url_and_a_refusal_are_logged_with_the_server(world, debug_lines):
    url = "https://elsewhere.example/.well-known/oauth-protected-resource"
    world.resolve(Discovery(prm(AS2), ignored=(url, "another origin")), server())
    world.refusal(Discovery(prm(AS3)), server())  # AS2 is pinned now
    lines = {line["event"]: line for line in oauth_lines(debug_lines) if line["level"] != "debug"}
    ignored = [line for event, line in lines.items() if "ignored" in event]
    assert [(line["level"], line["server"], line["url"]) for line in ignored] == [
        ("warning", "mcp", url)
    ]
    (pinned,) = [line for event, line in lines.items() if "pinned" in event]
    assert (pinned["level"], pinned["server"], pinned["issuer"]) == ("info", "mcp", AS2)
    (refused,) = [line for event, line in lines.items() if "refused" in event]
    assert refused["level"] == "warning" and refused["server"] == "mcp"
    assert refused["check"] == "untrusted_authorization_server"
    assert AS3 in refused["error"] and AS2 in refused["error"]


def test_a_refusal_says_nothing_was_sent_and_how_to_allow_the_server(world):
    text = str(world.refusal(Discovery(prm(AS2)), server(authorization_servers=[AS])))
    assert "No assertion was sent. If the server really moved" in text
    assert "list it in the server's authorization_servers" in text


def test_each_resolution_is_a_debug_line_saying_where_and_how(world, debug_lines):
    meta = ServerMetadata(AS, f"{AS}/t", dpop_signing_alg_values_supported=("ES256",))
    world.resolve(Discovery(meta={AS: meta}), server(issuer=AS, scope="s1"))
    required = prm(AS2, dpop_bound_access_tokens_required=True, scopes_supported=("x",))
    world.resolve(Discovery(required), server(), sid=None)
    lines = [line for line in oauth_lines(debug_lines) if line["level"] == "debug"]
    resolved = [line for line in lines if "resolved" in line["event"]]
    fields = ("server", "spiffe_id", "issuer", "how", "token_endpoint", "scope", "dpop_proofs")
    assert [tuple(line[f] for f in fields) for line in resolved] == [
        ("mcp", SID, AS, "configured issuer", f"{AS}/t", "s1", False),
        ("mcp", None, AS2, "discovered", f"{AS2}/token", "x", True),
    ]
    assert resolved[0]["dpop_required"] is None
    assert RES in resolved[1]["dpop_required"]


def test_dpop_required_by_a_server_whose_as_cannot_bind_tokens_says_what_to_change(world):
    d = Discovery(prm(AS, challenge_schemes=("dpop",)))  # the AS advertises no ES256
    why = world.resolve(d, server()).dpop_required
    assert why is not None and AS in why
    assert (
        "does not advertise ES256 in dpop_signing_alg_values_supported, "
        "so it may not issue DPoP-bound tokens" in why
    )
    remedy = (
        "use an authorization server that does, or a resource server that accepts Bearer tokens"
    )
    assert remedy in why
