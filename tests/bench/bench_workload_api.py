"""bench-workload-api: the Workload API as a workload sees it, over its unix socket.

The agent side (real attestor, identity manager and Workload API server) runs in this
process; the caller is a separate process (a plain grpcio client, as py-spiffe uses) so the
two do not share an interpreter lock. The caller is attested as root (entry: unix:uid:0).

Measures, with the caller's clock:
- jwt_per_s: FetchJWTSVID calls per second, sequential on one connection (each one attests
  the caller again and signs a JWT-SVID: the JWT signature is most of it);
- connect_x509_ms: p50 / p99 of "new connection, first FetchX509SVID message received";
- streams: how many concurrent FetchX509SVID streams from one process get their first
  message within the run (the agent keeps each open).

Prints one line:
workload-api-bench: jwt_per_s=X connect_x509_p50_ms=Y connect_x509_p99_ms=Z streams_ok=N/M
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry

from agent.attest.attestor import Attestor
from agent.config import AttestSection, IdentitySection
from agent.identity.manager import IdentityManager
from agent.identity.workload_api import WorkloadApiServer

REPO = Path(__file__).resolve().parents[2]

CLIENT = r"""
import json, sys, time, grpc
from agent.identity.proto import workload_pb2 as pb
from agent.identity.workload_api_servicer import client_call
sock, calls, connects, streams = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
md = [("workload.spiffe.io", "true")]
out = {}
with grpc.insecure_channel(f"unix:{sock}") as ch:
    fetch = client_call(ch, "FetchJWTSVID")
    fetch(pb.JWTSVIDRequest(audience=["https://as.example/"]), metadata=md, timeout=10)
    t0 = time.perf_counter()
    for _ in range(calls):
        fetch(pb.JWTSVIDRequest(audience=["https://as.example/"]), metadata=md, timeout=10)
    out["jwt_per_s"] = calls / (time.perf_counter() - t0)
lat = []
for _ in range(connects):
    t0 = time.perf_counter()
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        it = client_call(ch, "FetchX509SVID")(pb.X509SVIDRequest(), metadata=md, timeout=10)
        next(it)
        lat.append((time.perf_counter() - t0) * 1000)
        it.cancel()
lat.sort()
out["connect_x509_p50_ms"] = lat[len(lat) // 2]
out["connect_x509_p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
chans, its, ok = [], [], 0
for _ in range(streams):
    ch = grpc.insecure_channel(f"unix:{sock}")
    chans.append(ch)
    its.append(client_call(ch, "FetchX509SVID")(pb.X509SVIDRequest(), metadata=md, timeout=30))
for it in its:
    try:
        next(it)
        ok += 1
    except grpc.RpcError:
        pass
for it in its:
    it.cancel()
for ch in chans:
    ch.close()
out["streams_ok"] = ok
print(json.dumps(out), flush=True)
"""


def main() -> int:
    calls, connects, streams = 2000, 200, 64
    with tempfile.TemporaryDirectory() as tmp:
        entries = Path(tmp) / "entries.toml"
        entries.write_text(
            '[[entry]]\nid = "bench"\n'
            'spiffe_id = "spiffe://example.org/bench"\n'
            'selectors = ["unix:uid:0"]\n'
        )
        registry = CollectorRegistry()
        attestor = Attestor(AttestSection(), registry=registry)
        manager = IdentityManager(
            IdentitySection(entries_file=str(entries)), str(Path(tmp) / "state"), registry=registry
        )
        server = WorkloadApiServer(
            str(Path(tmp) / "agent.sock"), manager, attestor, registry=registry
        )
        started = []
        try:
            for c in (attestor, manager, server):
                c.start()
                started.append(c)
            r = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CLIENT,
                    str(server.socket_path),
                    str(calls),
                    str(connects),
                    str(streams),
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=600,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        finally:
            for c in reversed(started):
                c.stop()
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return 1
    out = json.loads(r.stdout.splitlines()[-1])
    print(
        f"workload-api-bench: jwt_per_s={out['jwt_per_s']:.0f} "
        f"connect_x509_p50_ms={out['connect_x509_p50_ms']:.2f} "
        f"connect_x509_p99_ms={out['connect_x509_p99_ms']:.2f} "
        f"streams_ok={out['streams_ok']}/{streams}"
    )
    return 0 if out["streams_ok"] == streams else 1


if __name__ == "__main__":
    raise SystemExit(main())
