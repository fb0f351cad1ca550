"""Token requests (client_credentials + a JWT-SVID client assertion) and their responses.

Two assertion profiles, chosen per server:
- jwt-bearer (RFC 7523 §2.2 / OIDC private_key_jwt), the widest support: the JWT-SVID is
  minted with iss = sub = client_id (the SPIFFE ID unless registration returned another),
  a fresh jti, and aud = the issuer identifier (or the token endpoint, for servers that
  want that);
- jwt-spiffe (draft-ietf-oauth-spiffe-client-auth): a plain JWT-SVID whose aud is the issuer
  identifier only.
Every attempt gets a fresh assertion: servers refuse a reused jti, and a DPoP nonce retry is
a second attempt.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any

import httpx

from agent import jsondoc
from agent.oauth.discovery import canonical_resource
from agent.oauth.dpop import DPoPKey, valid_nonce
from agent.oauth.errors import (
    MalformedResponse,
    OAuthError,
    ServerUnavailable,
    TokenRefused,
    from_error_response,
    unavailable,
)
from agent.oauth.trust import (
    ServerTls,
    authorization_server_tls,
    check_endpoint,
    refuse_certificate,
)
from agent.observe.logging import get_logger

log = get_logger("oauth")

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"


def fingerprint(token: str) -> str:
    """A stable, non-reversible name for a token in logs and audit: sha256, 16 hex chars."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


_B64URL = re.compile(r"[A-Za-z0-9_-]+")


def _jwt_claims_unverified(token: str, url: str = "") -> dict | None:
    """The claims of an access token that is a JWT (three base64url segments, the first a
    JSON object: its JOSE header); None for any other (opaque) token. A token with a JWT's
    header whose payload is not a JSON object is refused: the checks below must not be
    dodged by a malformed JWT. Nothing is verified: the agent is not the resource server and
    holds none of the AS's keys; it reads the claims to refuse a token it must not forward
    (another audience, no key binding) and for fingerprints (jti, cnf)."""
    parts = token.split(".")
    if len(parts) != 3 or not all(_B64URL.fullmatch(p) for p in parts[:2]):
        return None
    try:
        header = jsondoc.loads_b64url(parts[0])
    except ValueError:
        return None
    if not isinstance(header, dict):
        return None
    try:
        claims = jsondoc.loads_b64url(parts[1])
    except ValueError:
        claims = None
    if not isinstance(claims, dict):
        raise TokenRefused(
            f"token response from {url}: the access token is a JWT whose "
            "payload is not a JSON object",
            url=url or None,
        )
    return claims


def assertion_fingerprint(assertion: str) -> dict[str, Any]:
    """What an operator may know of a client assertion credless sent, to compare with the
    authorization server's records: the key id that signed it, its jti, iss and aud (all
    public; never the assertion). Read from credless's own JWT, unverified."""
    parts = assertion.split(".")
    try:
        header, claims = jsondoc.loads_b64url(parts[0]), jsondoc.loads_b64url(parts[1])
    except (ValueError, IndexError):
        return {}
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return {}
    return {
        "kid": header.get("kid"),
        "jti": claims.get("jti"),
        "iss": claims.get("iss"),
        "aud": claims.get("aud"),
    }


