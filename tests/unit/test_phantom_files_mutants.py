"""Placeholder files kept fresh (agent/inject/phantom_files.py), found by mutation testing: the
policy asked with the identity and server at the exec and again at each refresh, what the
audit events and log lines say (who, which server, when the placeholder expires, why nothing
was written), when a failed write is tried again, which processes hold a directory (another
identity's, never the same identity's), a process that exits or execs between its event and
the write, and the thread: it wakes when a refresh is due, outlives a write that fails
unexpectedly, and is gone when stop() returns.

Real files under tmp_path, real /proc and pidfds, real JWT-SVIDs; the clock is injected
(but for the thread's own wake-ups, which follow the real one)."""

from __future__ import annotations

import math
import os
import subprocess
import threading

import pytest
import structlog.testing
from prometheus_client import CollectorRegistry

from agent.identity.entries import Entry
from agent.identity.jwtsvid import mint_jwt_svid
from agent.identity.sources import Identity
from agent.identity.spiffeid import SpiffeId
from agent.inject.phantom_files import OUTCOMES, RETRY_SECONDS, PhantomFiles
from tests.unit.test_phantom_files import (
    BOT,
    EXEC,
    NOW,
    OTHER,
    TTL,
    Audit,
    Identities,
    TwoIdentities,
    count,
    exit_event,
    make,
    process,
)


@pytest.fixture(autouse=True)
def elsewhere(tmp_path_factory, monkeypatch):
    """The working directory is an empty one of the test's own: a path taken relative to it
    instead of to a directory fd lands there, never beside the files checked (nor in the
    tree the tests run from)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


class Recording(Identities):
    """Identities that also record what the component asks: the identity note_use() is
    given, and whether each resolve() was quiet."""

    def __init__(self, phantom_dir):
        super().__init__(phantom_dir)
        self.noted: list[str] = []
        self.quiet: list[bool] = []

    def resolve(self, attestation, quiet: bool = False):
        self.quiet.append(quiet)
        return super().resolve(attestation, quiet)

    def note_use(self, ident, attestation) -> None:
        self.noted.append(str(ident.spiffe_id))
        super().note_use(ident, attestation)


class Apart(Identities):
    """Two identities with directories of their own: a:b:c is BOT's, d:e:f OTHER's."""

    def __init__(self, phantom_dir, other_dir):
        super().__init__(phantom_dir)
        self.other = Entry(
            id="other", spiffe_id=OTHER, selectors=frozenset({"d:e:f"}), phantom_dir=other_dir
        )

    def resolve(self, attestation, quiet: bool = False):
        if "d:e:f" in attestation.selectors:
            return Identity(SpiffeId.parse(OTHER), self.other)
        return super().resolve(attestation, quiet)


def apart(tmp_path, **kw):
    w = make(tmp_path, servers=("weather",), **kw)
    w.ids = w.files.identity = Apart(w.dir, str(tmp_path / "other"))
    return w


@pytest.fixture
def child():
    """A live process of the test's own (same filesystem view), killed at the end."""
    proc = subprocess.Popen(["sleep", "1000"])
    yield proc
    proc.kill()
    proc.wait()


def dead_child():
    """A process to be killed and reaped before the write (reap), unseen by the sweep."""
    return subprocess.Popen(["sleep", "1000"])


def reap(proc) -> None:
    proc.kill()
    proc.wait()


# ------------------------------------------------------------ the policy, the identity


def test_the_metrics_of_each_server_and_outcome_exist_before_any_event(tmp_path):
    w = make(tmp_path)
    for server in ("weather", "maps"):
        for outcome in OUTCOMES:
            value = w.registry.get_sample_value(
                "credless_phantom_files_total", {"server": server, "outcome": outcome}
            )
            assert value == 0.0, (server, outcome)


