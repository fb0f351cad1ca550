"""Typed OAuth failures. Messages carry the server's error and error_description, the URL
asked and what to check, never a token, an assertion or a key."""

from __future__ import annotations


class OAuthError(Exception):
    """An OAuth failure. Each subclass names its kind (`class X(OAuthError, kind="x")`):
    the label it is counted and audited under, and the "kind" of an error answer."""

    kind = "oauth"

    def __init_subclass__(cls, kind: str, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.kind = kind

    def __init__(
        self,
        message: str,
        *,
        error: str | None = None,
        error_description: str | None = None,
        status: int | None = None,
        url: str | None = None,
    ):
        self.error = error
        self.error_description = error_description
        self.status = status
        self.url = url
        detail = message
        if error:
            detail += f" (server said {error}"
            detail += f": {error_description})" if error_description else ")"
        super().__init__(detail)

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "error": self.error,
            "error_description": self.error_description,
            "status": self.status,
            "message": str(self),
        }


class DiscoveryError(OAuthError, kind="discovery"): ...


class RegistrationError(OAuthError, kind="registration"): ...


class InvalidClient(OAuthError, kind="invalid_client"): ...


class InvalidGrant(OAuthError, kind="invalid_grant"): ...


class InvalidTarget(OAuthError, kind="invalid_target"): ...


class ServerUnavailable(OAuthError, kind="unavailable"):
    """Network errors, timeouts and 5xx: worth retrying with backoff."""


class MalformedResponse(OAuthError, kind="malformed_response"): ...


class IdentityNotIssuable(OAuthError, kind="identity"): ...


class TrustRefused(OAuthError, kind="refused"):
    """The agent refused to believe or use something a server said: an authorization server
    not allowed for the MCP server, a plain-http endpoint off loopback, metadata naming
    another resource or issuer, a token for another audience or weaker than required. Never
    retried sooner than other client errors; audited (oauth.refused or token.failed)."""


class UntrustedAuthorizationServer(TrustRefused, kind="untrusted_authorization_server"):
    def __init__(
        self,
        message: str,
        *,
        server: str,
        named: tuple[str, ...] | list[str],
        allowed: tuple[str, ...] | list[str],
        url: str | None = None,
    ):
        self.server = server
        self.named = tuple(named)
        self.allowed = tuple(allowed)
        super().__init__(message, url=url)


class InsecureEndpoint(TrustRefused, kind="insecure_endpoint"): ...


class MetadataMismatch(TrustRefused, DiscoveryError, kind="metadata_mismatch"): ...


class TokenRefused(TrustRefused, MalformedResponse, kind="token_refused"): ...


def from_error_response(status: int, body: dict, url: str, what: str) -> OAuthError:
    """Map an RFC 6749 §5.2 error body to its type."""
    err = body.get("error") if isinstance(body, dict) else None
    desc = body.get("error_description") if isinstance(body, dict) else None
    err = err if isinstance(err, str) else None
    desc = desc if isinstance(desc, str) else None
    cls = {
        "invalid_client": InvalidClient,
        "unauthorized_client": InvalidClient,
        "invalid_grant": InvalidGrant,
        "invalid_target": InvalidTarget,
    }.get(err or "")
    if cls is None:
        cls = ServerUnavailable if status >= 500 else OAuthError
    hint = {
        InvalidClient: "check that the client is registered at the authorization server "
        "with this SPIFFE ID and that its jwks_uri points at the agent's bundle endpoint",
        InvalidTarget: "check that the authorization server knows this MCP server URL as "
        "a resource",
    }.get(cls, "")
    msg = f"{what} at {url} failed with HTTP {status}"
    if hint:
        msg += f"; {hint}"
    return cls(msg, error=err, error_description=desc, status=status, url=url)