def _canonical(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return canonical_resource(value)
    except OAuthError:
        return None


def check_audience(claims: dict, resource: str, url: str) -> None:
    """A JWT access token must name this server: `aud` (RFC 9068 §2.2, RFC 8707), or, when
    it has no `aud`, a `resource` claim. A token for another resource is refused: forwarded
    to this server, the server could replay it where it is valid.

    The signature is deliberately not checked: the agent is not the resource server (it
    holds none of the AS's keys and need not), and the check is about what the agent would
    forward, not about whether the token is genuine. Claims that name this server on a
    token that is not genuine gain nobody anything: the server verifies the signature and
    the audience itself and refuses it."""
    named = claims["aud"] if "aud" in claims else claims.get("resource")
    names = named if isinstance(named, list) else [named]
    if any(_canonical(n) == resource for n in names):
        return
    what = "names no audience" if named is None else f"is for audience {named!r}"
    raise TokenRefused(
        f"token response from {url}: the access token {what}, not this "
        f"server ({resource}); a token for another resource is never sent to "
        "it (RFC 8707, RFC 9068 §4)",
        url=url,
    )


# a token this close to its expiry is not used: it could expire on the way
EXPIRY_SKEW_SECONDS = 5.0

# What an access token may be to go in an Authorization field as sent: a token68 (RFC 7235
# §2.1; RFC 6750 §2.1's b64token, RFC 9449 §7.1). Anything else (a CR or LF above all)
# would change the request it is spliced into: an authorization server answering
# "a\r\nX: 1\r\n\r\nGET /other" would send the MCP server a second request past policy.
TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*\Z")


@dataclass(frozen=True, repr=False)
class Token:
    access_token: str
    token_type: str  # "Bearer" or "DPoP"
    issued_at: float
    expires_at: float
    scope: str
    resource: str
    issuer: str
    spiffe_id: str
    client_id: str
    jkt: str | None  # the DPoP key thumbprint the token is bound to
    fingerprint: str
    jti: str | None
    audience: Any = None

    def __post_init__(self) -> None:
        # every token, however made (a token response, a handover), before any request
        # carries it; the value is never quoted
        if not TOKEN68.match(self.access_token):
            raise ValueError(
                f"access token {self.fingerprint} is not a token68 (RFC 7235 §2.1): it "
                "cannot go in an Authorization field as it is"
            )
        if self.token_type not in ("Bearer", "DPoP"):
            raise ValueError(f"token type {self.token_type!r} is neither Bearer nor DPoP")

    def __repr__(self) -> str:
        return (
            f"Token(type={self.token_type}, fingerprint={self.fingerprint}, "
            f"spiffe_id={self.spiffe_id}, resource={self.resource}, "
            f"expires_at={self.expires_at:.0f})"
        )

    __str__ = __repr__

    def valid(self, now: float | None = None, skew: float = EXPIRY_SKEW_SECONDS) -> bool:
        return (time.time() if now is None else now) < self.expires_at - skew

    def authorization(self) -> str:
        return f"{self.token_type} {self.access_token}"

    @functools.cached_property
    def authorization_bytes(self) -> bytes:
        """authorization() as header bytes, made once: it goes on every proxied request."""
        return self.authorization().encode()

    @functools.cached_property
    def authorization_field(self) -> bytes:
        """The whole `Authorization` field as spliced after a request's last field (CRLF
        first), made once."""
        return b"\r\nAuthorization: " + self.authorization_bytes

    def summary(self) -> dict:
        """Everything an operator may see: never the token itself."""
        return {
            "token_type": self.token_type,
            "expires_in": int(self.expires_at - time.time()),
            "scope": self.scope,
            "audience": self.audience,
            "resource": self.resource,
            "issuer": self.issuer,
            "client_id": self.client_id,
            "spiffe_id": self.spiffe_id,
            "cnf_jkt": self.jkt,
            "jti": self.jti,
            "token_sha256": self.fingerprint,
        }


def parse_token_response(
    body: Any,
    *,
    url: str,
    resource: str,
    issuer: str,
    spiffe_id: str,
    client_id: str,
    dpop: DPoPKey | None,
    now: float,
    dpop_required: str | None = None,
) -> Token:
    """The Token in a token response, or the reason it cannot be used.

    `dpop_required` says why a DPoP-bound token is required (None: it is not): a Bearer
    token, or a JWT without the key binding, is then refused as weaker than required."""
    if not isinstance(body, dict):
        raise MalformedResponse(f"token response from {url} is not a JSON object", url=url)
    access = body.get("access_token")
    ttype = body.get("token_type")
    if not isinstance(access, str) or not access or not isinstance(ttype, str):
        raise MalformedResponse(
            f"token response from {url} lacks access_token or token_type", url=url
        )
    if ttype.lower() not in ("bearer", "dpop"):
        raise MalformedResponse(
            f"token response from {url} has token_type {ttype!r}; expected Bearer or DPoP", url=url
        )
    ttype = "DPoP" if ttype.lower() == "dpop" else "Bearer"
    if not TOKEN68.match(access):
        raise MalformedResponse(
            f"token response from {url}: the access token is not a token68 (RFC 6750 §2.1, "
            "RFC 9449 §7.1; a character such as a space, CR or LF): it cannot go in an "
            "Authorization field as it is, and is not used",
            url=url,
        )
    bound_to = None  # the key a DPoP token must be bound to
    if ttype == "DPoP":
        if dpop is None:
            raise MalformedResponse(
                f"{url} issued a DPoP token to a request without a proof", url=url
            )
        bound_to = dpop
    if ttype == "Bearer" and dpop_required:
        raise TokenRefused(
            f"{url} issued a Bearer token for {resource}, but DPoP-bound tokens "
            f"are required ({dpop_required}); a stealable token is never "
            "used where a bound one was asked for (RFC 9449)",
            url=url,
        )
    claims = _jwt_claims_unverified(access, url)
    expires_in = body.get("expires_in")
    if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) and expires_in > 0:
        expires_at = now + float(expires_in)
    elif claims is not None and isinstance(claims.get("exp"), (int, float)):
        expires_at = float(claims["exp"])
    else:
        expires_at = now + 60.0  # no lifetime given: assume short, refresh early
    jkt = None
    if bound_to is not None:
        cnf_claim = claims.get("cnf") if claims is not None else None
        cnf = cnf_claim if isinstance(cnf_claim, dict) else {}
        if dpop_required and claims is not None and "jkt" not in cnf:
            raise TokenRefused(
                f"{url} issued a DPoP token for {resource} that is a JWT "
                f"without cnf.jkt (no key binding, RFC 9449 §6.1), but "
                f"DPoP-bound tokens are required ({dpop_required})",
                url=url,
            )
        jkt = cnf.get("jkt", bound_to.jkt)
        if jkt != bound_to.jkt:
            raise MalformedResponse(f"{url} bound the token to key {jkt}, not ours", url=url)
    if claims is not None:
        check_audience(claims, resource, url)
    claims = claims or {}
    scope = body.get("scope")
    if not isinstance(scope, str):
        scope = ""
    return Token(
        access_token=access,
        token_type=ttype,
        issued_at=now,
        expires_at=expires_at,
        scope=scope,
        resource=resource,
        issuer=issuer,
        spiffe_id=spiffe_id,
        client_id=client_id,
        jkt=jkt,
        fingerprint=fingerprint(access),
        jti=claims.get("jti") if isinstance(claims.get("jti"), str) else None,
        audience=claims.get("aud"),
    )


