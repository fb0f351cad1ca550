"""The SPIFFE bundle endpoint (SPIFFE_Federation.md §5), plain HTTP on a configured address.

  GET /            the trust bundle: SPIFFE bundle format (JWKS with x509-svid and jwt-svid
                   keys, spiffe_sequence, spiffe_refresh_hint)
  GET /jwks.json   only the JWT-SVID keys as a plain RFC 7517 JWKS, for an authorization
                   server that verifies JWT-SVID client assertions through a client's
                   `jwks_uri` (OAuth libraries do not know the SPIFFE `use` values)

The documents are public keys only. Serving them over https_web or https_spiffe belongs in
front of this endpoint (a reverse proxy) when it leaves the node.
"""

from __future__ import annotations

from typing import Any

from agent.observe.http import HttpEndpoint

JSON = "application/json"


class BundleEndpoint(HttpEndpoint):
    name = "bundle_endpoint"

    def __init__(self, manager: Any, host: str, port: int):
        super().__init__(host, port, {
            "/": lambda: (200, manager.bundle().to_jwks_json().encode(), JSON),
            "/jwks.json": lambda: (200, manager.bundle().jwt_jwks_json().encode(), JSON),
        }, name="bundle-endpoint")
