"""bench-identity: JWT-SVIDs and X509-SVIDs minted per second on one core.

Pinned to one CPU. The JWT-SVID figure is the full agent path (IdentityManager.jwt_svid:
entry TTL, key rotation check, claims, ES256 signature, metrics); beside it, as a baseline
from the same run, a bare PyJWT ES256 signature of the same claims: the floor no agent
overhead can go below. X509-SVIDs include a fresh P-256 key per SVID.

Prints: identity-bench: jwt_svid_per_s=X x509_svid_per_s=Y
"""

from __future__ import annotations

import os
import tempfile
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from agent.config import IdentitySection
from agent.identity.entries import Entry
from agent.identity.manager import Identity, IdentityManager
from agent.identity.spiffeid import SpiffeId
from agent.identity.x509svid import mint_x509_svid


def rate(fn, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(100):
            fn()
        n += 100
    return n / elapsed


def main() -> int:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    with tempfile.TemporaryDirectory() as state:
        mgr = IdentityManager(IdentitySection(entries_file=""), state, registry=CollectorRegistry())
        mgr.start()
        try:
            sid = SpiffeId.parse("spiffe://example.org/bench/workload")
            ident = Identity(sid, Entry("bench", str(sid), frozenset({"unix:uid:0"})))
            aud = ["https://as.example/"]
            jwt_rate = rate(lambda: mgr.jwt_svid(ident, aud), 3.0)
            x509_rate = rate(lambda: mint_x509_svid(mgr.source.ca, sid, ttl=3600), 3.0)
            key = ec.generate_private_key(ec.SECP256R1())
            claims = {
                "sub": str(sid),
                "aud": aud[0],
                "exp": int(time.time()) + 300,
                "iat": int(time.time()),
                "iss": str(sid),
                "jti": "x" * 22,
            }
            base = rate(
                lambda: jwt.encode(
                    claims, key, algorithm="ES256", headers={"kid": "k", "typ": "JWT"}
                ),
                3.0,
            )
        finally:
            mgr.stop()
    print(f"# baseline (same run, one core): pyjwt_es256_sign_per_s={base:.0f}")
    print(f"identity-bench: jwt_svid_per_s={jwt_rate:.0f} x509_svid_per_s={x509_rate:.0f}")
    return 0 if jwt_rate >= 5000 else 1


if __name__ == "__main__":
    raise SystemExit(main())
