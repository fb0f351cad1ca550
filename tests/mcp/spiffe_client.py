"""The SPIFFE-native workload: the official MCP SDK's PrivateKeyJWTOAuthProvider whose
assertion_provider asks the agent's Workload API (py-spiffe) for a JWT-SVID with the
authorization server's issuer as audience. The workload holds no key and no secret.

    python -m tests.mcp.spiffe_client MCP_URL ISSUER SPIFFE_ID SOCKET
With SOCKET = "placeholder" the assertion is a fixed placeholder string instead (assertion
mode: credless replaces it on the wire with a real JWT-SVID).
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx2
from mcp import Client
from mcp.client.auth.extensions.client_credentials import PrivateKeyJWTOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from spiffe import WorkloadApiClient

from tests.mcp.token_store import Memory


async def main(url: str, issuer: str, spiffe_id: str, socket: str) -> int:
    placeholder = socket == "placeholder"
    workload_api = None if placeholder else WorkloadApiClient(f"unix:{socket}", default_timeout=10)
    fetched: list[str] = []

    async def assertion_provider(audience: str) -> str:
        fetched.append(audience)
        if placeholder:
            return "placeholder-assertion-credless-will-replace"
        svid = await asyncio.to_thread(workload_api.fetch_jwt_svid, {audience})
        return svid.token

    auth = PrivateKeyJWTOAuthProvider(
        server_url=url,
        storage=Memory(),
        client_id=spiffe_id,
        assertion_provider=assertion_provider,
        issuer=issuer,
    )
    http = httpx2.AsyncClient(auth=auth, trust_env=False, timeout=30)
    async with Client(streamable_http_client(url, http_client=http)) as client:
        tools = await client.list_tools()
        result = await client.call_tool("echo", {"text": "spiffe-native"})
    print(
        json.dumps(
            {
                "tools": sorted(t.name for t in tools.tools),
                "text": "".join(getattr(c, "text", "") for c in result.content),
                "assertion_audiences": fetched,
            }
        ),
        flush=True,
    )
    if workload_api is not None:
        workload_api.close()
    return 0


if __name__ == "__main__":
    try:
        rc = asyncio.run(main(*sys.argv[1:5]))
    except Exception as e:  # noqa: BLE001
        inner = e
        while isinstance(inner, BaseExceptionGroup) and inner.exceptions:
            inner = inner.exceptions[0]
        print(json.dumps({"error": type(inner).__name__, "message": str(inner)[:500]}))
        rc = 1
    sys.exit(rc)
