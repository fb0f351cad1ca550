"""Assertion mode: a workload's own requests to its authorization server, with credless's
client authentication put in.

In assertion mode a [[servers]] url is the authorization server's token endpoint; the
workload runs its own OAuth client and holds no credential, at most a placeholder. decide.py
has admitted the request (an attested process, a POST to the server, the right Host) and
named it (assertion_route.assertion_request); this module reads the body and puts
credless's part in:

- a token request (a form POST to the token endpoint, any grant: client_credentials,
  refresh_token, authorization_code, RFC 8693 token exchange, RFC 7523 jwt-bearer, ...):
  client_id = the SPIFFE ID, client_assertion = a fresh JWT-SVID (aud = the issuer, or the
  token endpoint by servers[].assertion_audience), client_assertion_type by
  servers[].auth_profile; a client_secret is removed;
- a dynamic registration (RFC 7591, a JSON POST to the registration endpoint the server's
  metadata names): the metadata that makes the client the SPIFFE identity's, made by
  agent/oauth/registration.py as for credless's own registrations (software_statement,
  jwks_uri, private_key_jwt, spiffe_id); the workload's other metadata is kept.

What the workload sent in their place (rewrite_token_form, rewrite_registration): nothing
(added), a placeholder that is not a JWT (replaced), or a JWT of its own: a credential the
workload should not have, refused with 400 (servers[].workload_assertion = "refuse", the
default) or replaced ("replace"). Each is audited by jti, never by value. A body credless
cannot read unambiguously (a parameter that carries client authentication given twice, a
duplicated JSON member, an encoding) is refused: the server could read it otherwise.

The registration's software statement is a JWT-SVID whose audience is the registration
endpoint, not the issuer: the server's answer, which goes to the workload, may echo it, and
a JWT-SVID for the issuer would be a client assertion the workload could use itself.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from agent import jsondoc
from agent.identity.bundle_endpoint import oauth_jwks
from agent.identity.jwtsvid import JwtSvid
from agent.inject import assertion_route
from agent.inject.bodies import Replay, read_body
from agent.inject.exchange import Exchanges
from agent.inject.http1 import Head, simple_response
from agent.inject.ports import Identities
from agent.inject.record import AuditBase, Recorder
from agent.inject.served import Served
from agent.inject.upstreams import Upstream
from agent.oauth.errors import OAuthError
from agent.oauth.registration import client_metadata

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
ASSERTION_TYPES = {"jwt-bearer": JWT_BEARER, "jwt-spiffe": JWT_SPIFFE}
# the form parameters of client authentication (RFC 6749 2.3.1, RFC 7521 4.2), which
# credless sets; these and grant_type must appear at most once (RFC 6749 3.2)
CLIENT_AUTH = ("client_id", "client_secret", "client_assertion", "client_assertion_type")
SINGLE = ("grant_type", *CLIENT_AUTH)
MAX_FIELDS = 256
ASSERTION_TTL = 60


class Refused(Exception):
    """The workload's request cannot be credentialed as sent: answered 400 with an OAuth
    error (error: the RFC's code) and audited (fields, no secret)."""

    def __init__(self, error: str, description: str, **fields: Any):
        super().__init__(description)
        self.error, self.description, self.fields = error, description, fields


@dataclass
class Rewritten:
    body: bytes
    fields: dict[str, Any] = field(default_factory=dict)  # for the audit: jti, action, ...
    # the client assertion credless put in: the server's answer is relayed without it, since
    # a server may quote it back (an error refusing it)
    minted: str = ""


def is_jwt(value: str) -> bool:
    """Whether value is a JWT (a JWS or JWE, compact or JSON serialization): something that
    may be a real credential, as opposed to a placeholder."""
    text = value.strip()
    if text.startswith("{"):
        try:
            doc = jsondoc.loads(text)
        except ValueError:
            return False
        return isinstance(doc, dict) and (
            "payload" in doc or "ciphertext" in doc or "signatures" in doc
        )
    parts = text.split(".")
    if len(parts) not in (3, 5):
        return False
    try:
        header = jsondoc.loads_b64url(parts[0])
    except (ValueError, binascii.Error, UnicodeError):
        return False
    return isinstance(header, dict) and isinstance(header.get("alg"), str)


def jti_of(value: str) -> str | None:
    """The jti of a compact JWS, unverified, for the audit (None if it has none)."""
    try:
        claims = jsondoc.loads_b64url(value.strip().split(".")[1])
    except (ValueError, IndexError, binascii.Error, UnicodeError):
        return None
    jti = claims.get("jti") if isinstance(claims, dict) else None
    return jti[:128] if isinstance(jti, str) else None


def _workload_value(
    sent: str | None, what: str, workload_assertion: str, error: str
) -> tuple[str, dict[str, Any]]:
    """What to do with the workload's own `what` (client_assertion, software_statement):
    the action for the audit, or Refused."""
    if sent is None or sent == "":
        return "added", {}
    if not is_jwt(sent):
        return "replaced", {}
    seen = {"workload_jti": jti_of(sent)}
    if workload_assertion != "replace":
        raise Refused(
            error,
            f"credless: this workload sent its own JWT as {what}; it must hold no credential "
            "(credless authenticates it with its SPIFFE identity). Send a placeholder or "
            'nothing, or set workload_assertion = "replace" on this server',
            what=what,
            **seen,
        )
    return "replaced_workload_jwt", seen


def rewrite_token_form(
    body: bytes,
    spiffe_id: str,
    mint: Callable[[], JwtSvid],
    workload_assertion: str = "refuse",
    assertion_type: str = JWT_BEARER,
) -> Rewritten:
    """A token request's form with credless's client authentication in place of the
    workload's (see the module's docstring). Raises Refused."""
    try:
        pairs = parse_qsl(
            body.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=bool(body),
            errors="strict",
            max_num_fields=MAX_FIELDS,
        )
    except UnicodeError:
        raise Refused(
            "invalid_request",
            "credless: the token request is not a valid form: it is not ASCII, or a "
            "percent-encoded value is not UTF-8",
        ) from None
    except ValueError as e:  # its text quotes the field, which may be a client_secret
        why = (
            f"more than {MAX_FIELDS} fields"
            if "max" in str(e).lower()
            else "a field is not name=value (fields are joined by &)"
        )
        raise Refused(
            "invalid_request", f"credless: the token request is not a valid form: {why}"
        ) from None
    seen: dict[str, list[str]] = {}
    for k, v in pairs:
        seen.setdefault(k, []).append(v)
    twice = sorted(k for k in SINGLE if len(seen.get(k, ())) > 1)
    if twice:
        raise Refused(
            "invalid_request",
            f"credless: {', '.join(twice)} given more than once (RFC 6749 3.2): the server "
            "could read another copy than credless",
            duplicated=twice,
        )
    sent = seen["client_assertion"][0] if "client_assertion" in seen else None
    action, fields = _workload_value(
        sent, "client_assertion", workload_assertion, "invalid_request"
    )
    svid = mint()
    removed = sorted(k for k in ("client_secret",) if k in seen)
    out = [(k, v) for k, v in pairs if k not in CLIENT_AUTH]
    out += [
        ("client_id", spiffe_id),
        ("client_assertion_type", assertion_type),
        ("client_assertion", svid.token),
    ]
    fields.update(
        request=assertion_route.TOKEN,
        action=action,
        grant_type=seen["grant_type"][0] if "grant_type" in seen else None,
        jti=svid.jti,
        audience=", ".join(svid.audience),
        removed=removed,
    )
    if seen.get("client_id", [spiffe_id])[0] != spiffe_id:
        fields["workload_client_id"] = seen["client_id"][0][:200]
    return Rewritten(urlencode(out).encode(), fields, svid.token)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate members {', '.join(dup)}")
    return dict(pairs)


def rewrite_registration(
    body: bytes,
    spiffe_id: str,
    mint_statement: Callable[[], JwtSvid],
    *,
    endpoint: str,
    jwks_uri: str | None,
    jwks: Callable[[], dict],
    workload_assertion: str = "refuse",
) -> Rewritten:
    """A registration request's metadata with the SPIFFE identity's in place of the
    workload's (registration.client_metadata). Raises Refused, or RegistrationError when
    credless has no keys it may register (a jwks_uri the server could not fetch safely)."""
    try:
        meta = jsondoc.loads(body, object_pairs_hook=_no_duplicates)
    except ValueError as e:
        raise Refused(
            "invalid_client_metadata", f"credless: the registration request is not JSON: {e}"
        ) from None
    if not isinstance(meta, dict):
        raise Refused(
            "invalid_client_metadata", "credless: the registration request is not a JSON object"
        )
    sent = meta.get("software_statement")
    action, fields = _workload_value(
        sent if isinstance(sent, str) else None,
        "software_statement",
        workload_assertion,
        "invalid_software_statement",
    )
    statement = mint_statement()
    ours = client_metadata(
        spiffe_id,
        statement.token,
        endpoint=endpoint,
        jwks_uri=jwks_uri,
        jwks=None if jwks_uri else jwks(),
    )
    replaced = sorted(
        k
        for k in ("token_endpoint_auth_method", "jwks", "jwks_uri", "spiffe_id")
        if k in meta and meta[k] != ours.get(k)
    )
    for k in ("jwks", "jwks_uri", "client_secret"):
        meta.pop(k, None)
    meta.update(ours)
    fields.update(
        request=assertion_route.REGISTRATION,
        action=action,
        jti=statement.jti,
        audience=", ".join(statement.audience),
        jwks_uri=jwks_uri,
        replaced=replaced,
    )
    # the statement stays in the answer (RFC 7591 §3.2.1 returns it unmodified): its audience
    # is the registration endpoint, no client assertion anywhere
    return Rewritten(json.dumps(meta).encode(), fields)


class AssertionRequests:
    def __init__(
        self,
        identity: Identities,
        rec: Recorder,
        exchanges: Exchanges,
        issuer_of: Callable[[Upstream], str],
        max_body: int,
    ):
        self.identity = identity
        self.rec = rec
        self.exchanges = exchanges
        self.issuer_of = issuer_of  # the issuer of a server's authorization server
        self.max_body = max_body

    async def _registration_endpoint(self, up: Upstream) -> str | None:
        """The registration endpoint the authorization server's metadata names, when it is
        on this server's address (where the workload's request came); else None."""
        meta = await self.exchanges.oauth.server_metadata(self.issuer_of(up))
        endpoint = meta.registration_endpoint
        if not endpoint:
            return None
        u = urlsplit(endpoint)
        port = u.port or (443 if u.scheme == "https" else 80)
        same = (u.hostname or "").lower() == up.host.lower() and port == up.port
        return endpoint if same else None

    def _jwks(self) -> dict:
        return json.loads(oauth_jwks(self.identity.bundle()))

    async def handle(
        self, head: Head, served: Served, audit_base: AuditBase, started: float
    ) -> bool:
        """Read the request and put credless's client authentication in (a token request
        or a registration, assertion_route.assertion_request), or send it on as it came. Returns
        whether the connection stays open."""
        client, up = served.client, served.up
        body = await read_body(client, self.max_body)
        if body is None:
            # the body was dropped: the connection may go on, but as the proxy's 413 does,
            # it is closed (a workload that sends this much is not to be waited on again)
            return await self._answer(
                served,
                audit_base,
                413,
                b"Payload Too Large",
                "body_too_large",
                f"credless: a request to the authorization server larger than "
                f"{self.max_body} bytes (policy.max_body_bytes); connection closed",
            )
        coding = head.get(b"content-encoding")
        if coding is not None and coding.strip().lower() != b"identity":
            return await self._answer(
                served,
                audit_base,
                415,
                b"Unsupported Media Type",
                "encoding_refused",
                "credless: a request to the authorization server must not be "
                f"content-encoded ({coding.decode('latin-1')}): credless reads it",
                keep=head.keep_alive,
            )
        ctype = head.get(b"content-type")
        kind = assertion_route.assertion_request(head.target, ctype, up.path)
        endpoint = None
        try:
            if kind == assertion_route.CANDIDATE:
                endpoint = await self._registration_endpoint(up)
                path = (urlsplit(endpoint).path or "/").encode() if endpoint else b"\0"
                kind = assertion_route.assertion_request(head.target, ctype, up.path, path)
            new_body, fields, minted = body, None, b""
            if kind is not None:
                rewritten = self._rewrite(kind, body, served, up, endpoint or "")
                new_body, fields = rewritten.body, rewritten.fields
                minted = rewritten.minted.encode()
        except Refused as e:
            self.rec.count(up, "assertion_refused")
            event_id = self.rec.audit_answered(
                "assertion.refused",
                audit_base,
                request=kind,
                error=e.error,
                reason=e.description,
                **e.fields,
            )
            return await self._send(
                served, 400, b"Bad Request", e.error, e.description, head.keep_alive, event_id
            )
        except OAuthError as e:
            self.rec.count(up, "token_error")
            event_id = self.rec.audit_answered(
                "request.failed", audit_base, reason=str(e), kind=e.kind
            )
            return await self._send(
                served,
                502,
                b"Bad Gateway",
                "server_error",
                f"credless: could not put client authentication into this request: {e}",
                head.keep_alive,
                event_id,
            )
        if fields is not None:
            self.rec.audit_event("assertion.injected", audit_base, **fields)
        head.remove(b"content-length", b"transfer-encoding")
        head.add(b"Content-Length", b"%d" % len(new_body))
        head.chunked = False
        if minted:  # the answer comes uncompressed, where the minted value can be masked
            head.remove(b"accept-encoding")
        return await self.exchanges.run(
            head, Replay(new_body), served, None, audit_base, started, mask=minted or None
        )

    def _rewrite(self, kind: str, body: bytes, served: Served, up: Upstream, reg: str) -> Rewritten:
        ident = served.holder()
        sid = str(ident.spiffe_id)
        server = self.exchanges.oauth.servers.get(up.name)
        if server is None:  # the proxy serves only configured servers: never so
            raise OAuthError(f"no [[servers]] entry named {up.name!r}")
        policy = server.workload_assertion
        if kind == assertion_route.TOKEN:
            audience = (
                up.origin + up.path.decode("latin-1")
                if server.assertion_audience == "token_endpoint"
                else self.issuer_of(up)
            )
            assertion_type = ASSERTION_TYPES.get(server.auth_profile)
            if assertion_type is None:  # config.py allows only these: fail closed
                raise OAuthError(f"servers[{up.name}].auth_profile {server.auth_profile!r}")
            return rewrite_token_form(
                body,
                sid,
                lambda: self.identity.jwt_svid(ident, [audience], ttl=ASSERTION_TTL, iss=sid),
                policy,
                assertion_type,
            )
        return rewrite_registration(
            body,
            sid,
            lambda: self.identity.jwt_svid(ident, [reg], ttl=ASSERTION_TTL, iss=sid),
            endpoint=reg,
            jwks_uri=self.exchanges.oauth.jwks_uri or None,
            jwks=self._jwks,
            workload_assertion=policy,
        )

    async def _answer(
        self,
        served: Served,
        audit_base: AuditBase,
        status: int,
        reason: bytes,
        outcome: str,
        description: str,
        keep: bool = False,
    ) -> bool:
        """A request refused before its body could be read as the AS would (too large, 413;
        content-encoded, 415): counted under the proxy's outcome for it (body_too_large,
        encoding_refused), audited (assertion.refused, with the status) and answered with
        an OAuth invalid_request naming the audit event."""
        self.rec.count(served.up, outcome)
        event_id = self.rec.audit_answered(
            "assertion.refused",
            audit_base,
            status=status,
            error="invalid_request",
            outcome=outcome,
            reason=description,
        )
        return await self._send(
            served, status, reason, "invalid_request", description, keep, event_id
        )

    @staticmethod
    async def _send(
        served: Served,
        status: int,
        reason: bytes,
        error: str,
        description: str,
        keep: bool,
        event_id: str | None = None,
    ) -> bool:
        """An OAuth error answer (RFC 6749 5.2, RFC 7591 3.2.2), which OAuth clients show;
        event_id: the audit event it names, for the operator (an extra member clients
        ignore)."""
        doc = {"error": error, "error_description": description}
        if event_id:
            doc["event_id"] = event_id
        extra = [] if keep else [(b"Connection", b"close")]
        served.client.write(simple_response(status, reason, json.dumps(doc).encode(), extra=extra))
        await served.client.drain()
        return keep
