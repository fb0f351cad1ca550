"""identity.source = "spire": SVIDs for attested processes come from a SPIRE agent's
Delegated Identity API (here the fake built from its public API definition), and reach a
py-spiffe workload through credless's Workload API."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from agent.attest.attestor import Attestor
from agent.config import AttestSection, IdentitySection
from agent.identity.manager import IdentityManager
from agent.identity.workload_api import WorkloadApiServer
from tests.fakes.spire_agent import FakeSpireAgent
from tests.helpers import run_json_program
from tests.kernel import cgroup_child, enter_cgroup

pytestmark = pytest.mark.kernel


def test_svids_from_spire_for_a_credless_attested_process(tmp_path):
    sock_dir = Path(tempfile.mkdtemp(prefix="credless-spire-"))
    os.chmod(sock_dir, 0o755)
    started = []
    try:
        with FakeSpireAgent() as spire, cgroup_child() as cg:
            spire.register([f"cgroup:path:/{cg.name}"], "spiffe://example.org/spire/workload")
            registry = CollectorRegistry()
            attestor = Attestor(AttestSection(), registry=registry)
            manager = IdentityManager(
                IdentitySection(
                    source="spire", entries_file="", spire_admin_socket=spire.socket_path
                ),
                str(tmp_path / "state"),
                registry=registry,
            )
            server = WorkloadApiServer(
                str(sock_dir / "agent.sock"), manager, attestor, registry=registry
            )
            for c in (attestor, manager, server):
                c.start()
                started.append(c)

            def workload(preexec):
                return run_json_program(
                    "tests.workloads.spiffe_client",
                    str(sock_dir / "agent.sock"),
                    "fetch",
                    "https://as.example",
                    timeout=60,
                    preexec_fn=preexec,
                )

            out = workload(enter_cgroup(cg))
            assert "error" not in out, out
            assert out["spiffe_id"] == "spiffe://example.org/spire/workload"
            assert out["jwt_spiffe_id"] == out["spiffe_id"] == out["remote_validated"]
            # the SVID chains to SPIRE's CA, not to any CA of credless's
            from cryptography import x509

            leaf = x509.load_pem_x509_certificate(out["chain_pem"][0].encode())
            assert leaf.issuer == spire.ca.certificate.subject
            assert not (tmp_path / "state" / "ca").exists()
            assert manager.ready() == (True, f"SVIDs from SPIRE at {spire.socket_path}")
            assert manager.held_svids() == []  # SPIRE holds and renews them
            issued = registry.get_sample_value("credless_svids_issued_total", {"type": "x509"})
            assert issued is not None and issued >= 1
            # SPIRE was asked with the selectors credless attested, never with a pid
            assert all(c.pid == 0 for c in spire.calls if hasattr(c, "pid"))
            denied = workload(None)  # outside the cgroup: SPIRE has no entry for it
            assert denied["error"] == "FetchX509SvidError"
    finally:
        for c in reversed(started):
            c.stop()
        subprocess.run(["rm", "-rf", str(sock_dir)])
