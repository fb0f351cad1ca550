"""DPoP (RFC 9449): a proof-of-possession key per SPIFFE ID, held only in agent memory.

A stolen DPoP-bound token is useless without the key, and the key never leaves this process:
the workload never sees it, and it is not written anywhere. Each proof binds one request
(htm, htu), a time (iat), a unique jti, the server's nonce when it asked for one, and, for
resource requests, the token itself (ath).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from urllib.parse import urlsplit, urlunsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.bundle import jwk_thumbprint, public_key_to_jwk


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def htu(url: str) -> str:
    """The DPoP htu of a request URL: scheme, host, port and path; no query or fragment."""
    p = urlsplit(url)
    return urlunsplit((p.scheme.lower(), p.netloc.lower(), p.path or "/", "", ""))


def ath(access_token: str) -> str:
    return _b64(hashlib.sha256(access_token.encode("ascii")).digest())


class DPoPKey:
    alg = "ES256"

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        public = self._key.public_key()
        self._headers = {"typ": "dpop+jwt", "jwk": public_key_to_jwk(public)}
        self.jkt = jwk_thumbprint(public)  # RFC 7638: what the AS puts in cnf.jkt

    def __repr__(self) -> str:
        return f"DPoPKey(jkt={self.jkt!r})"

    def proof(
        self,
        method: str,
        url: str,
        access_token: str | None = None,
        nonce: str | None = None,
        now: float | None = None,
    ) -> str:
        claims = {
            "jti": secrets.token_urlsafe(16),
            "htm": method.upper(),
            "htu": htu(url),
            "iat": int(time.time() if now is None else now),
        }
        if access_token is not None:
            claims["ath"] = ath(access_token)
        if nonce is not None:
            claims["nonce"] = nonce
        return jwt.encode(claims, self._key, algorithm=self.alg, headers=self._headers)

    def destroy(self) -> None:
        """Drop the private key (the object is unusable afterwards)."""
        self._key = None  # type: ignore[assignment]
