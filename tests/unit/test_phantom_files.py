"""Placeholder files (agent/inject/phantom_files.py, agent/inject/phantom_write.py): written
on a matching exec into the process's own filesystem (/proc/<pid>/root, here this test
process's, so a real directory under tmp_path), 0400 and owned by the process's uid, kept
fresh at half-life while a process of the entry lives; and nothing written, ever, through a
symlink or over a directory the workload planted.

Real files, real /proc, real pidfds, real JWT-SVIDs; the clock is injected."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from agent.identity.entries import Entry
from agent.identity.jwt_rotation import JwtSigningKeys
from agent.identity.jwtsvid import mint_jwt_svid
from agent.identity.sources import Identity
from agent.identity.spiffeid import SpiffeId
from agent.inject.phantom_files import SWEEP_SECONDS, PhantomFiles
from agent.inject.phantom_write import Refused, write_placeholder

NOW = 1_900_000_000.0
BOT = "spiffe://example.org/bot"


def _capable(cap: int) -> bool:
    with open("/proc/self/status") as f:
        effective = next(ln for ln in f if ln.startswith("CapEff:")).split()[1]
    return bool(int(effective, 16) >> cap & 1)


# not the test's own, so the chown must show; `make unit` without CAP_CHOWN (not root) writes
# files for its own uid instead, and CI, which runs as root, checks the chown
CAN_CHOWN = _capable(0)  # CAP_CHOWN
UID, GID = (65534, 65533) if CAN_CHOWN else (os.geteuid(), os.getegid())
TTL = 300


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class Audit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []
        self.seen = threading.Event()

    def emit(self, event: str, **fields) -> None:
        self.events.append((event, fields))
        self.seen.set()

    def named(self, event: str) -> list[dict]:
        return [f for e, f in self.events if e == event]


class Identities:
    """The identity manager's resolve / note_use / jwt_svid over keys of the test's own."""

    def __init__(self, phantom_dir: str | None) -> None:
        self.keys = JwtSigningKeys()
        self.entry = Entry(
            id="bot", spiffe_id=BOT, selectors=frozenset({"a:b:c"}), phantom_dir=phantom_dir
        )
        self.issued: list = []
        self.used: list[int] = []

    def resolve(self, attestation, quiet: bool = False):
        if "a:b:c" not in attestation.selectors:
            return None
        return Identity(SpiffeId.parse(BOT), self.entry)

    def note_use(self, ident, attestation) -> None:
        self.used.append(attestation.tgid)

    def jwt_svid(self, ident, audience, ttl=None, iss=None):
        svid = mint_jwt_svid(self.keys, ident.spiffe_id, audience, ttl=TTL)
        self.issued.append(svid)
        return svid


def process(pid: int | None = None, selectors=("a:b:c",), exec_ns: int = 1):
    return SimpleNamespace(
        tgid=pid or os.getpid(),
        exec_ns=exec_ns,
        exe="/usr/bin/agent",
        uid=UID,
        gid=GID,
        cgroup_path="/managed",
        selectors=frozenset(selectors),
    )


EXEC = SimpleNamespace(source="exec")


def make(tmp_path, servers=("weather", "maps"), phantom_dir="phantom", **kw):
    directory = None if phantom_dir is None else str(tmp_path / phantom_dir)
    ids = Identities(directory)
    clock, audit, registry = Clock(), Audit(), CollectorRegistry()
    files = PhantomFiles(ids, servers, audit=audit, registry=registry, clock=clock, **kw)
    return SimpleNamespace(
        files=files, ids=ids, clock=clock, audit=audit, registry=registry, dir=directory
    )


def count(w, server: str, outcome: str) -> float:
    v = w.registry.get_sample_value(
        "credless_phantom_files_total", {"server": server, "outcome": outcome}
    )
    return v or 0.0


def exit_event(pid: int) -> SimpleNamespace:
    return SimpleNamespace(type=3, tgid=pid, exec_ns=0)


# ------------------------------------------------------------ the write itself


def write(tmp_path, directory, name="weather", data=b"placeholder", pid=None):
    pid = pid or os.getpid()
    pidfd = os.pidfd_open(pid)
    try:
        return write_placeholder("/proc", pid, pidfd, str(directory), name, data, UID, GID)
    finally:
        os.close(pidfd)


def test_the_file_is_0400_owned_by_the_process_in_a_directory_it_cannot_write(tmp_path):
    path = write(tmp_path, tmp_path / "phantom")
    assert path == f"{tmp_path}/phantom/weather"
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o400 and (st.st_uid, st.st_gid) == (UID, GID)
    d = os.stat(tmp_path / "phantom")  # credless's: the workload reaches its file by name
    assert stat.S_IMODE(d.st_mode) == 0o711 and (d.st_uid, d.st_gid) == (0, 0)
    assert open(path, "rb").read() == b"placeholder"
    # a second write replaces it whole, and leaves no temporary file behind
    write(tmp_path, tmp_path / "phantom", data=b"newer")
    assert open(path, "rb").read() == b"newer"
    assert os.listdir(tmp_path / "phantom") == ["weather"]


def test_an_existing_directory_is_used_as_it_is(tmp_path):
    (tmp_path / "phantom").mkdir(mode=0o755)
    write(tmp_path, tmp_path / "phantom")
    d = os.stat(tmp_path / "phantom")
    assert stat.S_IMODE(d.st_mode) == 0o755 and d.st_uid == os.getuid()


def planted(tmp_path):
    """A file outside the workload's reach that a planted symlink points at."""
    target = tmp_path / "shadow"
    target.write_bytes(b"root:secret\n")
    os.chmod(target, 0o600)
    return target


