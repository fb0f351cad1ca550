"""Dynamic client registration (RFC 7591) with a SPIFFE software statement, and deletion
(RFC 7592) when no process with the identity remains.

The agent registers one client per (SPIFFE ID, authorization server): private_key_jwt with
the agent's JWT-SVID keys (`jwks_uri` = the bundle endpoint), client_credentials only, and a
`software_statement` that is a JWT-SVID for the registrant, proving to the server that this
registration comes from the holder of that identity's keys.

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

import httpx

from agent.fsutil import atomic_write
from agent.oauth.errors import MalformedResponse, RegistrationError, ServerUnavailable
from agent.oauth.trust import check_endpoint


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
) -> RegisteredClient:
    meta: dict[str, Any] = {
        "client_name": spiffe_id,
        "grant_types": ["client_credentials"],
        "response_types": [],
        "redirect_uris": [],
        "token_endpoint_auth_method": "private_key_jwt",
        "token_endpoint_auth_signing_alg": "ES256",
        "software_statement": software_statement,
        "spiffe_id": spiffe_id,  # draft-ietf-oauth-spiffe-client-auth metadata
        "application_type": "web",
    }
    if dpop:
        meta["dpop_bound_access_tokens"] = True
    if jwks_uri:
        meta["jwks_uri"] = jwks_uri
    else:
        meta["jwks"] = jwks
    from agent.oauth.tokens import post_form

    check_endpoint(endpoint, "registration endpoint")  # also checked on the metadata
    status, body, _ = await post_form(http, endpoint, None, {}, "registration", json_body=meta)
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
    return RegisteredClient(
        spiffe_id=spiffe_id,
        issuer=issuer,
        client_id=body["client_id"],
        registration_client_uri=body.get("registration_client_uri"),
        registration_access_token=body.get("registration_access_token"),
    )


async def delete(http: httpx.AsyncClient, client: RegisteredClient) -> bool:
    """RFC 7592 delete; False when the server offers no management for this client."""
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
        raise ServerUnavailable(
            f"client deletion at {client.registration_client_uri}: {e}",
            url=client.registration_client_uri,
        ) from None
    if r.status_code in (204, 200, 404):  # 404/401: already gone at the server
        return True
    if r.status_code == 401:
        return True
    raise RegistrationError(
        f"client deletion at {client.registration_client_uri} failed with HTTP {r.status_code}",
        status=r.status_code,
        url=client.registration_client_uri,
    )
