"""The identity manager without the kernel: decisions, reloads, SVID cache, bundle updates."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from agent.config import IdentitySection
from agent.identity.manager import IdentityManager
from agent.observe.logging import AuditLog


def attestation(selectors, pid=42):
    return SimpleNamespace(
        selectors=frozenset(selectors), tgid=pid, start_ns=1, exe="/bin/x", cgroup_path="/t"
    )


@pytest.fixture
def mgr(tmp_path):
    entries = tmp_path / "entries.toml"
    entries.write_text(
        '[[entry]]\nid = "a"\nspiffe_id = "spiffe://example.org/a"\nselectors = ["unix:uid:0"]\n'
    )
    out = io.StringIO()
    m = IdentityManager(
        IdentitySection(entries_file=str(entries)),
        str(tmp_path / "state"),
        audit=AuditLog("node", out),
        registry=CollectorRegistry(),
    )
    m.start()
    m.entries_path, m.audit_out = entries, out
    yield m
    m.stop()


def test_decisions_fail_closed_with_audit(mgr):
    assert mgr.resolve(None) is None
    assert mgr.resolve(attestation({"unix:uid:1000"}, pid=7)) is None
    events = [json.loads(ln) for ln in mgr.audit_out.getvalue().splitlines()]
    assert events[-1]["event"] == "identity.denied" and events[-1]["pid"] == 7
    assert events[-1]["reason"] == "no registration entry matches"
    assert str(mgr.resolve(attestation({"unix:uid:0"})).spiffe_id) == "spiffe://example.org/a"


def test_invalid_reload_keeps_the_loaded_entries(mgr):
    mgr.entries_path.write_text('[[entry]]\nid = "a"\nspiffe_id = "nope"\nselectors = ["x:y:z"]\n')
    assert mgr.reload_entries() is False
    assert str(mgr.resolve(attestation({"unix:uid:0"})).spiffe_id) == "spiffe://example.org/a"


def test_valid_reload_changes_decisions_and_notifies(mgr):
    gen = mgr.generation
    mgr.entries_path.write_text(
        '[[entry]]\nid = "b"\nspiffe_id = "spiffe://example.org/b"\nselectors = ["unix:uid:0"]\n'
    )
    assert mgr.reload_entries() is True
    assert mgr.generation > gen
    assert str(mgr.resolve(attestation({"unix:uid:0"})).spiffe_id) == "spiffe://example.org/b"


def test_x509_svid_is_cached_until_half_life_then_rotated(mgr):
    ident = mgr.resolve(attestation({"unix:uid:0"}))
    first = mgr.x509_svid(ident)
    assert mgr.x509_svid(ident) is first
    assert mgr.rotate_due() == []
    object.__setattr__(first, "not_after", first.not_before)  # past half-life
    assert mgr.rotate_due() == ["spiffe://example.org/a"]
    second = mgr.x509_svid(ident)
    assert second is not first and second.spiffe_id == first.spiffe_id
    events = [json.loads(ln)["event"] for ln in mgr.audit_out.getvalue().splitlines()]
    assert events.count("svid.rotated") == 1


def test_bundle_follows_jwt_key_rotation(mgr):
    before = mgr.bundle()
    old_kid = mgr.keys.current().kid
    mgr.keys.rotate()
    after = mgr.bundle()
    assert after.sequence == before.sequence + 1
    assert old_kid in after.jwt_authorities and mgr.keys.current().kid in after.jwt_authorities
    assert list(after.x509_authorities) == list(mgr.ca.roots)


def test_ca_survives_restart(tmp_path, mgr):
    again = IdentityManager(mgr.cfg, str(mgr.state_dir), registry=CollectorRegistry())
    again.start()
    try:
        assert again.ca.certificate == mgr.ca.certificate
    finally:
        again.stop()


def test_identity_ends_with_its_last_process(mgr):
    ended = []
    mgr.on_identity_ended.append(ended.append)
    ident = mgr.resolve(attestation({"unix:uid:0"}))
    a = SimpleNamespace(tgid=10, exec_ns=100)
    b = SimpleNamespace(tgid=11, exec_ns=200)
    mgr.note_use(ident, a)
    mgr.note_use(ident, b)
    ev = lambda t, tgid, exec_ns: SimpleNamespace(type=t, tgid=tgid, exec_ns=exec_ns)  # noqa
    mgr.process_event(ev(1, 10, 100))  # an exec event for the image itself: no end
    mgr.process_event(ev(3, 10, 100))  # first process exits
    assert ended == [] and mgr.live_identities() == {"spiffe://example.org/a": 1}
    mgr.process_event(ev(1, 11, 250))  # the second execs another program
    assert ended == ["spiffe://example.org/a"] and mgr.live_identities() == {}
    mgr.process_event(ev(3, 11, 250))  # its later exit changes nothing
    assert ended == ["spiffe://example.org/a"]