# how an authorization server is verified when the caller does not say (oauth.ca_file unset)
SYSTEM_STORE = authorization_server_tls("")


async def post_form(
    http: httpx.AsyncClient,
    url: str,
    form: dict | None,
    headers: dict,
    what: str,
    json_body: Any = None,
    tls: ServerTls = SYSTEM_STORE,
) -> tuple[int, Any, httpx.Headers]:
    """POST a form (or a JSON body) to an authorization server and read a JSON answer. A
    certificate that does not verify (against tls: what the client verifies by, named in
    the error) is AuthorizationServerCertificateRefused; other network errors and 5xx are
    ServerUnavailable, a body that is not JSON is MalformedResponse."""
    try:
        r = await http.post(
            url, data=form, json=json_body, headers={"Accept": "application/json", **headers}
        )
    except httpx.HTTPError as e:
        refuse_certificate(e, url, tls)
        raise unavailable(e, what, url) from None
    try:
        body = jsondoc.loads(r.content)
    except ValueError:
        body = None
    if r.status_code >= 500:
        raise ServerUnavailable(
            f"{what} at {url} failed with HTTP {r.status_code}", status=r.status_code, url=url
        )
    if body is None:
        raise MalformedResponse(
            f"{what} at {url} answered HTTP {r.status_code} with a body that is not JSON",
            status=r.status_code,
            url=url,
        )
    return r.status_code, body, r.headers


