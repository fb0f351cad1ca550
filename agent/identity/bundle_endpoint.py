"""The SPIFFE bundle endpoint (SPIFFE_Federation.md §5), plain HTTP on a configured address.

  GET /            the trust bundle: SPIFFE bundle format (JWKS with x509-svid and jwt-svid
                   keys, spiffe_sequence, spiffe_refresh_hint)
  GET /jwks.json   only the JWT-SVID keys as a plain RFC 7517 JWKS (use "sig", alg), for
                   an authorization server that verifies JWT-SVID client assertions through
                   a client's `jwks_uri` (OAuth libraries do not know SPIFFE's `use` values)

The documents are public keys only. Serving them over https_web or https_spiffe belongs in
front of this endpoint (a reverse proxy) when it leaves the node.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.config import BundleEndpointSection
from agent.identity.bundle import public_key_to_jwk
from agent.observe.http import HttpEndpoint

JSON = "application/json"
_EC_ALG = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


def oauth_jwks(bundle: Any) -> bytes:
    """The JWT-SVID keys as an RFC 7517 JWKS for OAuth servers: use "sig" and an alg, which
    JOSE libraries match on (they skip keys whose `use` is SPIFFE's "jwt-svid")."""
    keys = []
    for kid, key in bundle.jwt_authorities.items():
        jwk = public_key_to_jwk(key)
        jwk.update(
            kid=kid,
            use="sig",
            alg=_EC_ALG.get(key.curve.name, "ES256")
            if isinstance(key, ec.EllipticCurvePublicKey)
            else "RS256",
        )
        keys.append(jwk)
    return json.dumps({"keys": keys}, separators=(",", ":")).encode()


def default_jwks_uri(section: BundleEndpointSection) -> str | None:
    """The jwks_uri registered for dynamic clients when oauth.jwks_uri is not set: this
    endpoint's /jwks.json (None: the endpoint is off)."""
    return f"http://{section.listen}/jwks.json" if section.enabled else None


class BundleEndpoint(HttpEndpoint):
    name = "bundle_endpoint"

    def __init__(
        self, manager: Any, host: str, port: int, section: BundleEndpointSection | None = None
    ):
        super().__init__(
            host,
            port,
            {
                "/": lambda: (200, manager.bundle().to_jwks_json().encode(), JSON),
                "/jwks.json": lambda: (200, oauth_jwks(manager.bundle()), JSON),
            },
            name="bundle-endpoint",
        )