def test_the_policy_is_asked_for_this_identity_at_the_exec_and_at_each_refresh(tmp_path):
    policy = {(BOT, "weather")}
    w = make(tmp_path, servers=("weather",), allowed=lambda sid, s: (sid, s) in policy)
    w.ids = w.files.identity = Recording(w.dir)
    w.files.attested(EXEC, process())
    assert w.files.run_due() == 1
    assert w.ids.noted == [BOT]  # the identity whose use is noted is the one written for
    w.clock.now = w.files.next_due()
    assert w.files.run_due() == 1 and count(w, "weather", "refreshed") == 1
    assert len(w.ids.issued) == 2
    # every lookup of the process is quiet: not a decision for a caller, nothing audited
    assert w.ids.quiet and all(q is True for q in w.ids.quiet)
    # the policy is reloaded without that server: the next refresh writes nothing, is
    # counted as denied, and nothing more is scheduled for it
    policy.clear()
    w.clock.now = w.files.next_due()
    assert w.files.run_due() == 1
    assert count(w, "weather", "denied") == 1 and len(w.ids.issued) == 2
    assert w.files.next_due() == math.inf


# ------------------------------------------------------------ what the audit and logs say


def test_a_written_file_is_audited_with_who_where_and_until_when(tmp_path):
    w = make(tmp_path, servers=("weather",))
    w.files.attested(EXEC, process())
    w.files.run_due()
    [svid] = w.ids.issued
    [written] = w.audit.named("phantom.file_written")
    assert written["spiffe_id"] == BOT and written["pid"] == os.getpid()
    assert written["exe"] == "/usr/bin/agent" and written["server"] == "weather"
    assert written["expires_at"] == svid.expires_at


def test_a_refused_write_is_audited_and_logged_with_who_and_why(tmp_path):
    w = make(tmp_path, servers=("weather",))
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "phantom")
    w.files.attested(EXEC, process())
    with structlog.testing.capture_logs() as logs:
        w.files.run_due()
    [refused] = w.audit.named("phantom.file_refused")
    assert refused["spiffe_id"] == BOT and refused["pid"] == os.getpid()
    assert refused["exe"] == "/usr/bin/agent" and refused["server"] == "weather"
    assert refused["reason"] == f"{w.dir} is a symlink"
    [said] = [e for e in logs if e["log_level"] == "warning"]
    assert said["reason"] == f"{w.dir} is a symlink"
    assert (said["spiffe_id"], said["pid"], said["exe"], said["server"]) == (
        BOT,
        os.getpid(),
        "/usr/bin/agent",
        "weather",
    )
    assert w.ids.issued[0].token not in repr(logs)


def test_a_failed_write_is_logged_with_the_directory_and_error_and_tried_again_later(tmp_path):
    w = make(tmp_path, servers=("weather",), phantom_dir="missing/phantom")
    w.files.attested(EXEC, process())
    with structlog.testing.capture_logs() as logs:
        w.files.run_due()
    assert count(w, "weather", "failed") == 1
    [said] = [e for e in logs if e["log_level"] == "warning"]
    assert said["directory"] == w.dir and "No such file or directory" in said["error"]
    assert said["retry_seconds"] == RETRY_SECONDS
    assert (said["spiffe_id"], said["pid"], said["server"]) == (BOT, os.getpid(), "weather")
    # not again at once, nor before the retry delay; then again
    assert w.files.run_due() == 0
    assert w.files.next_due() == NOW + RETRY_SECONDS
    os.mkdir(tmp_path / "missing")
    w.clock.now = NOW + RETRY_SECONDS
    assert w.files.run_due() == 1 and count(w, "weather", "written") == 1


def test_a_directory_another_identity_holds_is_audited_and_logged_per_server(tmp_path, child):
    w = make(tmp_path, servers=("weather", "maps"))
    w.ids = w.files.identity = TwoIdentities(w.dir)
    w.files.attested(EXEC, process())
    w.files.run_due()
    with structlog.testing.capture_logs() as logs:
        w.files.attested(EXEC, process(pid=child.pid, selectors=("d:e:f",)))
    refused = w.audit.named("phantom.file_refused")
    assert sorted(r["server"] for r in refused) == ["maps", "weather"]
    for r in refused:
        assert (r["spiffe_id"], r["pid"], r["exe"]) == (OTHER, child.pid, "/usr/bin/agent")
    [said] = [e for e in logs if e["log_level"] == "warning"]
    assert said["reason"] == refused[0]["reason"] and BOT in said["reason"]
    assert (said["spiffe_id"], said["pid"], said["exe"]) == (OTHER, child.pid, "/usr/bin/agent")


