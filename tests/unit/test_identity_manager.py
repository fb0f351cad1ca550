"""The identity manager without the kernel: decisions, reloads, SVID cache, bundle updates."""

from __future__ import annotations

import datetime as dt
import io
import json
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from agent.config import IdentitySection
from agent.identity.bundle import TrustBundle
from agent.identity.ca import SigningCA
from agent.identity.embedded_source import EmbeddedSource
from agent.identity.entries import Entry, Match
from agent.identity.jwt_rotation import JwtSigningKeys
from agent.identity.jwtsvid import mint_jwt_svid
from agent.identity.manager import IdentityManager, source_from_config
from agent.identity.sources import SourceEvents
from agent.identity.spiffeid import SpiffeId, TrustDomain
from agent.identity.spire_source import SpireSource
from agent.identity.x509svid import mint_x509_svid
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
    cfg, state = IdentitySection(entries_file=str(entries)), str(tmp_path / "state")
    m = IdentityManager(cfg, state, audit=AuditLog("node", out), registry=CollectorRegistry())
    m.start()
    m.entries_path, m.audit_out, m.cfg, m.state_dir = entries, out, cfg, state
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
    keys = mgr.source.keys
    old_kid = keys.current().kid
    keys.rotate()
    after = mgr.bundle()
    assert after.sequence == before.sequence + 1
    assert old_kid in after.jwt_authorities and keys.current().kid in after.jwt_authorities
    assert list(after.x509_authorities) == list(mgr.source.ca.roots)


def test_ca_survives_restart(tmp_path, mgr):
    again = IdentityManager(mgr.cfg, mgr.state_dir, registry=CollectorRegistry())
    again.start()
    try:
        assert again.source.ca.certificate == mgr.source.ca.certificate
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


def test_held_svids_is_a_snapshot_of_what_the_source_holds(mgr):
    assert mgr.held_svids() == []
    svid = mgr.x509_svid(mgr.resolve(attestation({"unix:uid:0"})))
    held = mgr.held_svids()
    assert held == [("spiffe://example.org/a", svid)]
    held.clear()  # the caller's copy, not the source's cache
    assert mgr.held_svids() == [("spiffe://example.org/a", svid)]


def test_the_source_is_chosen_from_the_config(tmp_path):
    state = str(tmp_path / "state")
    embedded = source_from_config(IdentitySection(entries_file=""), state)
    spire = source_from_config(
        IdentitySection(source="spire", entries_file="", spire_admin_socket="/nonexistent.sock"),
        state,
    )
    assert isinstance(embedded, EmbeddedSource) and isinstance(spire, SpireSource)
    assert spire.entries() == () and spire.held_svids() == [] and spire.rotate_due() == []


class OneIdentitySource:
    """A third source, as a plugin author would write one: every selector set earns one ID,
    from an authority that is not this node's (so its SVIDs are relayed, not minted)."""

    def __init__(self, ca, keys):
        self.ca, self.keys = ca, keys
        self.entry = Entry("only", "spiffe://example.org/only", frozenset())
        self.events = SourceEvents()

    def start(self, events):
        self.events = events

    def stop(self):
        pass

    def ready(self):
        return True, "one identity"

    def match(self, selectors):
        return Match(self.entry, SpiffeId.parse(self.entry.spiffe_id))

    def entries(self):
        return [self.entry]

    def reload_entries(self, initial=False):
        return True

    def x509_svid(self, ident):
        svid = mint_x509_svid(self.ca, ident.spiffe_id)
        self.events.relayed(svid)
        return svid

    def jwt_svid(self, ident, audience, ttl, iss):
        return mint_jwt_svid(self.keys, ident.spiffe_id, audience, ttl=ttl or 60)

    def bundle(self):
        return TrustBundle.new(self.ca.trust_domain, self.ca.roots, self.keys.published())

    def held_svids(self):
        return []

    def rotate_due(self):
        return []


def test_a_source_of_ones_own_plugs_into_the_manager(tmp_path):
    td = TrustDomain("example.org")
    source = OneIdentitySource(
        SigningCA.generate(td), JwtSigningKeys(rotate_every=dt.timedelta(hours=1))
    )
    out, registry = io.StringIO(), CollectorRegistry()
    mgr = IdentityManager(
        IdentitySection(entries_file=""),
        str(tmp_path / "state"),
        audit=AuditLog("node", out),
        registry=registry,
        source=source,
    )
    mgr.start()
    try:
        assert mgr.ready() == (True, "one identity")
        ident = mgr.resolve(attestation({"unix:uid:1000"}))
        assert str(ident.spiffe_id) == "spiffe://example.org/only"
        assert mgr.identity_for_id("spiffe://example.org/only").entry is source.entry
        mgr.x509_svid(ident)
        assert mgr.jwt_svid(ident, ["https://as.example"]).audience == ("https://as.example",)
        issued = {
            t: registry.get_sample_value("credless_svids_issued_total", {"type": t})
            for t in ("x509", "jwt")
        }
        assert issued == {"x509": 1.0, "jwt": 1.0}
        assert registry.get_sample_value("credless_registration_entries") == 1.0
        # relayed SVIDs are counted, not audited: their authority keeps that record
        assert "svid.issued" not in out.getvalue()
        gen = mgr.generation
        source.events.changed()
        assert mgr.generation == gen + 1
        assert not (tmp_path / "state").exists()  # the embedded CA was never made
    finally:
        mgr.stop()
