"""The SPIFFE Workload API with py-spiffe as the real client, from attested processes."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from prometheus_client import CollectorRegistry

from agent.attest.attestor import Attestor
from agent.config import AttestSection, IdentitySection
from agent.identity.manager import IdentityManager
from agent.identity.proto import workload_pb2 as pb
from agent.identity.workload_api import WorkloadApiServer, client_call
from agent.observe.logging import AuditLog
from tests.conftest import REPO
from tests.kernel import cgroup_child, enter_cgroup

pytestmark = pytest.mark.kernel

AUDIENCE = "https://as.example/token"


@pytest.fixture
def stack(tmp_path):
    sock_dir = Path(tempfile.mkdtemp(prefix="credless-wl-"))
    os.chmod(sock_dir, 0o755)
    entries = tmp_path / "entries.toml"
    audit_out = io.StringIO()
    registry = CollectorRegistry()
    attestor = Attestor(AttestSection(), registry=registry)
    cfg = IdentitySection(entries_file=str(entries), x509_svid_ttl_seconds=3600)
    manager = IdentityManager(cfg, str(tmp_path / "state"), audit=AuditLog("n", audit_out),
                              registry=registry)
    server = WorkloadApiServer(str(sock_dir / "agent.sock"), manager, attestor,
                               audit=manager.audit, registry=registry)
    started = []
    with cgroup_child() as cg:
        entries.write_text(f'''
[[entry]]
id = "test-workload"
spiffe_id = "spiffe://example.org/workload/{{unix:user}}"
selectors = ["cgroup:path:/{cg.name}", "unix:uid:0"]
''')
        try:
            for c in (attestor, manager, server):
                c.start()
                started.append(c)
            yield SimpleNamespace(cg=cg, sock=sock_dir / "agent.sock", manager=manager, server=server,
                                  audit=audit_out, entries=entries, cfg=cfg)
        finally:
            for c in reversed(started):
                c.stop()
            subprocess.run(["rm", "-rf", str(sock_dir)])


def run_workload(stack, *args, cgroup=True, timeout=60) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "tests.workloads.spiffe_client", str(stack.sock),
                        *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       preexec_fn=enter_cgroup(stack.cg) if cgroup else None)
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert lines, r.stderr[-3000:]
    return lines


def test_py_spiffe_fetches_and_validates_svids(stack):
    out = run_workload(stack, "fetch", AUDIENCE)[0]
    assert "error" not in out, out
    assert out["spiffe_id"] == "spiffe://example.org/workload/root"
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in out["chain_pem"]]
    roots = [x509.load_pem_x509_certificate(p.encode()) for p in out["bundle_pem"]]
    leaf = chain[0]
    # X509-SVID rules (X509-SVID.md): one URI SAN = the ID, leaf key usage, not a CA, TTL
    san = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [out["spiffe_id"]]
    ku = leaf.extensions.get_extension_for_oid(ExtensionOID.KEY_USAGE)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    bc = leaf.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS)
    assert bc.critical and bc.value.ca is False
    eku = leaf.extensions.get_extension_for_oid(ExtensionOID.EXTENDED_KEY_USAGE).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
    ttl = leaf.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(minutes=55) < ttl <= dt.timedelta(hours=1)
    leaf.verify_directly_issued_by(roots[0]) if len(chain) == 1 else \
        chain[-1].verify_directly_issued_by(roots[0])
    # JWT-SVID rules: validated by py-spiffe against the fetched bundle, and by the agent
    assert out["jwt_spiffe_id"] == out["spiffe_id"] == out["remote_validated"]
    assert out["jwt_audience"] == [AUDIENCE]
    claims = out["jwt_claims"]
    assert claims["sub"] == claims["iss"] == out["spiffe_id"] and claims["jti"]
    assert out["jwt_kids"] == sorted(stack.manager.keys.published())
    audit = [json.loads(ln) for ln in stack.audit.getvalue().splitlines()]
    issued = [a for a in audit if a["event"] == "svid.issued"]
    assert {a["type"] for a in issued} == {"x509", "jwt"}
    jwt_event = next(a for a in issued if a["type"] == "jwt")
    assert jwt_event["jti"] == claims["jti"] and jwt_event["spiffe_id"] == out["spiffe_id"]


def test_unregistered_process_gets_permission_denied_and_an_audit_event(stack):
    out = run_workload(stack, "fetch", AUDIENCE, cgroup=False)[0]   # not in the entry's cgroup
    assert out["error"] == "FetchX509SvidError"
    assert "PERMISSION_DENIED" in out["message"] or "PermissionDenied" in out["message"] \
        or "no identity issued" in out["message"]
    audit = [json.loads(ln) for ln in stack.audit.getvalue().splitlines()]
    denied = [a for a in audit if a["event"] == "identity.denied"]
    assert denied and denied[-1]["reason"] == "no registration entry matches"
    assert not [a for a in audit if a["event"] == "svid.issued"]


def test_rotation_is_pushed_on_the_stream(stack):
    proc = subprocess.Popen([sys.executable, "-m", "tests.workloads.spiffe_client",
                             str(stack.sock), "watch", "2"], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, preexec_fn=enter_cgroup(stack.cg))
    try:
        first = json.loads(proc.stdout.readline())
        assert "update" in first, first
        renewed = []
        while not renewed:  # force a rotation as half-life would: every cached SVID renews
            for svid in list(stack.manager._svids.values()):
                object.__setattr__(svid, "not_after", svid.not_before)
            renewed = stack.manager.rotate_due()
        second = json.loads(proc.stdout.readline())
        assert second["update"] != first["update"]
        assert second["spiffe_id"] == first["spiffe_id"]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_calls_without_the_security_header_are_invalid(stack):
    with grpc.insecure_channel(f"unix:{stack.sock}") as ch:
        with pytest.raises(grpc.RpcError) as err:
            client_call(ch, "FetchJWTSVID")(pb.JWTSVIDRequest(audience=["x"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == ("security header missing from request: send metadata "
                                   "workload.spiffe.io: true")


def test_an_unattested_caller_and_a_direct_backend_connection_are_refused(stack):
    md = [("workload.spiffe.io", "true")]
    with grpc.insecure_channel(f"unix:{stack.sock}") as ch:
        # this test process is not in the entry's cgroup, so it has no identity
        with pytest.raises(grpc.RpcError) as err:
            client_call(ch, "FetchJWTSVID")(
                pb.JWTSVIDRequest(audience=["x"]), timeout=10, metadata=md)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == ("no identity issued: no registration entry matches this "
                                   "process")
    with grpc.insecure_channel(f"127.0.0.1:{stack.server._backend_port}") as ch:
        with pytest.raises(grpc.RpcError) as err:
            client_call(ch, "FetchJWTSVID")(
                pb.JWTSVIDRequest(audience=["x"]), timeout=10, metadata=md)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == f"connect through the Workload API socket {stack.sock}"


def test_entries_reload_revokes_on_the_stream(stack):
    proc = subprocess.Popen([sys.executable, "-m", "tests.workloads.spiffe_client",
                             str(stack.sock), "watch", "5"], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, preexec_fn=enter_cgroup(stack.cg))
    try:
        assert "update" in json.loads(proc.stdout.readline())
        stack.entries.write_text("")      # no entries any more
        assert stack.manager.reload_entries()
        err = json.loads(proc.stdout.readline())
        assert "PERMISSION_DENIED" in err["message"]
        audit = [json.loads(ln) for ln in stack.audit.getvalue().splitlines()]
        assert any(a["event"] == "workload_api.denied" and a["method"] == "FetchX509SVID"
                   and "no registration entry matches" in a["reason"] for a in audit)
    finally:
        proc.kill()
        proc.wait()
