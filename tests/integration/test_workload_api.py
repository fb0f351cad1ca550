"""The SPIFFE Workload API with py-spiffe as the real client, from attested processes."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import ipaddress
import json
import os
import re
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
from agent.identity.workload_api import WorkloadApiServer
from agent.identity.workload_api_servicer import client_call
from agent.observe.logging import AuditLog
from tests.conftest import REPO
from tests.kernel import cgroup_child, enter_cgroup, run_json

pytestmark = pytest.mark.kernel

AUDIENCE = "https://as.example/token"
EVENT_ID = re.compile(r"\(audit event ([0-9a-f]{16})\)")
NOBODY, NOGROUP = 65534, 65534


@pytest.fixture
def stack(tmp_path):
    sock_dir = Path(tempfile.mkdtemp(prefix="credless-wl-"))
    os.chmod(sock_dir, 0o755)
    entries = tmp_path / "entries.toml"
    audit_out = io.StringIO()
    registry = CollectorRegistry()
    attestor = Attestor(AttestSection(), registry=registry)
    cfg = IdentitySection(entries_file=str(entries), x509_svid_ttl_seconds=3600)
    manager = IdentityManager(
        cfg, str(tmp_path / "state"), audit=AuditLog("n", audit_out), registry=registry
    )
    server = WorkloadApiServer(
        str(sock_dir / "agent.sock"), manager, attestor, audit=manager.audit, registry=registry
    )
    started = []
    with cgroup_child() as cg:
        entries.write_text(f"""
