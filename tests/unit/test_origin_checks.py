"""How the trust checks compare URLs, at the edges the rest of the suite left unpinned (found
by `make mutate`): userinfo, case and default ports in an origin, a tenant path that differs
only at its end, an audience that spells the AS's default port, a DPoP htu and thumbprint;
and how a pinned authorization server is kept."""

from __future__ import annotations

import json
import time

import jwt
import pytest

from agent.identity.bundle import jwk_thumbprint
from agent.identity.workload_api import names_an_as
from agent.oauth import dpop, errors, trust


@pytest.mark.parametrize(
    "url,want",
    [
        ("https://AS.Example:443/x", ("https", "as.example", 443)),
        ("HTTP://as.example/x", ("http", "as.example", 80)),
        ("https://as.example:8443", ("https", "as.example", 8443)),
        ("https://evil@as.example/", None),  # a user name alone
        ("https://:secret@as.example/", None),  # a password alone
        ("https://evil:secret@as.example/", None),
        ("ftp://as.example/", None),
        ("https:///no-host", None),
    ],
)
def test_an_origin_is_scheme_host_and_port_and_never_has_userinfo(url, want):
    assert trust.origin(url) == want


@pytest.mark.parametrize(
    "named,allowed,chosen",
    [
        ("https://as.example/tenant/", "https://as.example/tenant", "https://as.example/tenant"),
        ("https://AS.example:443/tenant", "https://as.example/tenant", "https://as.example/tenant"),
        ("https://as.example/realmX", "https://as.example/realm", None),  # another tenant
        ("https://as.example/tenant", "https://as.example/other", None),
    ],
)
def test_an_allowed_issuer_matches_only_its_own_tenant(named, allowed, chosen):
    assert trust.choose_authorization_server([named], [allowed]) == chosen


@pytest.mark.parametrize(
    "audience,refused",
    [
        ("http://as.example:80/token", True),  # the AS, its default port spelt out
        ("https://as.example:443/", True),
        ("http://as.example:443/", False),  # another origin: http on port 443
    ],
)
def test_an_audience_spelling_the_default_port_still_names_the_as(audience, refused):
    servers = ["http://as.example", "https://as.example"] if refused else ["http://as.example"]
    assert (names_an_as([audience], servers) is not None) is refused


def test_a_dpop_htu_has_a_path_even_when_the_url_has_none():
    assert dpop.htu("https://MCP.example:8443?q=1#f") == "https://mcp.example:8443/"
    assert dpop.htu("https://mcp.example/mcp?q=1") == "https://mcp.example/mcp"


def test_a_dpop_keys_thumbprint_is_that_of_the_key_in_its_proofs():
    key = dpop.DPoPKey()
    header = jwt.get_unverified_header(key.proof("GET", "https://mcp.example/mcp"))
    assert key.jkt == jwk_thumbprint(jwt.algorithms.ECAlgorithm.from_jwk(header["jwk"]))


def test_a_refused_endpoint_names_its_url():
    with pytest.raises(errors.InsecureEndpoint) as e:
        trust.check_endpoint("http://as.example/token", "token endpoint")
    assert e.value.url == "http://as.example/token"
    with pytest.raises(errors.InsecureEndpoint) as e:
        trust.check_endpoint(7, "token endpoint")
    assert e.value.url is None


def test_a_pin_is_kept_private_and_never_moved(tmp_path):
    pins = trust.PinStore(tmp_path / "state")  # a state directory not made yet
    assert pins.pin("weather", "https://mcp.example/mcp", "https://as.example") == (
        "https://as.example"
    )
    assert pins.pin("maps", "https://maps.example/mcp", "https://as2.example") == (
        "https://as2.example"
    )
    assert pins.pin("weather", "https://mcp.example/mcp", "https://evil.example") == (
        "https://as.example"
    )
    assert pins.path == tmp_path / "state" / "oauth" / "authorization_servers.json"
    assert oct(pins.path.stat().st_mode & 0o777) == "0o600"
    assert oct(pins.path.parent.stat().st_mode & 0o777) == "0o700"
    entry = json.loads(pins.path.read_text())["weather https://mcp.example/mcp"]
    assert set(entry) == {"server", "resource", "issuer", "pinned_at"}
    assert (entry["server"], entry["resource"]) == ("weather", "https://mcp.example/mcp")
    assert time.strptime(entry["pinned_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert trust.PinStore(tmp_path / "state").get("maps", "https://maps.example/mcp") == (
        "https://as2.example"
    )


@pytest.mark.parametrize("content", ["{", "[]"])
def test_an_unreadable_pin_file_fails_closed(tmp_path, content):
    pins = trust.PinStore(tmp_path)
    pins.path.parent.mkdir()
    pins.path.write_text(content)
    with pytest.raises(errors.TrustRefused, match=f"^{pins.path}: .*fix or remove the file"):
        pins.get("weather", "https://mcp.example/mcp")
