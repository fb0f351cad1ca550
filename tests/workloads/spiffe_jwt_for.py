"""A py-spiffe workload asking the Workload API for a JWT-SVID of a given SPIFFE ID (the
`spiffe_id` of JWTSVIDRequest, py-spiffe's `subject`), which may not be its own.

    python -m tests.workloads.spiffe_jwt_for SOCKET AUDIENCE SPIFFE_ID

Prints one JSON object: its pid and uid (as the agent should record them) and either the
SPIFFE ID it got or the error py-spiffe raised, with the gRPC status details in it.
"""

from __future__ import annotations

import json
import os
import sys

from spiffe import SpiffeId, WorkloadApiClient


def main() -> int:
    socket, audience, spiffe_id = sys.argv[1:4]
    out: dict = {"pid": os.getpid(), "uid": os.geteuid(), "exe": os.path.realpath(sys.executable)}
    try:
        with WorkloadApiClient(f"unix:{socket}", default_timeout=10) as client:
            svid = client.fetch_jwt_svid(audience={audience}, subject=SpiffeId(spiffe_id))
            out["spiffe_id"] = str(svid.spiffe_id)
    except Exception as e:  # noqa: BLE001 - the test reads the error
        out.update(error=type(e).__name__, message=str(e))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