@pytest.mark.parametrize("where", ["directory", "parent", "file"])
def test_a_planted_symlink_is_refused_and_its_target_untouched(tmp_path, where):
    target = planted(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "run").mkdir()
    if where == "directory":  # phantom_dir itself -> a directory elsewhere
        (tmp_path / "run" / "phantom").symlink_to(outside)
    elif where == "parent":  # a component above it
        os.rmdir(tmp_path / "run")
        (tmp_path / "run").symlink_to(outside)
    else:  # the file's name -> the file to overwrite
        (tmp_path / "run" / "phantom").mkdir()
        (tmp_path / "run" / "phantom" / "weather").symlink_to(target)
    with pytest.raises(Refused, match="is a symlink"):
        write(tmp_path, tmp_path / "run" / "phantom")
    assert target.read_bytes() == b"root:secret\n"
    st = os.stat(target)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert os.listdir(outside) == []
    if where == "file":
        assert os.listdir(tmp_path / "run" / "phantom") == ["weather"]


def test_a_planted_hard_link_is_replaced_never_written_through(tmp_path):
    target = planted(tmp_path)
    (tmp_path / "phantom").mkdir()
    os.link(target, tmp_path / "phantom" / "weather")
    write(tmp_path, tmp_path / "phantom")
    assert target.read_bytes() == b"root:secret\n" and os.stat(target).st_nlink == 1
    assert (tmp_path / "phantom" / "weather").read_bytes() == b"placeholder"


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_name_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    (tmp_path / "phantom").mkdir()
    name = tmp_path / "phantom" / "weather"
    name.mkdir() if kind == "directory" else os.mkfifo(name)
    with pytest.raises(Refused):
        write(tmp_path, tmp_path / "phantom")
    assert os.listdir(tmp_path / "phantom") == ["weather"]


