"""What an OAuth failure tells the operator and the caller (found by `make mutate`): which
type an authorization server's error answer maps to, the message and its hint, the fields
kept from the answer, and the record an error becomes (`to_dict`: admin answers, audit)."""

from __future__ import annotations

import pytest

from agent.oauth import errors
from agent.oauth.errors import (
    InvalidClient,
    InvalidGrant,
    InvalidTarget,
    OAuthError,
    ServerUnavailable,
    UntrustedAuthorizationServer,
    from_error_response,
)

URL = "https://as.example/token"
# no guess at a cause: invalid_client has several (issue 19: a guess sent an operator the
# wrong way when the real cause was the server's cached JWKS)
CLIENT_HINT = ""
TARGET_HINT = ""
NO_CODE = " and no OAuth error code"


@pytest.mark.parametrize(
    "status,body,cls,error,description,hint",
    [
        (401, {"error": "invalid_client"}, InvalidClient, "invalid_client", None, CLIENT_HINT),
        (
            400,
            {"error": "unauthorized_client"},
            InvalidClient,
            "unauthorized_client",
            None,
            CLIENT_HINT,
        ),
        (
            400,
            {"error": "invalid_grant", "error_description": "expired"},
            InvalidGrant,
            "invalid_grant",
            "expired",
            "",
        ),
        (400, {"error": "invalid_target"}, InvalidTarget, "invalid_target", None, TARGET_HINT),
        # an error this client has no type for: the general one, the server's words kept
        (
            400,
            {"error": "slow_down", "error_description": "wait"},
            OAuthError,
            "slow_down",
            "wait",
            "",
        ),
        # a server error is worth retrying (with backoff); a client error is not
        (500, {}, ServerUnavailable, None, None, NO_CODE),
        (
            503,
            {"error": "temporarily_unavailable"},
            ServerUnavailable,
            "temporarily_unavailable",
            None,
            "",
        ),
        (499, {}, OAuthError, None, None, NO_CODE),
        # a known error outranks the status
        (500, {"error": "invalid_grant"}, InvalidGrant, "invalid_grant", None, ""),
        # what is not an RFC 6749 §5.2 body is not read as one
        (400, ["invalid_client"], OAuthError, None, None, NO_CODE),
        (400, {"error": 7, "error_description": ["x"]}, OAuthError, None, None, NO_CODE),
        (
            401,
            {"error": "invalid_client", "error_description": 3},
            InvalidClient,
            "invalid_client",
            None,
            CLIENT_HINT,
        ),
        (400, {"error": ""}, OAuthError, "", None, NO_CODE),  # an empty error names none
    ],
)
def test_an_error_answer_maps_to_its_type_with_the_servers_words(
    status, body, cls, error, description, hint
):
    e = from_error_response(status, body, URL, "token request")
    assert type(e) is cls
    assert (e.error, e.error_description, e.status, e.url) == (
        error,
        description,
        status,
        URL,
    )
    said = ""
    if error:
        said = (
            f" (server said {error}: {description})" if description else f" (server said {error})"
        )
    assert str(e) == f"token request at {URL} failed with HTTP {status}{hint}{said}"


def test_what_credless_sent_is_said_after_what_the_server_said_and_no_cause_is_guessed():
    sent = "credless authenticated as client_id 'spiffe://example.org/a' (key 'k1')"
    e = from_error_response(
        401,
        {"error": "invalid_client", "error_description": "client authentication failed"},
        URL,
        "token request",
        sent,
    )
    assert str(e) == (
        f"token request at {URL} failed with HTTP 401 (server said invalid_client: client "
        f"authentication failed); {sent}"
    )
    assert "check" not in str(e) and "jwks_uri" not in str(e)


def test_the_record_of_an_error_names_its_kind_and_the_servers_answer():
    e = from_error_response(401, {"error": "invalid_client", "error_description": "bad"}, URL, "x")
    assert e.to_dict() == {
        "kind": "invalid_client",
        "error": "invalid_client",
        "error_description": "bad",
        "status": 401,
        "message": str(e),
    }
    assert OAuthError("plain").to_dict() == {
        "kind": "oauth",
        "error": None,
        "error_description": None,
        "status": None,
        "message": "plain",
    }


def test_an_untrusted_authorization_server_is_named_with_what_was_allowed():
    e = UntrustedAuthorizationServer(
        "not allowed",
        server="https://evil.example",
        named=["https://evil.example", "https://as.example"],
        allowed=["https://as.example"],
        url="https://mcp.example/mcp",
    )
    assert isinstance(e, errors.TrustRefused)
    assert (e.server, e.named, e.allowed, e.url) == (
        "https://evil.example",
        ("https://evil.example", "https://as.example"),
        ("https://as.example",),
        "https://mcp.example/mcp",
    )
    assert str(e) == "not allowed"
    assert e.to_dict()["kind"] == "untrusted_authorization_server"


@pytest.mark.parametrize(
    "cls,kind,also",
    [
        (errors.DiscoveryError, "discovery", ()),
        (errors.RegistrationError, "registration", ()),
        (InvalidClient, "invalid_client", ()),
        (InvalidGrant, "invalid_grant", ()),
        (InvalidTarget, "invalid_target", ()),
        (ServerUnavailable, "unavailable", ()),
        (errors.MalformedResponse, "malformed_response", ()),
        (errors.IdentityNotIssuable, "identity", ()),
        (errors.TrustRefused, "refused", ()),
        (errors.InsecureEndpoint, "insecure_endpoint", (errors.TrustRefused,)),
        (
            errors.MetadataMismatch,
            "metadata_mismatch",
            (errors.TrustRefused, errors.DiscoveryError),
        ),
        (errors.TokenRefused, "token_refused", (errors.TrustRefused, errors.MalformedResponse)),
    ],
)
def test_each_failure_is_counted_and_audited_under_its_own_kind(cls, kind, also):
    e = cls("m")
    assert e.kind == kind and e.to_dict()["kind"] == kind
    assert all(isinstance(e, base) for base in (OAuthError, *also))


def test_a_new_kind_of_failure_is_named_where_it_is_declared():
    class Throttled(OAuthError, kind="throttled"):
        pass

    assert Throttled.kind == "throttled" and Throttled("m").to_dict()["kind"] == "throttled"
    assert OAuthError.kind == "oauth"  # the base keeps its own