async def request_token(
    http: httpx.AsyncClient,
    *,
    token_endpoint: str,
    issuer: str,
    resource: str,
    scope: str,
    profile: str,
    assertion_audience: str,
    client_id: str,
    spiffe_id: str,
    mint_assertion,
    dpop: DPoPKey | None,
    nonces: dict[str, str],
    dpop_required: str | None = None,
    tls: ServerTls = SYSTEM_STORE,
) -> Token:
    """One client_credentials token request, with one retry on a DPoP nonce challenge.
    tls: how the http client verifies the authorization server (for a refusal's message).

    `mint_assertion(audience, iss)` returns a fresh JWT-SVID string. It is called only once
    the token endpoint passed the https-unless-loopback check (also made on the metadata).
    """
    check_endpoint(token_endpoint, "token endpoint")
    aud = issuer if profile == "jwt-spiffe" or assertion_audience == "issuer" else token_endpoint
    for attempt in (1, 2):
        assertion = mint_assertion(aud, client_id if profile == "jwt-bearer" else None)
        signed = assertion_fingerprint(assertion)
        form = {
            "grant_type": "client_credentials",
            "resource": resource,
            "client_assertion_type": JWT_SPIFFE if profile == "jwt-spiffe" else JWT_BEARER,
            "client_assertion": assertion,
        }
        if scope:
            form["scope"] = scope
        if profile == "jwt-bearer" and client_id != spiffe_id:
            form["client_id"] = client_id
        headers = {}
        if dpop is not None:
            headers["DPoP"] = dpop.proof(
                "POST", token_endpoint, nonce=nonces.get(issuer), remembered=False
            )
        log.debug(
            "token request",
            url=token_endpoint,
            client_id=client_id,
            profile=profile,
            resource=resource,
            assertion_kid=signed.get("kid"),
            assertion_jti=signed.get("jti"),
            assertion_aud=aud,
            dpop_jkt=dpop.jkt if dpop is not None else None,
            attempt=attempt,
        )
        now = time.time()
        status, body, resp_headers = await post_form(
            http, token_endpoint, form, headers, "token request", tls=tls
        )
        fresh = resp_headers.get("dpop-nonce")
        if fresh and valid_nonce(fresh):
            nonces[issuer] = fresh
        if status == 200:
            tok = parse_token_response(
                body,
                url=token_endpoint,
                resource=resource,
                issuer=issuer,
                spiffe_id=spiffe_id,
                client_id=client_id,
                dpop=dpop,
                now=now,
                dpop_required=dpop_required,
            )
            log.debug(
                "token received",
                url=token_endpoint,
                token_type=tok.token_type,
                token_sha256=tok.fingerprint,
                jti=tok.jti,
                jkt=tok.jkt,
                expires_in=round(tok.expires_at - now),
                scope=tok.scope,
            )
            return tok
        log.debug(
            "token request refused",
            url=token_endpoint,
            status=status,
            error=body.get("error") if isinstance(body, dict) else None,
            attempt=attempt,
        )
        if (
            attempt == 1
            and dpop is not None
            and isinstance(body, dict)
            and body.get("error") == "use_dpop_nonce"
            and fresh
            and valid_nonce(fresh)
        ):
            continue
        sent = (
            f"credless authenticated as client_id {client_id!r} with a {profile} assertion "
            f"(JWT-SVID signed by key {signed.get('kid')!r}, jti {signed.get('jti')!r}, "
            f"audience {aud!r})"
        )
        raise from_error_response(status, body, token_endpoint, "token request", sent)
    raise OAuthError("unreachable")  # pragma: no cover