[[entry]]
id = "test-workload"
spiffe_id = "spiffe://example.org/workload/{{unix:user}}"
selectors = ["cgroup:path:/{cg.name}", "unix:uid:0"]
""")
        listeners_before = agent_tcp()[0]
        unix_before = agent_unix_listeners()
        try:
            for c in (attestor, manager, server):
                c.start()
                started.append(c)
            yield SimpleNamespace(
                cg=cg,
                sock=sock_dir / "agent.sock",
                manager=manager,
                server=server,
                audit=audit_out,
                entries=entries,
                cfg=cfg,
                listeners_before=listeners_before,
                unix_before=unix_before,
            )
        finally:
            for c in reversed(started):
                c.stop()
            subprocess.run(["rm", "-rf", str(sock_dir)])


def run_workload(stack, *args, cgroup=True, timeout=60, addr=None, as_nobody_in=None) -> list[dict]:
    """py-spiffe in a process of its own: in the entry's cgroup as root by default; with
    as_nobody_in, in that (unmanaged) cgroup as nobody. addr overrides the socket."""
    target = addr or str(stack.sock)
    if as_nobody_in is not None:
        cmd = [
            sys.executable,
            "-m",
            "tests.workloads.as_user",
            str(as_nobody_in),
            str(NOBODY),
            str(NOGROUP),
            "tests.workloads.spiffe_client",
            target,
            *args,
        ]
        preexec = None
    else:
        cmd = [sys.executable, "-m", "tests.workloads.spiffe_client", target, *args]
        preexec = enter_cgroup(stack.cg) if cgroup else None
    r = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec
    )
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert lines, r.stderr[-3000:]
    return lines


# ------------------------------------------------------------ what /proc/net/tcp shows
# Any local user can read /proc/net/tcp and /proc/net/tcp6; these helpers pick out the lines
# that belong to the agent (here: this test process, which runs the server), as an attacker
# would find them by trying each loopback connection in turn.


def _hex_addr(text: str) -> tuple[str, int]:
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    # the kernel prints each 32-bit word in host (little-endian) order
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


def _socket_inodes(pid: int | None = None) -> set[str]:
    fd_dir = f"/proc/{pid or os.getpid()}/fd"
    inodes = set()
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            link = os.readlink(f"{fd_dir}/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    return inodes


def agent_unix_listeners(pid: int | None = None) -> set[str]:
    """The unix sockets the process `pid` (default: this one) listens on, by path."""
    inodes = _socket_inodes(pid)
    with open("/proc/net/unix") as f:
        rows = [line.split() for line in list(f)[1:]]
    return {
        cols[7] if len(cols) > 7 else f"(unnamed {cols[6]})"
        for cols in rows
        if cols[6] in inodes and int(cols[3], 16) & 0x10000
    }  # __SO_ACCEPTCON


def agent_tcp(pid: int | None = None) -> tuple[set[tuple[str, int]], set[tuple[int, tuple]]]:
    """(TCP listeners, loopback connections to those listeners as (local port, listener))
    of the process `pid` (default: this one)."""
    inodes = _socket_inodes(pid)
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if cols[9] in inodes:
                    rows.append((_hex_addr(cols[1]), _hex_addr(cols[2]), cols[3]))
    listeners = {local for local, _remote, state in rows if state == "0A"}
    ports = {port for _addr, port in listeners}
    connections = {
        (local[1], remote)
        for local, remote, state in rows
        if state == "01"
        and remote[1] in ports
        and local[1] not in ports
        and ipaddress.ip_address(local[0]).is_loopback
    }
    return listeners, connections


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
    ttl = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=55) < ttl <= dt.timedelta(hours=1)
    leaf.verify_directly_issued_by(roots[0]) if len(chain) == 1 else chain[
        -1
    ].verify_directly_issued_by(roots[0])
    # JWT-SVID rules: validated by py-spiffe against the fetched bundle, and by the agent
    assert out["jwt_spiffe_id"] == out["spiffe_id"] == out["remote_validated"]
    assert out["jwt_audience"] == [AUDIENCE]
    claims = out["jwt_claims"]
    assert claims["sub"] == claims["iss"] == out["spiffe_id"] and claims["jti"]
    assert out["jwt_kids"] == sorted(stack.manager.source.keys.published())
    audit = [json.loads(ln) for ln in stack.audit.getvalue().splitlines()]
    issued = [a for a in audit if a["event"] == "svid.issued"]
    assert {a["type"] for a in issued} == {"x509", "jwt"}
    jwt_event = next(a for a in issued if a["type"] == "jwt")
    assert jwt_event["jti"] == claims["jti"] and jwt_event["spiffe_id"] == out["spiffe_id"]


def test_unregistered_process_gets_permission_denied_and_an_audit_event(stack):
    out = run_workload(stack, "fetch", AUDIENCE, cgroup=False)[0]  # not in the entry's cgroup
    assert out["error"] == "FetchX509SvidError"
    assert "no identity issued: no registration entry matches this process" in out["message"]
    assert "PERMISSION_DENIED" in out["message"]
    audit = [json.loads(ln) for ln in stack.audit.getvalue().splitlines()]
    denied = [a for a in audit if a["event"] == "identity.denied"]
    assert denied and denied[-1]["reason"] == "no registration entry matches"
    assert not [a for a in audit if a["event"] == "svid.issued"]
    # py-spiffe shows the status message, and it names the audit event of the denial
    event = denial_named_by(stack, out["message"])
    assert event["method"] == "FetchX509SVID" and event["code"] == "PERMISSION_DENIED"
    assert event["uid"] == 0 and event["spiffe_id"] is None
    assert event["exe"] == os.path.realpath(sys.executable) and event["pid"] > 0


def ask_for(stack, spiffe_id: str) -> dict:
    """py-spiffe in the entry's cgroup asking for a JWT-SVID of spiffe_id."""
    argv = [sys.executable, "-m", "tests.workloads.spiffe_jwt_for", str(stack.sock)]
    return run_json([*argv, AUDIENCE, spiffe_id], stack.cg)


def test_a_process_asking_for_another_spiffe_id_is_refused_and_audited(stack):
    own = "spiffe://example.org/workload/root"
    assert ask_for(stack, own).get("spiffe_id") == own  # its own: issued
    other = "spiffe://example.org/workload/payments"
    out = ask_for(stack, other)
    assert out.get("error") == "FetchJwtSvidError" and "spiffe_id" not in out, out
    assert f"no identity issued for {other} to this process: it is {own}" in out["message"]
    assert "PERMISSION_DENIED" in out["message"]
    event = denial_named_by(stack, out["message"])
    assert event["method"] == "FetchJWTSVID" and event["code"] == "PERMISSION_DENIED"
    assert event["requested_spiffe_id"] == other and event["spiffe_id"] == own
    assert (event["pid"], event["uid"], event["exe"]) == (out["pid"], out["uid"], out["exe"])
    assert event["audience"] == [AUDIENCE]
    # only the first process got a JWT-SVID, its own
    assert [a["spiffe_id"] for a in _svids_issued(stack) if a["type"] == "jwt"] == [own]


