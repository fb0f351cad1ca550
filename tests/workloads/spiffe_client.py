"""A workload that uses py-spiffe, the real SPIFFE client, against the agent's Workload API.

Runs as its own process (the agent attests it), prints one JSON object per line. Holds no
key or token of its own; whatever it prints about SVIDs is public (certificates, IDs).
    python -m tests.workloads.spiffe_client SOCKET fetch AUDIENCE
    python -m tests.workloads.spiffe_client SOCKET watch N
    python -m tests.workloads.spiffe_client SOCKET placeholder AUDIENCE
"""

from __future__ import annotations

import json
import sys
import threading

from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import WorkloadApiClient


def emit(obj) -> None:
    print(json.dumps(obj), flush=True)


def main() -> int:
    socket, cmd = sys.argv[1], sys.argv[2]
    try:
        client = WorkloadApiClient(f"unix:{socket}", default_timeout=10)
    except Exception as e:  # noqa: BLE001
        emit({"error": type(e).__name__, "message": str(e)})
        return 1
    try:
        if cmd == "fetch":
            audience = sys.argv[3]
            svid = client.fetch_x509_svid()
            bundles = client.fetch_x509_bundles()
            jwt_svid = client.fetch_jwt_svid(audience={audience})
            jwt_bundles = client.fetch_jwt_bundles()
            bundle = jwt_bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
            # py-spiffe validates signature, aud and exp against the fetched JWT bundle
            from spiffe import JwtSvid

            validated = JwtSvid.parse_and_validate(jwt_svid.token, bundle, {audience})
            remote = client.validate_jwt_svid(jwt_svid.token, audience)
            x509_bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
            emit(
                {
                    "spiffe_id": str(svid.spiffe_id),
                    "chain_pem": [c.public_bytes(Encoding.PEM).decode() for c in svid.cert_chain],
                    "bundle_pem": [
                        c.public_bytes(Encoding.PEM).decode() for c in x509_bundle.x509_authorities
                    ],
                    "jwt_spiffe_id": str(validated.spiffe_id),
                    "jwt_audience": sorted(validated.audience),
                    "jwt_expiry": validated.expiry,
                    "jwt_claims": {
                        k: v
                        for k, v in validated._claims.items()
                        if k in ("sub", "iss", "aud", "jti")
                    },
                    "remote_validated": str(remote.spiffe_id),
                    "jwt_kids": sorted(bundle.jwt_authorities.keys()),
                }
            )
        elif cmd == "placeholder":
            # a phantom placeholder (agent/inject/phantom.py) is a JWT-SVID for a credless
            # audience: worth nothing but to credless, so the test may see it
            emit({"token": client.fetch_jwt_svid(audience={sys.argv[3]}).token})
        elif cmd == "watch":
            want = int(sys.argv[3])
            seen: list[str] = []
            done = threading.Event()

            def on_success(ctx):
                serial = format(ctx.default_svid.leaf.serial_number, "x")
                if serial not in seen:
                    seen.append(serial)
                    emit({"update": serial, "spiffe_id": str(ctx.default_svid.spiffe_id)})
                if len(seen) >= want:
                    done.set()

            def on_error(e):
                emit({"error": type(e).__name__, "message": str(e)})
                done.set()

            handle = client.stream_x509_contexts(on_success, on_error, retry_connect=False)
            done.wait(60)
            handle.cancel()
        return 0
    except Exception as e:  # noqa: BLE001 - the test reads the error
        emit({"error": type(e).__name__, "message": str(e)})
        return 1
    finally:
        client.close()


if __name__ == "__main__":
    raise SystemExit(main())
