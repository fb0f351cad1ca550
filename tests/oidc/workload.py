"""An assertion-mode workload: its own OAuth client, holding no credential, speaking https
to the authorization server (through credless's interception: it trusts the CA file named
by SSL_CERT_FILE, the agent's <run_dir>/inject-ca.crt).

    python -m tests.oidc.workload MCP_URL ISSUER CLIENT_ID STEP...
steps:
  register     RFC 7591 registration at the metadata's registration_endpoint, with a
               placeholder software_statement and no keys; later steps use the client_id
               the server gave
  sdk          the official MCP SDK's PrivateKeyJWTOAuthProvider, its assertion a
               placeholder: list tools and call echo on the MCP server
  sdk-own-jwt  the same, its assertion a JWT the workload signed itself (a credential)
  bare-token   a client_credentials token request with no client authentication at all
  own-jwt-TOKEN, own-jwt-token/
               a client_credentials token request with a JWT the workload signed itself,
               posted to the token endpoint's path in capitals, or with a trailing slash
               (oidc-provider routes both to its token endpoint)
Prints one JSON line per step (never a token): {"step", "status", ...} or {"error", ...}.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import time
import uuid

import httpx2
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from mcp import Client
from mcp.client.auth.extensions.client_credentials import PrivateKeyJWTOAuthProvider
from mcp.client.streamable_http import streamable_http_client

from tests.mcp.token_store import Memory

PLACEHOLDER = "placeholder-assertion-credless-will-replace"


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def own_jwt(client_id: str, audience: str) -> str:
    """A JWT the workload signs with a key of its own: what credless must not let through."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": audience, "exp": now + 60}
    return jwt.encode({**claims, "iat": now, "jti": "workload-" + uuid.uuid4().hex}, pem, "ES256")


def http_client(**kw) -> httpx2.AsyncClient:
    verify = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    return httpx2.AsyncClient(verify=verify, trust_env=False, timeout=30, **kw)


async def register(issuer: str) -> dict:
    async with http_client() as http:
        meta = (await http.get(f"{issuer}/.well-known/oauth-authorization-server")).json()
        r = await http.post(
            meta["registration_endpoint"],
            json={
                "client_name": "assertion-mode workload",
                "grant_types": ["client_credentials"],
                "response_types": [],
                "redirect_uris": [],
                "token_endpoint_auth_method": "private_key_jwt",
                "software_statement": PLACEHOLDER,
            },
        )
    body = r.json()
    return {
        "step": "register",
        "status": r.status_code,
        "client_id": body.get("client_id"),
        "error": body.get("error"),
        "error_description": body.get("error_description"),
    }


async def sdk(url: str, issuer: str, client_id: str, own: bool) -> dict:
    async def assertion_provider(audience: str) -> str:
        return own_jwt(client_id, audience) if own else PLACEHOLDER

    auth = PrivateKeyJWTOAuthProvider(
        server_url=url,
        storage=Memory(),
        client_id=client_id,
        assertion_provider=assertion_provider,
        issuer=issuer,
    )
    async with (
        http_client(auth=auth) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        tools = await client.list_tools()
        result = await client.call_tool("echo", {"text": "assertion mode"})
    return {
        "step": "sdk",
        "status": 200,
        "tools": sorted(t.name for t in tools.tools),
        "text": "".join(getattr(c, "text", "") for c in result.content),
    }


async def bare_token(url: str, issuer: str) -> dict:
    async with http_client() as http:
        meta = (await http.get(f"{issuer}/.well-known/oauth-authorization-server")).json()
        r = await http.post(
            meta["token_endpoint"], data={"grant_type": "client_credentials", "resource": url}
        )
    body = r.json()
    return {
        "step": "bare-token",
        "status": r.status_code,
        "token_type": body.get("token_type"),
        "has_access_token": "access_token" in body,
        "error": body.get("error"),
    }


async def own_jwt_respelt(url: str, issuer: str, client_id: str, spelling: str) -> dict:
    async with http_client() as http:
        meta = (await http.get(f"{issuer}/.well-known/oauth-authorization-server")).json()
        endpoint = httpx2.URL(meta["token_endpoint"])
        path = endpoint.path.upper() if spelling == "TOKEN" else endpoint.path + "/"
        r = await http.post(
            str(endpoint.copy_with(path=path)),
            data={
                "grant_type": "client_credentials",
                "resource": url,
                "client_id": client_id,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": own_jwt(client_id, meta["token_endpoint"]),
            },
        )
    return {"step": f"own-jwt-{spelling}", "status": r.status_code, "error": r.json().get("error")}


async def main(url: str, issuer: str, client_id: str, steps: list[str]) -> int:
    for step in steps:
        try:
            if step == "register":
                out = await register(issuer)
                client_id = out["client_id"] or client_id
            elif step in ("sdk", "sdk-own-jwt"):
                out = await sdk(url, issuer, client_id, own=step == "sdk-own-jwt")
            elif step == "bare-token":
                out = await bare_token(url, issuer)
            elif step in ("own-jwt-TOKEN", "own-jwt-token/"):
                out = await own_jwt_respelt(url, issuer, client_id, step.split("-", 2)[2])
            else:
                raise ValueError(f"unknown step {step}")
        except Exception as e:  # noqa: BLE001 - the test reads what went wrong
            inner: BaseException = e
            while isinstance(inner, BaseExceptionGroup) and inner.exceptions:
                inner = inner.exceptions[0]
            out = {"step": step, "error": type(inner).__name__, "message": str(inner)[:500]}
        emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])))