# ------------------------------------------------------------ who holds a directory


def test_identities_with_directories_of_their_own_are_both_written(tmp_path, child):
    w = apart(tmp_path)
    w.files.attested(EXEC, process())
    w.files.attested(EXEC, process(pid=child.pid, selectors=("d:e:f",)))
    assert w.files.run_due() == 2
    assert count(w, "weather", "shared") == 0 and count(w, "weather", "written") == 2
    assert (tmp_path / "other" / "weather").read_text() == w.ids.issued[-1].token


def test_two_processes_of_one_identity_share_its_directory(tmp_path, child):
    w = make(tmp_path, servers=("weather",))
    w.files.attested(EXEC, process())
    w.files.run_due()
    w.files.attested(EXEC, process(pid=child.pid))
    assert count(w, "weather", "shared") == 0 and not w.audit.named("phantom.file_refused")
    # the first exits: the second keeps the file fresh
    w.files.process_event(exit_event(os.getpid()))
    assert w.files.next_due() == NOW + TTL / 2


def test_a_process_that_execs_as_another_identity_stops_refreshing_the_first(tmp_path):
    """Its exec event was missed (or came after the enrichment): the new exec's own
    enrichment ends the old identity's claim."""
    w = apart(tmp_path)
    w.files.attested(EXEC, process())
    w.files.run_due()
    w.files.attested(EXEC, process(selectors=("d:e:f",), exec_ns=2))
    w.files.run_due()
    w.clock.now = NOW + TTL / 2
    w.files.run_due()
    assert [str(s.spiffe_id) for s in w.ids.issued] == [BOT, OTHER, OTHER]


# ------------------------------------------------------------ written or refreshed


def test_an_exec_after_half_life_writes_afresh_even_in_a_target_that_refreshes(tmp_path, child):
    w = make(tmp_path, servers=("weather",))
    w.files.attested(EXEC, process())
    w.files.run_due()
    w.clock.now = NOW + TTL / 2 + 1
    w.files.attested(EXEC, process(pid=child.pid))  # another process of the same target
    assert w.files.run_due() == 1
    assert count(w, "weather", "written") == 2 and count(w, "weather", "refreshed") == 0


def test_a_new_process_with_a_fresh_file_has_it_refreshed_at_half_life(tmp_path):
    w = make(tmp_path, servers=("weather",))
    w.files.attested(EXEC, process())
    w.files.run_due()
    w.files.process_event(exit_event(os.getpid()))
    w.clock.now = NOW + 10
    w.files.attested(EXEC, process(exec_ns=2))  # the file is still fresh: nothing now
    assert w.files.run_due() == 0
    w.clock.now = NOW + TTL / 2
    assert w.files.run_due() == 1
    assert count(w, "weather", "written") == 1 and count(w, "weather", "refreshed") == 1


# ------------------------------------------------------------ processes that go meanwhile


def test_a_process_that_exited_before_its_enrichment_is_dropped_at_once(tmp_path):
    w = make(tmp_path, servers=("weather",))
    w.files.run_due()  # the sweep has just run: only the exec's own check can tell
    proc = subprocess.Popen(["true"])
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # a zombie
        w.files.attested(EXEC, process(pid=proc.pid))
        assert w.files.next_due() == math.inf
        assert w.files.run_due() == 0 and not w.ids.issued
    finally:
        proc.wait()


