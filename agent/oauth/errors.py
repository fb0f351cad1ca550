"""Typed OAuth failures. A message says what was observed: the request and the URL asked,
the status, the server's `error` and `error_description`, what credless sent (which
client, which key: fingerprints, never a token, an assertion or a key), or what timed out
after how long. It suggests a cause only where one is known: an error code such as
invalid_client has several causes (an unknown client, keys the server does not have or has
cached from before a rotation, a clock off), and a guess among them sends the operator the
wrong way. docs/errors.md lists what to check for each."""

from __future__ import annotations

import httpx


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
        sent: str = "",
    ):
        """sent: what credless sent that the server's records can be compared with (said
        after the server's words)."""
        self.error = error
        self.error_description = error_description
        self.status = status
        self.url = url
        detail = message
        if error:
            detail += f" (server said {error}"
            detail += f": {error_description})" if error_description else ")"
        if sent:
            detail += f"; {sent}"
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


def from_error_response(status: int, body: dict, url: str, what: str, sent: str = "") -> OAuthError:
    """Map an RFC 6749 §5.2 error body to its type. The message names the request, the URL,
    the status and what the server said; `sent`, what credless sent that the operator can
    compare with the server's records (the client id, the key id of the assertion)."""
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
    msg = f"{what} at {url} failed with HTTP {status}"
    if not err:
        msg += " and no OAuth error code"
    return cls(msg, error=err, error_description=desc, status=status, url=url, sent=sent)


def _timeout_of(e: httpx.HTTPError, phase: str) -> float | None:
    """The timeout (seconds) httpx applied to e's request for phase (connect, read, write,
    pool): it records them in the request's extensions."""
    try:
        value = e.request.extensions.get("timeout", {}).get(phase)
    except RuntimeError:  # an error raised without its request
        return None
    return float(value) if isinstance(value, (int, float)) else None


def _after(seconds: float | None) -> str:
    return f" after {seconds:.1f} s" if seconds is not None else ""


def _within(seconds: float | None) -> str:
    return f" within {seconds:.1f} s" if seconds is not None else ""


def describe_failure(e: httpx.HTTPError, what: str, url: str) -> str:
    """What happened to a request that got no HTTP answer, in words an operator can act on:
    `token request to URL: no answer after 10.0 s`, not `ReadTimeout: `."""
    head = f"{what} to {url}: "
    if isinstance(e, httpx.ReadTimeout):
        return head + "no answer" + _after(_timeout_of(e, "read"))
    if isinstance(e, httpx.ConnectTimeout):
        return head + "could not connect" + _within(_timeout_of(e, "connect"))
    if isinstance(e, httpx.WriteTimeout):
        return head + "could not send the request" + _within(_timeout_of(e, "write"))
    if isinstance(e, httpx.PoolTimeout):
        return head + "no connection free" + _within(_timeout_of(e, "pool"))
    detail = str(e).strip()
    if isinstance(e, httpx.ConnectError):
        return head + "could not connect" + (f" ({detail})" if detail else "")
    if isinstance(e, httpx.RemoteProtocolError) and "without sending" in detail:
        return head + "the server closed the connection without answering"
    if isinstance(e, httpx.ReadError):  # e.g. a reset: the server closed with the request unread
        broken = "the connection was broken before a complete answer arrived"
        return head + broken + (f" ({detail})" if detail else "")
    return head + type(e).__name__ + (f": {detail}" if detail else "")


def unavailable(e: httpx.HTTPError, what: str, url: str) -> ServerUnavailable:
    """A request that got no HTTP answer (see describe_failure), as a ServerUnavailable."""
    return ServerUnavailable(describe_failure(e, what, url), url=url)