@contextlib.contextmanager
def watching(stack, updates: int):
    """py-spiffe watching its X.509 context from the entry's cgroup, until `updates`
    updates (one JSON line each); killed at the end if it still runs."""
    client = [sys.executable, "-m", "tests.workloads.spiffe_client", str(stack.sock)]
    proc = subprocess.Popen(
        [*client, "watch", str(updates)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=enter_cgroup(stack.cg),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def test_rotation_is_pushed_on_the_stream(stack):
    with watching(stack, 2) as proc:
        first = json.loads(proc.stdout.readline())
        assert "update" in first, first
        renewed = []
        while not renewed:  # force a rotation as half-life would: every cached SVID renews
            for _, svid in stack.manager.held_svids():
                object.__setattr__(svid, "not_after", svid.not_before)
            renewed = stack.manager.rotate_due()
        second = json.loads(proc.stdout.readline())
        assert second["update"] != first["update"]
        assert second["spiffe_id"] == first["spiffe_id"]
        assert proc.wait(30) == 0


def denial_named_by(stack, message: str) -> dict:
    """The one workload_api.denied event whose id ends the status message."""
    m = EVENT_ID.search(message)
    assert m, f"no audit event id in {message!r}"
    named = [
        a
        for a in (json.loads(ln) for ln in stack.audit.getvalue().splitlines())
        if a.get("event_id") == m.group(1)
    ]
    assert [a["event"] for a in named] == ["workload_api.denied"], named
    return named[0]


def test_calls_without_the_security_header_are_invalid(stack):
    with grpc.insecure_channel(f"unix:{stack.sock}") as ch, pytest.raises(grpc.RpcError) as err:
        client_call(ch, "FetchJWTSVID")(pb.JWTSVIDRequest(audience=["x"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(
        "security header missing from request: send metadata workload.spiffe.io: true (audit event "
    )
    denied = denial_named_by(stack, err.value.details())
    assert (denied["method"], denied["code"]) == ("FetchJWTSVID", "INVALID_ARGUMENT")
    # this very process asked: the kernel named it, though it was not attested as anyone
    assert (denied["pid"], denied["uid"]) == (os.getpid(), os.geteuid())


def test_an_unattested_caller_and_a_direct_backend_connection_are_refused(stack):
    md = [("workload.spiffe.io", "true")]
    with grpc.insecure_channel(f"unix:{stack.sock}") as ch:
        # this test process is not in the entry's cgroup, so it has no identity
        with pytest.raises(grpc.RpcError) as err:
            client_call(ch, "FetchJWTSVID")(
                pb.JWTSVIDRequest(audience=["x"]), timeout=10, metadata=md
            )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details().startswith(
        "no identity issued: no registration entry matches this process (audit event "
    )
    denied = denial_named_by(stack, err.value.details())
    assert (denied["pid"], denied["uid"], denied["spiffe_id"]) == (os.getpid(), 0, None)
    assert denied["exe"] == os.path.realpath(sys.executable)
    # whatever the agent listens on over TCP (nothing, since the server reads the caller's
    # own socket), a direct connection there is refused too
    for host, port in agent_tcp()[0] - stack.listeners_before:
        with grpc.insecure_channel(f"{host}:{port}") as ch:
            with pytest.raises(grpc.RpcError) as err:
                client_call(ch, "FetchJWTSVID")(
                    pb.JWTSVIDRequest(audience=["x"]), timeout=10, metadata=md
                )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_entries_reload_revokes_on_the_stream(stack):
    with watching(stack, 5) as proc:
        assert "update" in json.loads(proc.stdout.readline())
        stack.entries.write_text("")  # no entries any more
        assert stack.manager.reload_entries()
        err = json.loads(proc.stdout.readline())
        assert "PERMISSION_DENIED" in err["message"]
        audit = [json.loads(ln) for ln in stack.audit.getvalue().splitlines()]
        assert any(
            a["event"] == "workload_api.denied"
            and a["method"] == "FetchX509SVID"
            and "no registration entry matches" in a["reason"]
            for a in audit
        )


def _svids_issued(stack) -> list[dict]:
    return [
        a
        for a in (json.loads(ln) for ln in stack.audit.getvalue().splitlines())
        if a["event"] == "svid.issued"
    ]


def _denied(out: dict) -> bool:
    return (
        "spiffe_id" not in out
        and "error" in out
        and (
            "PERMISSION_DENIED" in out["message"]
            or "PermissionDenied" in out["message"]
            or "no identity issued" in out["message"]
        )
    )


@contextlib.contextmanager
def _relay(outsider, dest: tuple[str, int], bind: tuple[str, int] = ("127.0.0.1", 0)):
    """tests.workloads.loopback_relay as nobody in `outsider`, connecting to `dest` from
    `bind`: yields its unix socket (py-spiffe speaks to unix sockets only)."""
    d = Path(tempfile.mkdtemp(prefix="credless-relay-"))
    os.chown(d, NOBODY, NOGROUP)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.workloads.as_user",
            str(outsider),
            str(NOBODY),
            str(NOGROUP),
            "tests.workloads.loopback_relay",
            str(d / "relay.sock"),
            bind[0],
            str(bind[1]),
            dest[0],
            str(dest[1]),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = json.loads(proc.stdout.readline() or "{}")
        if not ready.get("ready"):
            raise AssertionError(
                f"the relay did not start (exit {proc.wait()}): {proc.stderr.read()[-2000:]}"
            )
        assert ready["uid"] == NOBODY
        yield d / "relay.sock"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        subprocess.run(["rm", "-rf", str(d)])


def test_a_relay_on_a_victims_port_from_another_loopback_address_gets_nothing(stack):
    """Issue 15 item 1: the victim holds a FetchX509SVID stream open; a process running as
    nobody in a cgroup no entry names finds the agent's loopback connections in
    /proc/net/tcp{,6}, relays a py-spiffe client through a socket bound to 127.0.0.2 and the
    victim's port, and also connects to every agent TCP listener directly. It gets no SVID;
    the victim keeps its stream and still gets its SVIDs; nothing is issued to the attacker."""
    with watching(stack, 1000) as victim:
        first = json.loads(victim.stdout.readline() or "{}")
        assert first.get("spiffe_id") == "spiffe://example.org/workload/root", first
        issued_before = len(_svids_issued(stack))
        listeners, connections = agent_tcp()
        listeners -= stack.listeners_before
        attempts = []
        with cgroup_child("credless-outsider") as outsider:
            for port, dest in sorted(connections):  # the relay from the victim's port
                with _relay(outsider, dest, bind=("127.0.0.2", port)) as relay_sock:
                    out = run_workload(
                        stack, "fetch", AUDIENCE, addr=str(relay_sock), as_nobody_in=outsider
                    )[0]
                attempts.append((f"relay from 127.0.0.2:{port} to {dest}", out))
            for dest in sorted(listeners):  # straight to a backend
                with _relay(outsider, dest) as relay_sock:
                    out = run_workload(
                        stack, "fetch", AUDIENCE, addr=str(relay_sock), as_nobody_in=outsider
                    )[0]
                attempts.append((f"direct to {dest}", out))
        leaked = [
            f"{what}: got {out.get('spiffe_id') or out.get('message', '')[:200]}"
            for what, out in attempts
            if not _denied(out)
        ]
        assert not leaked, f"a process running as nobody outside every managed cgroup: {leaked}"
        assert len(_svids_issued(stack)) == issued_before
        # the root of it: no backend at all; nothing reachable over the network, and no
        # socket but the public one, where the kernel names every caller
        assert not listeners, f"the Workload API listens on TCP: {sorted(listeners)}"
        assert agent_unix_listeners() - stack.unix_before == {str(stack.sock)}
        # the victim was not disturbed: its stream is open, and it still gets its SVIDs
        assert victim.poll() is None
        out = run_workload(stack, "fetch", AUDIENCE)[0]
        assert out.get("spiffe_id") == "spiffe://example.org/workload/root", out.get("error")


def test_a_process_running_as_nobody_outside_managed_cgroups_gets_nothing(stack):
    with cgroup_child("credless-outsider") as outsider:
        out = run_workload(stack, "fetch", AUDIENCE, as_nobody_in=outsider)[0]
    denied = _denied(out)
    assert denied, f"received {out.get('spiffe_id')}"
    assert not _svids_issued(stack)
    audit = [json.loads(ln) for ln in stack.audit.getvalue().splitlines()]
    assert any(a["event"] == "workload_api.denied" for a in audit)
