"""Discovery's parsing of metadata documents, at the edges the rest of the suite left
unpinned (found by `make mutate`): a resource that is not a URL, authorization_servers of
the wrong shape, a jwks_uri in clear, and each field the agent keeps from a document."""

from __future__ import annotations

import pytest

from agent.oauth import errors
from agent.oauth.discovery import Discovery, ResourceMetadata, ServerMetadata

MCP = "https://mcp.example/mcp"
AS = "https://as.example"


def prm(**over) -> dict:
    return {"resource": MCP, "authorization_servers": [AS], **over}


@pytest.mark.parametrize("resource", ["not a URL", "ftp://mcp.example/mcp", 7, None])
def test_resource_metadata_naming_no_usable_resource_is_refused(resource):
    with pytest.raises(errors.MetadataMismatch, match="RFC 9728"):
        Discovery._parse_prm(prm(resource=resource), MCP, "u", None)


@pytest.mark.parametrize("servers", [[], AS, [AS, 7], None])
def test_authorization_servers_must_be_a_list_of_issuers(servers):
    with pytest.raises(errors.DiscoveryError, match="must list at least one issuer"):
        Discovery._parse_prm(prm(authorization_servers=servers), MCP, "u", None)


def test_a_jwks_uri_in_clear_is_refused():
    with pytest.raises(errors.InsecureEndpoint, match="u: jwks_uri"):
        Discovery._parse_prm(prm(jwks_uri="http://mcp.example/jwks"), MCP, "u", None)


def test_resource_metadata_keeps_what_the_agent_uses():
    doc = prm(
        scopes_supported=["tools", 7],
        dpop_bound_access_tokens_required=True,
        jwks_uri="https://mcp.example/jwks",
    )
    assert Discovery._parse_prm(doc, MCP, "u", "tools", None, "https://elsewhere/prm") == (
        ResourceMetadata(MCP, (AS,), ("tools",), True, "tools", "https://elsewhere/prm")
    )
    assert Discovery._parse_prm(prm(), MCP, "u", None) == ResourceMetadata(MCP, (AS,))


def test_authorization_server_metadata_keeps_what_the_agent_uses():
    doc = {
        "issuer": AS,
        "token_endpoint": f"{AS}/token",
        "registration_endpoint": f"{AS}/register",
        "introspection_endpoint": f"{AS}/introspect",
        "revocation_endpoint": f"{AS}/revoke",
        "token_endpoint_auth_methods_supported": ["private_key_jwt", 7],
        "dpop_signing_alg_values_supported": ["ES256"],
    }
    assert Discovery._parse_as(doc, AS, "u") == ServerMetadata(
        AS,
        f"{AS}/token",
        f"{AS}/register",
        f"{AS}/introspect",
        f"{AS}/revoke",
        ("private_key_jwt",),
        ("ES256",),
    )
    odd = {"issuer": AS, "token_endpoint": f"{AS}/token", "dpop_signing_alg_values_supported": "x"}
    assert Discovery._parse_as(odd, AS, "u") == ServerMetadata(AS, f"{AS}/token")


def test_a_mismatched_issuer_is_named_in_the_refusal():
    with pytest.raises(errors.MetadataMismatch) as e:
        Discovery._parse_as({"issuer": "https://evil.example"}, AS, "u")
    assert str(e.value) == (
        "u: metadata names issuer 'https://evil.example', expected https://as.example "
        "(RFC 8414 §3.3)"
    )
    assert e.value.url == "u"
    with pytest.raises(errors.DiscoveryError, match="u: no usable token_endpoint"):
        Discovery._parse_as({"issuer": AS, "token_endpoint": 7}, AS, "u")
