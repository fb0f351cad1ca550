"""DPoP decisions without a network: whether `dpop = "auto"` uses DPoP (it follows the
resource server), how a 401 naming another scheme is diagnosed, and the key's memory of
the nonces each server gave (RFC 9449 §8, §9)."""

from __future__ import annotations

import jwt
import pytest

from agent.oauth.discovery import ResourceMetadata, ServerMetadata, parse_www_authenticate
from agent.oauth.dpop import DPoPKey, asks_for_nonce, scheme_mismatch, valid_nonce
from agent.oauth.resolution import AdHocServer, _dpop

RES = "https://mcp.example/mcp"
AS = "https://as.example"
ES256 = ("ES256",)


def prm(schemes=(), required=False) -> ResourceMetadata:
    return ResourceMetadata(
        RES, (AS,), dpop_bound_access_tokens_required=required, challenge_schemes=tuple(schemes)
    )


def meta(algs=ES256) -> ServerMetadata:
    return ServerMetadata(AS, f"{AS}/token", dpop_signing_alg_values_supported=tuple(algs))


# setting, the RS's challenge schemes, its metadata flag, the AS's algs -> (dpop, required?)
TABLE = {
    "auto, stock MCP server (Bearer), AS offers DPoP": ("auto", ["bearer"], False, ES256, False),
    "auto, no challenge scheme, AS offers DPoP": ("auto", [], False, ES256, False),
    "auto, challenge DPoP only": ("auto", ["dpop"], False, ES256, True),
    "auto, challenge DPoP only, AS without ES256": ("auto", ["dpop"], False, (), True),
    "auto, metadata requires DPoP": ("auto", ["bearer"], True, ES256, True),
    "auto, metadata requires DPoP, AS without ES256": ("auto", [], True, ("PS256",), True),
    "auto, Bearer and DPoP offered, AS offers DPoP": ("auto", ["bearer", "dpop"], False, ES256, 0),
    "auto, Bearer and DPoP offered, AS without": ("auto", ["dpop", "bearer"], False, (), False),
    "always, stock server": ("always", ["bearer"], False, ES256, True),
    "always, AS without ES256": ("always", ["bearer"], False, (), True),
    "never, server requires DPoP": ("never", ["dpop"], True, ES256, False),
}


@pytest.mark.parametrize("row", TABLE.values(), ids=TABLE.keys())
def test_the_dpop_decision_table(row):
    """Expected: False (Bearer), True (DPoP, a Bearer token refused), 0 (DPoP, Bearer fine)."""
    setting, schemes, required, algs, expected = row
    server = AdHocServer(name="s", url=RES, dpop=setting)
    dpop, why = _dpop(server, RES, prm(schemes, required), meta(algs))
    assert dpop is bool(expected is not False)
    assert (why is not None) is (expected is True)


def test_an_unasked_server_gets_bearer_under_auto_whatever_the_as_offers():
    """issuer configured: the server is not asked (prm None), nothing says it takes DPoP."""
    assert _dpop(AdHocServer(name="s", url=RES), RES, None, meta()) == (False, None)
    assert _dpop(AdHocServer(name="s", url=RES, dpop="always"), RES, None, meta())[0] is True


def test_why_dpop_is_required_names_the_server_and_an_as_that_cannot_issue_it():
    _, why = _dpop(AdHocServer(name="s", url=RES), RES, prm(["dpop"]), meta(()))
    assert why is not None and RES in why and AS in why and "ES256" in why
    _, why = _dpop(AdHocServer(name="s", url=RES), RES, prm(required=True), meta())
    assert why is not None and "dpop_bound_access_tokens_required" in why and AS not in why


CHALLENGES = {
    "stock SDK server, DPoP sent": (
        'Bearer error="invalid_token", error_description="Authentication required"',
        "DPoP",
        'dpop = "never"',
    ),
    "DPoP server, Bearer sent": ('DPoP algs="ES256", error="invalid_token"', "Bearer", "always"),
    "both named, Bearer sent": ('Bearer realm="x", DPoP algs="ES256"', "Bearer", None),
    "both named, DPoP sent": ('DPoP algs="ES256", Bearer realm="x"', "DPoP", None),
    "the scheme sent": ('Bearer error="invalid_token"', "Bearer", None),
    "no challenge": ("", "DPoP", None),
    "another scheme": ('Basic realm="x"', "Bearer", "basic scheme"),
}


@pytest.mark.parametrize("row", CHALLENGES.values(), ids=CHALLENGES.keys())
def test_a_401_naming_only_another_scheme_is_diagnosed(row):
    header, sent, says = row
    problem = scheme_mismatch(parse_www_authenticate(header), sent, "weather")
    if says is None:
        assert problem is None
    else:
        assert problem is not None and says in problem and "weather" in problem


def test_use_dpop_nonce_is_read_from_the_dpop_challenge_only():
    assert asks_for_nonce(parse_www_authenticate('DPoP error="use_dpop_nonce"'))
    assert not asks_for_nonce(parse_www_authenticate('Bearer error="use_dpop_nonce"'))
    assert not asks_for_nonce(parse_www_authenticate('DPoP error="invalid_token"'))


def claims(proof: str) -> dict:
    return jwt.decode(proof, options={"verify_signature": False})


def test_later_proofs_to_a_server_carry_the_newest_nonce_it_gave():
    key = DPoPKey()
    assert "nonce" not in claims(key.proof("POST", "https://mcp.example/mcp"))
    assert key.note_nonce("https://MCP.example/anything", "n-1")
    assert key.note_nonce("https://mcp.example", "n-2")  # newer: replaces it
    assert claims(key.proof("GET", "https://mcp.example/mcp?x=1"))["nonce"] == "n-2"
    # another origin (port, scheme, host) has nonces of its own
    for other in ("https://mcp.example:8443/mcp", "http://mcp.example/mcp", "https://as.example"):
        assert "nonce" not in claims(key.proof("POST", other))
    # a nonce given for this proof wins; the token client asks for none remembered
    assert claims(key.proof("POST", "https://mcp.example/t", nonce="as-1"))["nonce"] == "as-1"
    assert "nonce" not in claims(key.proof("POST", "https://mcp.example/t", remembered=False))
    key.destroy()
    assert key.nonce_for("https://mcp.example") is None


@pytest.mark.parametrize(
    "nonce,ok",
    [
        ("eyJ7S_zG.9-_~+/=", True),
        ("", False),
        ('has"quote', False),
        ("has\\backslash", False),
        ("has space", False),
        ("new\r\nline", False),
        ("x" * 1024, True),
        ("x" * 1025, False),
    ],
)
def test_only_an_rfc_9449_nonce_is_kept(nonce, ok):
    key = DPoPKey()
    assert valid_nonce(nonce) is ok
    assert key.note_nonce("https://mcp.example", nonce) is ok
    assert key.nonce_for("https://mcp.example") == (nonce if ok else None)
