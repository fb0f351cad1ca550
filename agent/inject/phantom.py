"""Phantom tokens: a placeholder a workload may hold, swapped for the real credential on the
wire, and a placeholder seen anywhere it was not issued for reported as misuse.

Some MCP clients (and plain HTTP API clients) refuse to run without a token of their own.
For a server in `mode = "phantom"`, the workload holds a placeholder instead: a JWT-SVID for
the audience `credless-phantom:<server name>`, which it fetches from the Workload API like any
JWT-SVID (py-spiffe's JwtSource, `FetchJWTSVID`). It names its holder (`sub`, the SPIFFE ID
the process was attested as when it asked) and its destination (the audience), is signed by
the agent's JWT authority, expires with the SVID TTL, and is worth nothing anywhere else: no
authorization server issued it, and no resource server accepts a credless audience.

On the wire (agent/inject/decide.py, the one decision) a request carrying a placeholder is
checked before anything else is done with its Authorization field:
- issued to the caller's own SPIFFE ID, for this server: the placeholder is removed and the
  real token injected, as in broker mode;
- issued to another identity, or for another server: refused (403), audited as
  `phantom.misuse` naming both identities, counted, and (`phantom_misuse = "revoke"`) the
  real token of the identity it was issued to is revoked at the authorization server (RFC
  7009) and dropped, so the next request of that identity obtains a new one;
- a placeholder that does not verify (expired, unknown key, bad signature): refused (401).
A request with no placeholder to a phantom server is served as in broker mode: the
placeholder is the client's convenience, never the proof; the proof is the attestation.

Why a JWT-SVID rather than an opaque random value in the agent's memory: it survives an
agent restart (the JWT keys are persisted), is checked with the code every JWT-SVID is
checked with (agent/identity/jwtsvid.py), and needs no new issuance path: the Workload API
already attests who asks.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter

from agent import jsondoc
from agent.identity.bundle import TrustBundle
from agent.identity.jwtsvid import JwtSvidError, validate_jwt_svid

AUDIENCE_PREFIX = "credless-phantom:"
_CACHE_SIZE = 4096  # verified placeholders remembered (each verification is a signature check)


def audience(server: str) -> str:
    """The audience a workload asks the Workload API for, to hold a placeholder for server."""
    return AUDIENCE_PREFIX + server


@dataclass(frozen=True, slots=True)
class Binding:
    """Who a placeholder was issued to, and for which server."""

    spiffe_id: str
    server: str
    jti: str | None
    exp: int


class PhantomInvalid(ValueError):
    """A placeholder (its audience says so) that does not verify."""


class _Bundles(Protocol):
    def bundle(self) -> TrustBundle: ...


def _claims_unverified(token: str) -> dict | None:
    """The payload of a compact JWS, or None; only to tell a placeholder from another token
    before paying for a signature check."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = jsondoc.loads_b64url(parts[1])
    except ValueError:
        return None
    return claims if isinstance(claims, dict) else None


def _audiences(claims: dict) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    return [a for a in aud if isinstance(a, str)] if isinstance(aud, list) else []


class PhantomVerifier:
    """binding(): the decision's port. misused(): the executor's, once per refused request."""

    def __init__(
        self,
        identity: _Bundles,
        *,
        clock: Callable[[], float] = time.time,
        registry: CollectorRegistry | None = None,
    ):
        self.identity = identity
        self.clock = clock
        self._verified: OrderedDict[str, Binding] = OrderedDict()
        self._lock = threading.Lock()
        self.on_misuse: list[Callable[[Binding, str], None]] = []
        self.m_misuse = Counter(
            "credless_phantom_misuse",
            "Placeholders refused because they came from a process that is not the identity "
            "they were issued to, or went to a server they were not issued for, by the server "
            "they went to",
            ["server"],
            registry=registry,
        )

    def binding(self, authorization: bytes) -> Binding | None:
        """The binding of the placeholder in an Authorization value; None when the value is
        not a placeholder (another token, another scheme). Raises PhantomInvalid for a
        placeholder that does not verify.

        The scheme ends at any whitespace (servers read `Bearer<TAB>token` as a bearer
        token), and each word after it is looked at: a stolen placeholder with text around
        it is still one, refused and audited as misuse, not passed over as another token."""
        words = authorization.split()
        if not words or words[0].lower() not in (b"bearer", b"dpop"):
            return None
        for word in words[1:]:
            found = self._binding_of(word.decode("latin-1"))
            if found is not None:
                return found
        return None

    def _binding_of(self, token: str) -> Binding | None:
        now = self.clock()
        with self._lock:
            known = self._verified.get(token)
        if known is not None and now < known.exp:
            return known
        claims = _claims_unverified(token)
        if claims is None:
            return None
        auds = [a for a in _audiences(claims) if a.startswith(AUDIENCE_PREFIX)]
        if not auds:
            return None
        bundle = self.identity.bundle()
        try:
            svid = validate_jwt_svid(token, auds[0], {bundle.trust_domain: bundle}, now=now)
        except JwtSvidError as e:
            raise PhantomInvalid(str(e)) from None
        found = Binding(
            str(svid.spiffe_id), auds[0][len(AUDIENCE_PREFIX) :], svid.jti, svid.expires_at
        )
        with self._lock:
            self._verified[token] = found
            while len(self._verified) > _CACHE_SIZE:
                self._verified.popitem(last=False)
        return found

    def misused(self, found: Binding, server: str) -> None:
        """A placeholder came to `server` from a process it was not issued to, or was not
        issued for `server`, and the decision refused it: count it, run the responses."""
        self.m_misuse.labels(server).inc()
        for fn in self.on_misuse:
            fn(found, server)
