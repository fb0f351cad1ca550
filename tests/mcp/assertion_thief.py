"""A workload that tries to get its own token past credless: it asks the agent's Workload
API (py-spiffe) for a JWT-SVID whose audience is an authorization server's token endpoint
and, given one, presents it there as its client assertion (RFC 7523), the request credless
would otherwise make for it, with its policy, DPoP binding and audit.

    python -m tests.mcp.assertion_thief SOCKET TOKEN_ENDPOINT SPIFFE_ID
Prints one JSON line: {"fetched": bool, "status": <the token endpoint's HTTP status>} or
{"fetched": false, "error": ..., "message": ...}. Never the JWT-SVID itself.
"""

from __future__ import annotations

import json
import sys

import httpx
from spiffe import WorkloadApiClient


def main(socket: str, token_endpoint: str, spiffe_id: str) -> dict:
    client = WorkloadApiClient(f"unix:{socket}", default_timeout=10)
    try:
        svid = client.fetch_jwt_svid({token_endpoint})
    except Exception as e:  # noqa: BLE001 - the refusal is the result
        return {"fetched": False, "error": type(e).__name__, "message": str(e)[:500]}
    finally:
        client.close()
    r = httpx.post(
        token_endpoint,
        data={
            "grant_type": "client_credentials",
            "client_id": spiffe_id,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": svid.token,
        },
        trust_env=False,
        timeout=10,
    )
    return {"fetched": True, "status": r.status_code}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])), flush=True)
