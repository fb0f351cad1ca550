"""The SPIFFE bundle endpoint (SPIFFE_Federation.md §5) on a configured address.

  GET /            the trust bundle: SPIFFE bundle format (JWKS with x509-svid and jwt-svid
                   keys, spiffe_sequence, spiffe_refresh_hint)
  GET /jwks.json   only the JWT-SVID keys as a plain RFC 7517 JWKS (use "sig", alg), for
                   an authorization server that verifies JWT-SVID client assertions through
                   a client's `jwks_uri` (OAuth libraries do not know SPIFFE's `use` values)

The documents are public keys only, but whoever can replace them in transit can make an
authorization server accept assertions credless never signed. So beyond the node it is
served over https with a configured certificate (bundle_endpoint.cert_file / key_file: the
`https_web` profile, a certificate for the name the authorization server uses), and
dynamic registration refuses to register a plain-http jwks_uri other than a loopback one
(agent/oauth/registration.py). The `https_spiffe` profile (the endpoint presenting an
X509-SVID) is not offered: authorization servers fetching a jwks_uri verify it against the
Web PKI, not a SPIFFE bundle. docs/remote-as.md says how to set this up.
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
    endpoint's /jwks.json, https when it has a certificate (None: the endpoint is off).
    The URL is the listen address: an authorization server on another host needs the name
    on the certificate instead, in oauth.jwks_uri."""
    if not section.enabled:
        return None
    scheme = "https" if section.cert_file else "http"
    return f"{scheme}://{section.listen}/jwks.json"


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
            cert_file=section.cert_file if section else "",
            key_file=section.key_file if section else "",
        )