def test_a_file_where_a_directory_should_be_is_refused(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(Refused, match="is a regular file"):
        write(tmp_path, tmp_path / "run" / "phantom")


def test_only_the_last_directory_is_created(tmp_path):
    with pytest.raises(FileNotFoundError):
        write(tmp_path, tmp_path / "no" / "phantom")
    assert not (tmp_path / "no").exists()


def test_a_process_that_has_exited_gets_nothing(tmp_path):
    child = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(child.pid)
    child.wait()
    try:
        with pytest.raises(ProcessLookupError):
            write_placeholder(
                "/proc", child.pid, pidfd, str(tmp_path / "p"), "weather", b"x", UID, GID
            )
    finally:
        os.close(pidfd)
    assert not (tmp_path / "p").exists()


# ------------------------------------------------------------ when files are written


def test_an_exec_writes_one_file_per_allowed_server_holding_the_placeholder(tmp_path):
    w = make(tmp_path, allowed=lambda sid, server: server != "maps")
    w.files.attested(EXEC, process())
    assert w.files.run_due() == 1
    [svid] = w.ids.issued
    assert svid.audience == ("credless-phantom:weather",) and str(svid.spiffe_id) == BOT
    assert (tmp_path / "phantom" / "weather").read_text() == svid.token
    assert not (tmp_path / "phantom" / "maps").exists()
    assert count(w, "weather", "written") == 1 and count(w, "maps", "denied") == 1
    [written] = w.audit.named("phantom.file_written")
    assert written["placeholder_jti"] == svid.jti and written["spiffe_id"] == BOT
    assert written["path"] == f"{w.dir}/weather" and written["uid"] == UID
    # the placeholder itself is never in the audit: its jti is
    assert svid.token not in repr(w.audit.events)
    assert w.ids.used == [os.getpid()]


@pytest.mark.parametrize(
    "image, proc, kw, phantom_dir",
    [
        (SimpleNamespace(source="fork"), process(), {}, "phantom"),
        (SimpleNamespace(source="proc"), process(), {}, "phantom"),
        (EXEC, process(selectors=("x:y:z",)), {}, "phantom"),  # matches no entry
        (EXEC, process(), {"managed": lambda att: False}, "phantom"),
        (EXEC, process(), {}, None),  # its entry names no phantom_dir
        (EXEC, process(), {"allowed": lambda sid, server: False}, "phantom"),
    ],
)
def test_nothing_is_written_for_a_process_that_does_not_earn_a_file(
    tmp_path, image, proc, kw, phantom_dir
):
    w = make(tmp_path, phantom_dir=phantom_dir, **kw)
    w.files.attested(image, proc)
    assert w.files.run_due() == 0
    assert not w.ids.issued and not (tmp_path / "phantom").exists()


def test_an_exec_before_half_life_writes_nothing_after_it_rewrites(tmp_path):
    w = make(tmp_path, servers=("weather",))
    w.files.attested(EXEC, process())
    w.files.run_due()
    w.clock.now += TTL / 2 - 1
    w.files.attested(EXEC, process(exec_ns=2))
    assert w.files.run_due() == 0
    assert w.files.next_due() == NOW + TTL / 2  # and refreshed then, as it lives on
    w.clock.now += 1
    w.files.attested(EXEC, process(exec_ns=3))
    assert w.files.run_due() == 1
    assert (tmp_path / "phantom" / "weather").read_text() == w.ids.issued[-1].token
    assert count(w, "weather", "written") == 2 and count(w, "weather", "refreshed") == 0


def test_the_file_is_refreshed_at_half_life_while_a_process_lives(tmp_path):
    w = make(tmp_path, servers=("weather",))
    w.files.attested(EXEC, process())
    w.files.run_due()
    assert w.files.next_due() == NOW + TTL / 2
    w.clock.now = w.files.next_due() - 0.5
    assert w.files.run_due() == 0
    w.clock.now += 0.5
    assert w.files.run_due() == 1
    first, second = w.ids.issued
    assert first.jti != second.jti
    assert (tmp_path / "phantom" / "weather").read_text() == second.token
    [_, refreshed] = w.audit.named("phantom.file_written")
    assert refreshed["placeholder_jti"] == second.jti
    assert count(w, "weather", "written") == 1 and count(w, "weather", "refreshed") == 1
    # its last process exits: no more refreshes
    w.files.process_event(exit_event(os.getpid()))
    w.clock.now += TTL
    assert w.files.run_due() == 0 and w.files.next_due() == float("inf")


def test_a_command_run_again_and_again_writes_once_per_half_life(tmp_path):
    w = make(tmp_path, servers=("weather",))
    for _ in range(5):  # each run a new process, exited before the next
        child = subprocess.Popen(["sleep", "1000"])
        try:
            w.files.attested(EXEC, process(pid=child.pid))
            w.files.run_due()
        finally:
            child.kill()
            child.wait()
        w.files.process_event(exit_event(child.pid))
        w.clock.now += 10
    assert len(w.ids.issued) == 1
    assert w.files.next_due() == float("inf")  # none alive: nothing to refresh


def test_an_exec_of_the_same_program_keeps_its_claim_another_drops_it(tmp_path):
    w = make(tmp_path, servers=("weather",))
    w.files.attested(EXEC, process(exec_ns=7))
    w.files.run_due()
    w.files.process_event(SimpleNamespace(type=1, tgid=os.getpid(), exec_ns=7))
    assert w.files.next_due() == NOW + TTL / 2
    w.files.process_event(SimpleNamespace(type=1, tgid=os.getpid(), exec_ns=8))
    assert w.files.next_due() == float("inf")


def test_a_reloaded_entry_without_phantom_dir_stops_the_refreshes(tmp_path):
    w = make(tmp_path, servers=("weather",))
    w.files.attested(EXEC, process())
    w.files.run_due()
    w.ids.entry = Entry(id="bot", spiffe_id=BOT, selectors=frozenset({"a:b:c"}))
    w.clock.now += TTL
    assert w.files.run_due() == 1  # looked at, and dropped
    assert len(w.ids.issued) == 1 and w.files.next_due() == float("inf")


def test_a_planted_symlink_is_refused_audited_and_counted_never_followed(tmp_path):
    target = planted(tmp_path)
    w = make(tmp_path, servers=("weather",))
    os.symlink(target, tmp_path / "phantom")  # phantom_dir -> a file
    os.mkdir(tmp_path / "elsewhere")
    w.files.attested(EXEC, process())
    w.files.run_due()
    assert target.read_bytes() == b"root:secret\n"
    assert count(w, "weather", "refused") == 1 and count(w, "weather", "written") == 0
    [refused] = w.audit.named("phantom.file_refused")
    assert "is a symlink" in refused["reason"] and refused["placeholder_jti"]
    assert w.ids.issued[0].token not in repr(w.audit.events)
    # not tried again until the next exec
    w.clock.now += TTL
    assert w.files.run_due() == 0
    w.files.attested(EXEC, process(exec_ns=2))
    assert w.files.run_due() == 1 and count(w, "weather", "refused") == 2


def test_a_failed_write_is_tried_again(tmp_path):
    w = make(tmp_path, servers=("weather",), phantom_dir="missing/phantom")
    w.files.attested(EXEC, process())
    w.files.run_due()
    assert count(w, "weather", "failed") == 1
    os.mkdir(tmp_path / "missing")
    w.clock.now = w.files.next_due()
    w.files.run_due()
    assert (tmp_path / "missing" / "phantom" / "weather").read_text() == w.ids.issued[-1].token


def test_the_thread_writes_what_an_exec_scheduled(tmp_path):
    w = make(tmp_path, servers=("weather",))
    w.files.start()
    try:
        w.files.attested(EXEC, process())
        assert w.audit.seen.wait(30)
    finally:
        w.files.stop()
    assert (tmp_path / "phantom" / "weather").read_text() == w.ids.issued[0].token


def test_a_process_that_exited_before_its_enrichment_is_not_kept(tmp_path):
    w = make(tmp_path, servers=("weather",))
    child = subprocess.Popen(["true"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # a zombie, not reaped
        w.files.attested(EXEC, process(pid=child.pid))
        assert w.files.run_due() == 0 and w.files.next_due() == float("inf")
    finally:
        child.wait()


def test_a_missed_exit_event_is_found_by_the_sweep(tmp_path):
    w = make(tmp_path, servers=("weather",))
    child = subprocess.Popen(["sleep", "1000"])
    try:
        w.files.attested(EXEC, process(pid=child.pid))
        w.files.run_due()
        assert w.files.next_due() == NOW + TTL / 2
    finally:
        child.kill()
        child.wait()
    # no exit event: the ring buffer overran
    w.clock.now += SWEEP_SECONDS
    w.files.run_due()
    assert w.files.next_due() == float("inf") and len(w.ids.issued) == 1


OTHER = "spiffe://example.org/other"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class TwoIdentities(Identities):
    """Two entries naming one phantom_dir: a:b:c is BOT's, d:e:f OTHER's."""

    def __init__(self, phantom_dir: str | None) -> None:
        super().__init__(phantom_dir)
        self.other = Entry(
            id="other", spiffe_id=OTHER, selectors=frozenset({"d:e:f"}), phantom_dir=phantom_dir
        )

    def resolve(self, attestation, quiet: bool = False):
        if "d:e:f" in attestation.selectors:
            return Identity(SpiffeId.parse(OTHER), self.other)
        return super().resolve(attestation, quiet)


def test_a_directory_another_identity_holds_in_this_filesystem_is_not_written(tmp_path):
    """Two identities whose entries name one phantom_dir, with processes in one filesystem:
    the second would overwrite the first's placeholder (and its process then present the
    second's, as misuse). It is refused while the first's processes live, and after."""
    w = make(tmp_path, servers=("weather",))
    w.ids = w.files.identity = TwoIdentities(w.dir)
    w.files.attested(EXEC, process())
    assert w.files.run_due() == 1
    path = tmp_path / "phantom" / "weather"
    holders = digest(path.read_bytes())  # placeholders compared, never shown in a failure
    child = subprocess.Popen(["sleep", "1000"])
    try:
        w.files.attested(EXEC, process(pid=child.pid, selectors=("d:e:f",)))
        w.files.run_due()
        assert digest(path.read_bytes()) == holders
        assert len(w.ids.issued) == 1 and count(w, "weather", "shared") == 1
        [refused] = w.audit.named("phantom.file_refused")
        assert refused["spiffe_id"] == OTHER and refused["pid"] == child.pid
        assert BOT in refused["reason"] and w.dir in refused["reason"]
        w.files.process_event(exit_event(os.getpid()))  # the holder's last process ends
        w.files.attested(EXEC, process(pid=child.pid, selectors=("d:e:f",), exec_ns=2))
        assert w.files.run_due() == 1
        assert str(w.ids.issued[-1].spiffe_id) == OTHER
        assert digest(path.read_bytes()) == digest(w.ids.issued[-1].token.encode())
    finally:
        child.kill()
        child.wait()


# The agent without CAP_CHOWN (the shipped systemd unit's capabilities, docs/phantom.md): a
# non-root workload's file cannot be given to it, and the error says which capability and
# where to add it; a root workload's needs no chown and is written. A child process whose
# bounding set lacks CAP_CHOWN stands for the agent (setpriv, util-linux).
WITHOUT_CHOWN = r"""
import os, sys
from agent.inject.phantom_write import write_file
d = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
try:
    write_file(d, sys.argv[2], b"placeholder", int(sys.argv[3]), int(sys.argv[3]), "/shown")
    print("written")
except PermissionError as e:
    print(e)
"""


@pytest.mark.parametrize("uid,expected", [(UID, "needs CAP_CHOWN"), (0, "written")])
def test_without_cap_chown_a_workloads_file_is_refused_with_the_fix(tmp_path, uid, expected):
    if not (CAN_CHOWN and _capable(8)):  # CAP_SETPCAP; `make unit` as a user: CI runs it as root
        pytest.skip("needs root: the test drops CAP_CHOWN from a root child")
    out = subprocess.run(
        [
            *("setpriv", "--bounding-set", "-chown", "--inh-caps", "-chown"),
            *(sys.executable, "-c", WITHOUT_CHOWN, str(tmp_path), "weather", str(uid)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert expected in out.stdout, out.stdout + out.stderr
    if expected == "written":
        assert (tmp_path / "weather").read_bytes() == b"placeholder"
    else:
        assert "CapabilityBoundingSet=CAP_CHOWN" in out.stdout
        assert not (tmp_path / "weather").exists() and os.listdir(tmp_path) == []
