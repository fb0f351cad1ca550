"""What credless asks an authorization server about a token it holds: introspection (RFC
7662, `credless oauth probe` on an opaque token) and revocation (RFC 7009, a phantom
placeholder misused: agent/inject/phantom.py). Both authenticate as the identity's client,
through OAuthService.client_authentication.

Revocation POSTs by hand rather than through tokens.post_form: its success has no JSON body
(RFC 7009 §2.2: "the content of the response body is ignored by the client"), while every
other answer credless reads is JSON; its errors are the token endpoint's (§2.2.1), read by
the same errors.from_error_response.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from agent import jsondoc
from agent.identity.sources import Identity
from agent.oauth.errors import OAuthError, ServerUnavailable, from_error_response, unavailable
from agent.oauth.tokens import SYSTEM_STORE, Token, post_form
from agent.oauth.trust import ServerTls, refuse_certificate

if TYPE_CHECKING:
    from agent.oauth.service import OAuthService

# what introspection may tell about a token; never the token itself
_CLAIMS = ("active", "sub", "aud", "client_id", "exp", "iat", "scope", "token_type", "iss", "cnf")


async def introspect(svc: OAuthService, ident: Identity, server_name: str, token: Token) -> dict:
    """The authorization server's claims about the token (active, sub, aud, ...)."""
    resolved, auth = await svc.client_authentication(ident, server_name)
    endpoint = resolved.metadata.introspection_endpoint
    if not endpoint:
        raise OAuthError(f"{resolved.issuer} advertises no introspection_endpoint")
    form = {"token": token.access_token, "token_type_hint": "access_token", **auth}
    status, body, _ = await post_form(
        svc.http_client(), endpoint, form, {}, "introspection", tls=svc.as_tls
    )
    if status != 200 or not isinstance(body, dict):
        raise from_error_response(
            status, body if isinstance(body, dict) else {}, endpoint, "introspection"
        )
    return {k: body[k] for k in _CLAIMS if k in body}


async def revoke(
    svc: OAuthService, spiffe_id: str, ident: Identity | None, server_name: str, reason: str
) -> list[str]:
    """Revoke the identity's cached tokens for the server at its authorization server and
    drop them, so its next request obtains a new one; the revoked tokens' fingerprints. A
    token the server could not be told about (ident None: no entry issues the identity now,
    so it cannot authenticate) is dropped all the same, and its audit event says it may be
    live until it expires."""
    held = [(k, t) for k, t in svc.cache.tokens() if k[0] == spiffe_id and k[1] == server_name]
    revoked = []
    for key, tok in held:
        svc.cache.invalidate(key)
        error = None
        try:
            if ident is None:
                raise OAuthError(f"{spiffe_id} is no identity this agent can issue now")
            resolved, auth = await svc.client_authentication(ident, server_name)
            endpoint = resolved.metadata.revocation_endpoint
            if not endpoint:
                raise OAuthError(f"{resolved.issuer} advertises no revocation_endpoint")
            await revoke_token(svc.http_client(), endpoint, tok.access_token, auth, tls=svc.as_tls)
            revoked.append(tok.fingerprint)
        except OAuthError as e:
            error = str(e)
        if svc.audit:
            failed = {"error": error, "note": "dropped; may be live until it expires"}
            svc.audit.emit(
                "token.revoked" if error is None else "token.revocation_failed",
                spiffe_id=spiffe_id,
                server=server_name,
                issuer=tok.issuer,
                jti=tok.jti,
                token_sha256=tok.fingerprint,
                reason=reason,
                **(failed if error else {}),
            )
    return revoked


async def revoke_token(
    http: httpx.AsyncClient,
    endpoint: str,
    token: str,
    client_auth: dict[str, str],
    tls: ServerTls = SYSTEM_STORE,
) -> None:
    """One RFC 7009 request. Raises OAuthError when the server refuses or is unreachable."""
    form = {"token": token, "token_type_hint": "access_token", **client_auth}
    try:
        r = await http.post(endpoint, data=form, headers={"Accept": "application/json"})
    except httpx.HTTPError as e:
        refuse_certificate(e, endpoint, tls)
        raise unavailable(e, "revocation", endpoint) from None
    if r.status_code == 200:
        return
    if r.status_code >= 500:
        raise ServerUnavailable(
            f"revocation at {endpoint} failed with HTTP {r.status_code}",
            status=r.status_code,
            url=endpoint,
        )
    try:
        body = jsondoc.loads(r.content)
    except ValueError:
        body = {}
    raise from_error_response(
        r.status_code, body if isinstance(body, dict) else {}, endpoint, "revocation"
    )