def test_a_process_that_exits_while_its_exec_is_enriched_is_not_kept(tmp_path, monkeypatch):
    w = make(tmp_path, servers=("weather",))
    w.files.run_due()  # the sweep has just run: only the exec's own check can tell
    proc = subprocess.Popen(["sleep", "1000"])
    view = w.files._view

    def exits_meanwhile(pid, pidfd):
        seen = view(pid, pidfd)  # its filesystem was read while it lived; then it exits
        proc.kill()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # a zombie, not reaped
        return seen

    monkeypatch.setattr(w.files, "_view", exits_meanwhile)
    try:
        w.files.attested(EXEC, process(pid=proc.pid))
        assert w.files.next_due() == math.inf
        assert w.files.run_due() == 0 and not w.ids.issued
    finally:
        reap(proc)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_process_whose_claim_ends_leaves_no_descriptor_open(tmp_path):
    w = make(tmp_path, servers=("weather",))
    before = open_fds()
    w.files.attested(EXEC, process())
    assert open_fds() == before + 1  # its pidfd, while it holds the target
    w.files.process_event(exit_event(os.getpid()))
    assert open_fds() == before


def test_a_process_gone_at_its_write_gives_way_to_another_of_the_target(tmp_path):
    w = make(tmp_path, servers=("weather",))
    w.files.run_due()  # the sweep has just run: the write is what finds it gone
    proc = dead_child()
    try:
        w.files.attested(EXEC, process(pid=proc.pid))
        w.files.attested(EXEC, process())
    finally:
        reap(proc)
    assert w.files.run_due() == 1
    assert (tmp_path / "phantom" / "weather").read_text() == w.ids.issued[-1].token
    assert count(w, "weather", "written") == 1
    # the gone one was dropped then: the other's exit ends the refreshes
    w.files.process_event(exit_event(os.getpid()))
    assert w.files.next_due() == math.inf


def test_a_target_whose_only_process_is_gone_at_its_write_is_dropped(tmp_path):
    w = make(tmp_path)  # two servers: the second job finds the target gone
    w.files.run_due()
    proc = dead_child()
    try:
        w.files.attested(EXEC, process(pid=proc.pid))
    finally:
        reap(proc)
    assert w.files.run_due() == 2
    assert w.files.next_due() == math.inf and not (tmp_path / "phantom").exists()


def test_an_exit_event_during_the_write_is_no_error(tmp_path):
    w = make(tmp_path, servers=("weather",))
    proc = dead_child()
    signed = w.ids.jwt_svid

    def exits_meanwhile(ident, audience, ttl=None, iss=None):
        reap(proc)
        w.files.process_event(exit_event(proc.pid))  # the ring buffer's thread, meanwhile
        return signed(ident, audience, ttl, iss)

    w.ids.jwt_svid = exits_meanwhile
    try:
        w.files.attested(EXEC, process(pid=proc.pid))
        assert w.files.run_due() == 1
    finally:
        reap(proc)
    assert w.files.next_due() == math.inf and not (tmp_path / "phantom").exists()


def test_an_exit_event_while_the_process_is_looked_up_again_is_no_error(tmp_path):
    """The entries were reloaded (the process matches none now) and its exit event comes
    while the refresh looks it up: nothing written, no error, nothing left to refresh."""
    w = make(tmp_path, servers=("weather",))
    w.files.attested(EXEC, process())
    w.files.run_due()
    resolve = w.ids.resolve

    def reloaded(attestation, quiet=False):
        if w.clock.now > NOW:
            w.files.process_event(exit_event(attestation.tgid))
            return None
        return resolve(attestation, quiet)

    w.ids.resolve = reloaded
    w.clock.now = w.files.next_due()
    assert w.files.run_due() == 1
    assert len(w.ids.issued) == 1 and w.files.next_due() == math.inf


# ------------------------------------------------------------ the thread


class ShortLived(Identities):
    """Placeholders of 1 s, signed at the real time: the half-life refresh half a second on."""

    def jwt_svid(self, ident, audience, ttl=None, iss=None):
        svid = mint_jwt_svid(self.keys, ident.spiffe_id, audience, ttl=1)
        self.issued.append(svid)
        return svid


