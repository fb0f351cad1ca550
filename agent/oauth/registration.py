"""Dynamic client registration (RFC 7591) with a SPIFFE software statement, and deletion
(RFC 7592) when no process with the identity remains.

The agent registers one client per (SPIFFE ID, authorization server): private_key_jwt with
the agent's JWT-SVID keys (`jwks_uri` = the bundle endpoint), client_credentials only, and a
`software_statement` that is a JWT-SVID for the registrant, proving to the server that this
registration comes from the holder of that identity's keys.

The metadata that ties a client to its SPIFFE identity (client_metadata: the key source,
private_key_jwt, the statement, `spiffe_id`) is made here once, for the agent's own
registrations and for a workload's that assertion mode rewrites (agent/inject/assertion.py).
A `jwks_uri` must be one the authorization server can fetch without anyone on the path
being able to substitute keys (check_jwks_uri): https, or http only between loopback
addresses of one host.

What comes back is kept in <state_dir>/oauth/clients.json (0600): the client_id, and the
registration access token and URI needed to delete the client later, also after a restart.
That registration access token is a management credential for the client's registration,
not an access token for any resource; it is never logged.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from agent.fsutil import atomic_write
from agent.oauth.errors import MalformedResponse, RegistrationError, unavailable
from agent.oauth.trust import (
    ServerTls,
    authorization_server_tls,
    check_endpoint,
    host_address,
    insecure_reason,
    is_loopback_host,
    refuse_certificate,
)

# how a registered client authenticates: a JWT-SVID, checked against the registered keys
AUTH_METHOD = "private_key_jwt"
AUTH_SIGNING_ALG = "ES256"


@dataclass(frozen=True, repr=False)
class RegisteredClient:
    spiffe_id: str
    issuer: str
    client_id: str
    registration_client_uri: str | None = None
    registration_access_token: str | None = None

    def __repr__(self) -> str:
        return f"RegisteredClient(client_id={self.client_id!r}, issuer={self.issuer!r})"


class ClientStore:
    """Registered clients on disk, written atomically with owner-only permissions."""

    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / "oauth" / "clients.json"
        self._lock = threading.Lock()

    def _read(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def _write(self, data: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True).encode(), 0o600)

    @staticmethod
    def _key(spiffe_id: str, issuer: str) -> str:
        return f"{spiffe_id} {issuer}"

    def get(self, spiffe_id: str, issuer: str) -> RegisteredClient | None:
        with self._lock:
            raw = self._read().get(self._key(spiffe_id, issuer))
        return RegisteredClient(**raw) if raw else None

    def put(self, client: RegisteredClient) -> None:
        with self._lock:
            data = self._read()
            data[self._key(client.spiffe_id, client.issuer)] = asdict(client)
            self._write(data)

    def remove(self, spiffe_id: str, issuer: str) -> None:
        with self._lock:
            data = self._read()
            if data.pop(self._key(spiffe_id, issuer), None) is not None:
                self._write(data)

    def for_identity(self, spiffe_id: str) -> list[RegisteredClient]:
        with self._lock:
            return [
                RegisteredClient(**v) for v in self._read().values() if v["spiffe_id"] == spiffe_id
            ]


def check_jwks_uri(jwks_uri: str, endpoint: str) -> None:
    """Refuse (RegistrationError) a jwks_uri the authorization server at `endpoint` could
    not fetch safely or at all: plain http to another host (anyone on the path could serve
    it other keys and have their assertions accepted as this client's), an unspecified
    address (0.0.0.0, ::), or a loopback one given to a server that is not on this host."""
    fix = (
        "serve the bundle endpoint over https (bundle_endpoint.cert_file and key_file) or "
        "set oauth.jwks_uri to an https URL the authorization server reaches; see "
        "docs/remote-as.md"
    )
    reason = insecure_reason(jwks_uri)
    host = (urlsplit(jwks_uri).hostname or "") if reason is None else ""
    address = host_address(host) if reason is None else None  # None: a name
    if address is not None and address.is_unspecified:
        reason = f"{host} is a listen-on-all address, not one another host can reach"
    if reason is None and is_loopback_host(host):
        as_host = urlsplit(endpoint).hostname or ""
        if not is_loopback_host(as_host):
            reason = (
                f"it is a loopback address, which the authorization server at {as_host} "
                "(not on this host) cannot reach"
            )
    if reason is not None:
        raise RegistrationError(
            f"refusing to register jwks_uri {jwks_uri!r} at {endpoint}: {reason}; {fix}",
            url=endpoint,
        )


def client_metadata(
    spiffe_id: str,
    software_statement: str,
    *,
    endpoint: str,
    jwks_uri: str | None,
    jwks: dict | None,
) -> dict[str, Any]:
    """The RFC 7591 metadata that makes a client this SPIFFE identity's: authentication by
    a JWT-SVID (private_key_jwt, ES256) checked against the agent's keys (jwks_uri, else
    jwks inline), the software statement proving the registrant holds them, and
    `spiffe_id` (draft-ietf-oauth-spiffe-client-auth). endpoint: the registration
    endpoint, for check_jwks_uri."""
    meta: dict[str, Any] = {
        "token_endpoint_auth_method": AUTH_METHOD,
        "token_endpoint_auth_signing_alg": AUTH_SIGNING_ALG,
        "software_statement": software_statement,
        "spiffe_id": spiffe_id,
    }
    if jwks_uri:
        check_jwks_uri(jwks_uri, endpoint)
        meta["jwks_uri"] = jwks_uri
    elif jwks is not None:
        meta["jwks"] = jwks
    else:
        raise RegistrationError(
            f"no keys to register at {endpoint}: the bundle endpoint is off and "
            "oauth.jwks_uri is not set",
            url=endpoint,
        )
    return meta


async def register(
    http: httpx.AsyncClient,
    *,
    endpoint: str,
    issuer: str,
    spiffe_id: str,
    jwks_uri: str | None,
    jwks: dict | None,
    software_statement: str,
    dpop: bool,
    tls: ServerTls | None = None,
) -> RegisteredClient:
    """Register the identity's client at endpoint. tls: how the http client verifies the
    authorization server (named when its certificate does not verify: then
    AuthorizationServerCertificateRefused, and nothing was sent)."""
    check_endpoint(endpoint, "registration endpoint")  # also checked on the metadata
    meta: dict[str, Any] = {
        "client_name": spiffe_id,
        "grant_types": ["client_credentials"],
        "response_types": [],
        "redirect_uris": [],
        "application_type": "web",
        **client_metadata(
            spiffe_id, software_statement, endpoint=endpoint, jwks_uri=jwks_uri, jwks=jwks
        ),
    }
    if dpop:
        meta["dpop_bound_access_tokens"] = True
    from agent.oauth.tokens import TOKEN68, log, post_form

    log.debug(
        "client registration request",
        url=endpoint,
        spiffe_id=spiffe_id,
        jwks_uri=jwks_uri,
        dpop_bound_access_tokens=dpop,
    )

    status, body, _ = await post_form(
        http,
        endpoint,
        None,
        {},
        "registration",
        json_body=meta,
        tls=tls or authorization_server_tls(""),
    )
    if status not in (200, 201):
        err = body if isinstance(body, dict) else {}
        raise RegistrationError(
            f"registration at {endpoint} failed with HTTP {status}",
            error=err.get("error"),
            error_description=err.get("error_description"),
            status=status,
            url=endpoint,
        )
    if not isinstance(body, dict) or not isinstance(body.get("client_id"), str):
        raise MalformedResponse(f"registration at {endpoint} returned no client_id", url=endpoint)
    management = body.get("registration_access_token")
    if management is not None and not (isinstance(management, str) and TOKEN68.match(management)):
        # it goes in an Authorization field at deletion (RFC 7592 §2.3): refused now, and
        # never quoted, rather than in an error that would quote the field it made
        raise MalformedResponse(
            f"registration at {endpoint} returned a registration_access_token that is not "
            "a token68 (RFC 7591 §3.2.1, RFC 6750 §2.1): it could not be sent to manage the "
            "client",
            url=endpoint,
        )
    return RegisteredClient(
        spiffe_id=spiffe_id,
        issuer=issuer,
        client_id=body["client_id"],
        registration_client_uri=body.get("registration_client_uri"),
        registration_access_token=body.get("registration_access_token"),
    )


async def delete(
    http: httpx.AsyncClient, client: RegisteredClient, tls: ServerTls | None = None
) -> bool:
    """RFC 7592 delete; False when the server offers no management for this client. A
    certificate that does not verify (against tls) is AuthorizationServerCertificateRefused:
    the registration access token is not sent."""
    if not client.registration_client_uri or not client.registration_access_token:
        return False
    # the registration access token goes only where https (or loopback) protects it
    check_endpoint(client.registration_client_uri, "registration_client_uri")
    try:
        r = await http.delete(
            client.registration_client_uri,
            headers={"Authorization": f"Bearer {client.registration_access_token}"},
        )
    except httpx.HTTPError as e:
        refuse_certificate(e, client.registration_client_uri, tls or authorization_server_tls(""))
        raise unavailable(e, "client deletion", client.registration_client_uri) from None
    if r.status_code in (204, 200, 404):  # 404/401: already gone at the server
        return True
    if r.status_code == 401:
        return True
    raise RegistrationError(
        f"client deletion at {client.registration_client_uri} failed with HTTP {r.status_code}",
        status=r.status_code,
        url=client.registration_client_uri,
    )
