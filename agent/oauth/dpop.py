"""DPoP (RFC 9449): a proof-of-possession key per SPIFFE ID, held only in agent memory.

A stolen DPoP-bound token is useless without the key, and the key never leaves this process:
the workload never sees it, and it is not written anywhere. Each proof binds one request
(htm, htu), a time (iat), a unique jti, the server's nonce when it asked for one, and, for
resource requests, the token itself (ath).

Nonces (RFC 9449 §8, §9): a server may demand that proofs carry a nonce it chose, and give
a new one in any response's DPoP-Nonce field. The key remembers the newest nonce each origin
sent it and puts it in every later proof to that origin, so after the first challenge no
request need be refused again for want of one. A nonce must be the RFC's NQCHAR string; one
that is not (or is longer than MAX_NONCE) is not kept: a server must not make every later
proof carry whatever it likes.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from urllib.parse import urlsplit, urlunsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.bundle import jwk_thumbprint, public_key_to_jwk

# RFC 9449 §8.1: nonce = 1*NQCHAR, NQCHAR = %x21 / %x23-5B / %x5D-7E
_NONCE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
MAX_NONCE = 1024


def valid_nonce(value: str) -> bool:
    return len(value) <= MAX_NONCE and _NONCE.fullmatch(value) is not None


def origin(url: str) -> str:
    """The origin a nonce belongs to: scheme, host and port, lower case."""
    p = urlsplit(url)
    return f"{p.scheme.lower()}://{p.netloc.lower()}"


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

    def __init__(self, private: ec.EllipticCurvePrivateKey | None = None) -> None:
        """A new key, or (private) one handed over by the agent this one replaces."""
        self._key = private if private is not None else ec.generate_private_key(ec.SECP256R1())
        public = self._key.public_key()
        self._headers = {"typ": "dpop+jwt", "jwk": public_key_to_jwk(public)}
        self.jkt = jwk_thumbprint(public)  # RFC 7638: what the AS puts in cnf.jkt
        self._nonces: dict[str, str] = {}  # origin -> the newest nonce it sent

    def note_nonce(self, url: str, nonce: str) -> bool:
        """Remember nonce (a DPoP-Nonce value) for url's origin; False if it is not a valid
        nonce (then nothing changes)."""
        if not valid_nonce(nonce):
            return False
        self._nonces[origin(url)] = nonce
        return True

    def nonce_for(self, url: str) -> str | None:
        return self._nonces.get(origin(url))

    def __repr__(self) -> str:
        return f"DPoPKey(jkt={self.jkt!r})"

    @classmethod
    def from_der(cls, der: bytes) -> DPoPKey:
        """The key of private_der(); ValueError for anything but a P-256 key."""
        private = serialization.load_der_private_key(der, None)
        if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name != "secp256r1":
            raise ValueError("not a P-256 private key")
        return cls(private)

    def private_der(self) -> bytes:
        """The private key (PKCS#8 DER), only to hand it to the agent replacing this one over
        the root-only handover socket (agent/handover_tokens.py); never written anywhere."""
        return self._key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def proof(
        self,
        method: str,
        url: str,
        access_token: str | None = None,
        nonce: str | None = None,
        now: float | None = None,
        remembered: bool = True,
    ) -> str:
        """A proof for one request. nonce: the one to carry; None: the newest url's origin
        sent (unless `remembered` is False: the token client keeps the AS's nonces itself)."""
        if nonce is None and remembered:
            nonce = self._nonces.get(origin(url))
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
        self._nonces.clear()


def asks_for_nonce(challenges: dict[str, dict[str, str]]) -> bool:
    """Whether a parsed WWW-Authenticate (discovery.parse_www_authenticate) is the DPoP
    challenge `error="use_dpop_nonce"` (RFC 9449 §9)."""
    return challenges.get("dpop", {}).get("error") == "use_dpop_nonce"


def scheme_mismatch(challenges: dict[str, dict[str, str]], sent: str, server: str) -> str | None:
    """Why a 401 whose challenge names only schemes other than the one credless sent (`sent`:
    "Bearer" or "DPoP") was refused, and what to do; None when it names the scheme sent, or
    none at all (then the refusal is about the token itself)."""
    if not challenges or sent.lower() in challenges:
        return None
    named = ", ".join({"dpop": "DPoP", "bearer": "Bearer"}.get(s, s) for s in challenges)
    said = f"the MCP server {server} answered 401 naming the {named} scheme"
    if sent.lower() == "bearer" and "dpop" in challenges:
        return (
            f"{said} (WWW-Authenticate) and credless sent a Bearer token: the server wants "
            'DPoP-bound tokens. Set dpop = "always" on its [[servers]] entry, or have the '
            "server say so in its 401 challenge or its resource metadata "
            '(dpop_bound_access_tokens_required), which dpop = "auto" follows'
        )
    if sent.lower() == "dpop" and "bearer" in challenges:
        return (
            f"{said} only (WWW-Authenticate) and credless sent a DPoP-bound token: the "
            'server accepts Bearer tokens only. Set dpop = "never" on its [[servers]] entry '
            '(dpop = "auto" chooses DPoP only when the server asks for it)'
        )
    return (
        f"{said} (WWW-Authenticate) and credless sent a {sent} token; credless can send "
        "Bearer or DPoP tokens only"
    )