class Counted(Audit):
    def __init__(self, wanted: int) -> None:
        super().__init__()
        self.wanted = wanted
        self.enough = threading.Event()

    def emit(self, event: str, **fields) -> None:
        super().emit(event, **fields)
        if len(self.named("phantom.file_written")) >= self.wanted:
            self.enough.set()


def running(ids, audit):
    return PhantomFiles(ids, ("weather",), audit=audit, registry=CollectorRegistry())


def test_the_thread_wakes_for_a_refresh_when_it_is_due(tmp_path):
    ids, audit = ShortLived(str(tmp_path / "phantom")), Counted(2)
    files = running(ids, audit)
    files.start()
    try:
        files.attested(EXEC, process())
        assert audit.enough.wait(20), "the refresh half a second on was not written"
    finally:
        files.stop()
    written = audit.named("phantom.file_written")
    assert written[1]["placeholder_jti"] == ids.issued[1].jti


def test_the_thread_outlives_a_write_that_fails_unexpectedly(tmp_path, child):
    ids = Apart(str(tmp_path / "phantom"), str(tmp_path / "other"))
    signed, calls, failed = ids.jwt_svid, [], threading.Event()

    def fails_once(ident, audience, ttl=None, iss=None):
        calls.append(ident)
        if len(calls) == 1:
            failed.set()
            raise RuntimeError("the signing key is unavailable")
        return signed(ident, audience, ttl, iss)

    ids.jwt_svid = fails_once
    audit = Counted(1)
    files = running(ids, audit)
    with structlog.testing.capture_logs() as logs:
        files.start()
        try:
            files.attested(EXEC, process())
            assert failed.wait(20)
            # the next exec comes after the failing round (within one, see below)
            files.attested(EXEC, process(pid=child.pid, selectors=("d:e:f",)))
            assert audit.enough.wait(20), "the thread stopped writing after a failure"
        finally:
            files.stop()
    [written] = audit.named("phantom.file_written")
    assert written["spiffe_id"] == OTHER
    assert any(e["log_level"] == "error" for e in logs)


def test_stop_before_start_is_harmless(tmp_path):
    w = make(tmp_path)
    w.files.stop()
    w.files.stop()


def test_stop_returns_once_the_thread_has_finished_its_write(tmp_path):
    ids = Identities(str(tmp_path / "phantom"))
    signed = ids.jwt_svid
    entered, release = threading.Event(), threading.Event()

    def slow(ident, audience, ttl=None, iss=None):
        entered.set()
        assert release.wait(20)
        return signed(ident, audience, ttl, iss)

    ids.jwt_svid = slow
    audit = Audit()
    files = running(ids, audit)
    before = set(threading.enumerate())
    files.start()
    started = set(threading.enumerate()) - before
    try:
        files.attested(EXEC, process())
        assert entered.wait(20)
    finally:
        release.set()
        files.stop()
    assert started and not any(t.is_alive() for t in started)
    assert audit.named("phantom.file_written")  # the write in hand was finished, not cut


def test_an_unexpected_failure_of_one_write_does_not_lose_the_others_of_its_round(tmp_path, child):
    """Found by this triage (stop 33): an error other than OSError or a refusal in one write
    of a round (the signing key unavailable, say) left that round's other files, and its
    own, in hand for good: never written until a new exec, so their placeholders expired."""
    w = apart(tmp_path)
    signed = w.ids.jwt_svid

    def fails_for_bot(ident, audience, ttl=None, iss=None):
        if str(ident.spiffe_id) == BOT:
            raise RuntimeError("the signing key is unavailable")
        return signed(ident, audience, ttl, iss)

    w.ids.jwt_svid = fails_for_bot
    w.files.attested(EXEC, process())
    w.files.attested(EXEC, process(pid=child.pid, selectors=("d:e:f",)))
    w.files.run_due()  # the failing write is counted and logged, the others go on
    w.clock.now += RETRY_SECONDS
    w.files.run_due()
    assert (tmp_path / "other" / "weather").exists(), "OTHER's file was never written"
