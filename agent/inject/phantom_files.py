"""Placeholder files: for a workload that reads its token from a file, credless writes the
placeholder of each phantom-mode server into the directory its registration entry names
(`phantom_dir`), and keeps it fresh while a process of that entry lives (docs/phantom.md,
"A placeholder in a file").

What is written is what the Workload API would give the same process for the audience
`credless-phantom:<server>`: a JWT-SVID issued by the identity manager (the one issuance
path, agent/identity/manager.py `jwt_svid`), so the wire check (agent/inject/phantom.py)
cannot tell the two deliveries apart.

When:
- on an exec (the attestor's enrichment listener, like agent/oauth/prewarm.py) of a process
  in a managed cgroup whose entry has a phantom_dir, for each phantom server its policy lets
  it `initialize` (the same predicate pre-warming uses): now, unless the file written for
  this identity in this filesystem is younger than half its lifetime;
- again at half the placeholder's lifetime while any process of the entry, in that
  filesystem, is alive (kernel exit and exec events end a process's claim).
The writes run on this component's own thread, never on the attestor's: a write walks the
workload's filesystem and signs a JWT.

"In that filesystem": processes are grouped by identity, entry and filesystem view (mount
namespace and root directory), since `/run/credless-phantom` in two containers is two
directories. The write goes through agent/inject/phantom_write.py, which refuses (and
writes nothing) when the workload planted a symlink or a directory on the path.

Placeholders are never logged: their jti is.
"""

from __future__ import annotations

import math
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter

from agent.identity.jwtsvid import JwtSvid
from agent.identity.sources import Identity
from agent.identity.starting import starting_identity
from agent.inject.phantom import audience
from agent.inject.phantom_write import Refused, write_placeholder
from agent.observe.logging import AuditLog, get_logger

log = get_logger("phantom_files")

# written: on an exec; shared: another identity's processes hold the directory there
OUTCOMES = ("written", "refreshed", "denied", "refused", "shared", "failed")
RETRY_SECONDS = 30.0  # a write that failed (not refused) is tried again this much later
SWEEP_SECONDS = 60.0  # how often processes whose exit event was missed are looked for
_EV_EXEC, _EV_EXIT = 1, 3


class _Identities(Protocol):
    def resolve(self, attestation: Any, quiet: bool = False) -> Identity | None: ...

    def note_use(self, ident: Identity, attestation: Any) -> None: ...

    def jwt_svid(
        self, ident: Identity, audience: list[str], ttl: int | None = None, iss: str | None = None
    ) -> JwtSvid: ...


@dataclass
class _Proc:
    exec_ns: int
    pidfd: int
    attestation: Any


@dataclass
class _Target:
    """The processes of one identity and entry in one filesystem view, and when to write
    each of its files next (by server); `timed`: the servers whose next write is the
    half-life refresh, not an exec's."""

    spiffe_id: str
    phantom_dir: str
    procs: dict[int, _Proc] = field(default_factory=dict)
    due: dict[str, float] = field(default_factory=dict)
    timed: set[str] = field(default_factory=set)


class PhantomFiles:
    """servers: the phantom-mode servers; allowed(sid, server): the policy lets the identity
    `initialize` there; managed(attestation): the process's connections are intercepted."""

    name = "phantom_files"

    def __init__(
        self,
        identity: _Identities,
        servers: Iterable[str],
        *,
        allowed: Callable[[str, str], bool] | None = None,
        managed: Callable[[Any], bool] | None = None,
        audit: AuditLog | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        proc: str = "/proc",
    ):
        self.identity = identity
        self.servers = tuple(servers)
        self.allowed = allowed or (lambda _sid, _server: True)
        self.managed = managed or (lambda _att: True)
        self.audit = audit
        self.clock = clock
        self.proc = proc
        self._targets: dict[tuple, _Target] = {}
        self._by_pid: dict[int, tuple] = {}
        # (target key, server) -> half-life of the placeholder written last. Outlives the
        # target: a short-lived command run again and again writes once per half-life,
        # not once per run. Pruned once past (an entry past half-life says nothing).
        self._half: dict[tuple[tuple, str], float] = {}
        self._swept = -math.inf
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.m_files = Counter(
            "credless_phantom_files",
            "Placeholder files by server and outcome (written on an exec; refreshed at half-life "
            "while a process lives; "
            "denied: the policy refuses the server; refused: a symlink or directory was "
            "planted on the path, nothing written; shared: another identity's processes "
            "hold the directory in that filesystem, nothing written; failed: any other error)",
            ["server", "outcome"],
            registry=registry,
        )
        for server in self.servers:
            for outcome in OUTCOMES:
                self.m_files.labels(server, outcome)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="phantom-files", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            for target in self._targets.values():
                for p in target.procs.values():
                    os.close(p.pidfd)
            self._targets.clear()
            self._by_pid.clear()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.run_due()
            except Exception:
                log.exception("placeholder file writes failed")
            wait = self.next_due() - self.clock()
            self._wake.wait(timeout=min(max(wait, 0.0), 60.0))
            self._wake.clear()

    # ------------------------------------------------------------ events
    def attested(self, image: Any, attestation: Any) -> None:
        """The attestor's enrichment listener: a process that exec'd and earns a phantom_dir
        has its files scheduled (written on this component's thread)."""
        if not self.servers:
            return
        ident = starting_identity(image, attestation, self.managed, self.identity)
        if ident is None or ident.entry.phantom_dir is None:
            return
        sid = str(ident.spiffe_id)
        servers = []
        for server in self.servers:
            if self.allowed(sid, server):
                servers.append(server)
            else:
                self.m_files.labels(server, "denied").inc()
        if not servers:
            return
        self.identity.note_use(ident, attestation)
        pid = attestation.tgid
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # exited already: nothing to write for
            return
        try:
            view = self._view(pid, pidfd)
        except OSError:
            os.close(pidfd)
            return
        key = (sid, ident.entry.id, ident.entry.phantom_dir, *view)
        now = self.clock()
        with self._lock:
            self._drop(pid)
            # one directory in one filesystem is one identity's while its processes live:
            # another's files would overwrite the holder's placeholders under its process
            holder = next((k[0] for k in self._targets if k[2:] == key[2:] and k[0] != sid), None)
            if holder is None:
                target = self._targets.setdefault(key, _Target(sid, ident.entry.phantom_dir))
                target.procs[pid] = _Proc(attestation.exec_ns, pidfd, attestation)
                self._by_pid[pid] = key
                for server in servers:
                    half = self._half.get((key, server), -math.inf)
                    if now >= half:
                        target.due[server] = now
                        target.timed.discard(server)
                    elif server not in target.due:  # a new target, with a file still fresh
                        target.due[server] = half
                        target.timed.add(server)
        if holder is not None:
            os.close(pidfd)
            self._shared(ident, attestation, servers, holder)
            return
        if _exited(pidfd):  # its exit event came before this enrichment did
            self._ended(pid, pidfd)
        self._wake.set()

    def _shared(self, ident: Identity, att: Any, servers: list[str], holder: str) -> None:
        """Nothing written for a process whose directory another identity holds."""
        directory = ident.entry.phantom_dir
        reason = (
            f"{directory} holds the placeholders of {holder}'s processes in this filesystem; "
            f"give entry {ident.entry.id!r} a phantom_dir of its own"
        )
        who = {"spiffe_id": str(ident.spiffe_id), "pid": att.tgid, "exe": att.exe}
        log.warning("placeholder file refused: nothing written", reason=reason, **who)
        for server in servers:
            self.m_files.labels(server, "shared").inc()
            self._emit("phantom.file_refused", reason=reason, server=server, **who)

    def _view(self, pid: int, pidfd: int) -> tuple[int, int, int]:
        """The process's filesystem view: its mount namespace and root directory."""
        procfd = os.open(f"{self.proc}/{pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            signal.pidfd_send_signal(pidfd, 0)  # the /proc entry opened was still its own
            mnt = os.stat("ns/mnt", dir_fd=procfd)
            root = os.stat("root", dir_fd=procfd)
        finally:
            os.close(procfd)
        return mnt.st_ino, root.st_dev, root.st_ino

    def process_event(self, ev: Any) -> None:
        """Kernel events (the ring buffer thread): an exit, or an exec into another program,
        ends that process's claim on its files' refreshes."""
        if ev.type not in (_EV_EXEC, _EV_EXIT):
            return
        with self._lock:
            key = self._by_pid.get(ev.tgid)
            if key is None:
                return
            p = self._targets[key].procs.get(ev.tgid)
            if ev.type == _EV_EXEC and p is not None and p.exec_ns == ev.exec_ns:
                return
            self._drop(ev.tgid)

    def _ended(self, pid: int, pidfd: int) -> None:
        with self._lock:
            key = self._by_pid.get(pid)
            if key is not None and self._targets[key].procs[pid].pidfd == pidfd:
                self._drop(pid)

    def _sweep(self) -> None:
        """Drop the processes that have exited though no event said so (a ring buffer
        overrun, an exit racing its own exec's enrichment)."""
        with self._lock:
            gone = [
                (pid, p.pidfd)
                for t in self._targets.values()
                for pid, p in t.procs.items()
                if _exited(p.pidfd)
            ]
        for pid, pidfd in gone:
            self._ended(pid, pidfd)

    def _drop(self, pid: int) -> None:
        """(under the lock) pid no longer holds its target; a target without processes goes
        (its files stay, and expire)."""
        key = self._by_pid.pop(pid, None)
        if key is None:
            return
        target = self._targets[key]
        p = target.procs.pop(pid, None)
        if p is not None:
            os.close(p.pidfd)
        if not target.procs:
            del self._targets[key]

    # ------------------------------------------------------------ writing
    def next_due(self) -> float:
        with self._lock:
            return min(
                (d for t in self._targets.values() for d in t.due.values()), default=math.inf
            )

    def run_due(self) -> int:
        """Write every file that is due now; returns how many were attempted."""
        now = self.clock()
        if now - self._swept >= SWEEP_SECONDS:
            self._swept = now
            self._sweep()
        with self._lock:
            self._half = {k: half for k, half in self._half.items() if half > now}
            jobs = [
                (key, server)
                for key, t in self._targets.items()
                for server, due in t.due.items()
                if due <= now
            ]
            for key, server in jobs:
                self._targets[key].due[server] = math.inf  # in hand
        for key, server in jobs:
            try:
                self._write(key, server, now)
            except Exception:  # one write's unexpected failure loses no other file
                self.m_files.labels(server, "failed").inc()
                log.exception(
                    "placeholder file not written; trying again",
                    server=server,
                    retry_seconds=RETRY_SECONDS,
                )
                self._schedule(key, server, now + RETRY_SECONDS)
        return len(jobs)

    def _live(self, key: tuple) -> list[tuple[int, _Proc]]:
        with self._lock:
            target = self._targets.get(key)
            return list(target.procs.items()) if target else []

    def _write(self, key: tuple, server: str, now: float) -> None:
        for pid, p in self._live(key):
            ident = self.identity.resolve(p.attestation, quiet=True)
            # the entries or the policy may have been reloaded since the exec
            if ident is None or ident.entry.phantom_dir != key[2] or str(ident.spiffe_id) != key[0]:
                self._forget(key, server)
                return
            if not self.allowed(key[0], server):
                self.m_files.labels(server, "denied").inc()
                self._forget(key, server)
                return
            try:
                self._write_one(key, server, pid, p, ident, now)
            except ProcessLookupError:  # that one exited: another of the target may be alive
                self._ended(pid, p.pidfd)
                continue
            return

    def _write_one(
        self, key: tuple, server: str, pid: int, p: _Proc, ident: Identity, now: float
    ) -> None:
        att = p.attestation
        with self._lock:
            t = self._targets.get(key)
            refresh = t is not None and server in t.timed
        svid = self.identity.jwt_svid(ident, [audience(server)])
        who = {"spiffe_id": key[0], "pid": pid, "exe": att.exe, "server": server}
        try:
            path = write_placeholder(
                self.proc, pid, p.pidfd, key[2], server, svid.token.encode(), att.uid, att.gid
            )
        except Refused as e:
            self.m_files.labels(server, "refused").inc()
            log.warning("placeholder file refused: nothing written", reason=str(e), **who)
            self._emit("phantom.file_refused", reason=str(e), placeholder_jti=svid.jti, **who)
            self._schedule(key, server, math.inf, forget_half=True)
            return
        except ProcessLookupError:
            raise
        except OSError as e:
            self.m_files.labels(server, "failed").inc()
            log.warning(
                "placeholder file not written; trying again",
                directory=key[2],
                error=str(e),
                retry_seconds=RETRY_SECONDS,
                **who,
            )
            self._schedule(key, server, now + RETRY_SECONDS)
            return
        half = now + (svid.expires_at - svid.issued_at) / 2
        self.m_files.labels(server, "refreshed" if refresh else "written").inc()
        self._emit(
            "phantom.file_written",
            path=path,
            uid=att.uid,
            placeholder_jti=svid.jti,
            expires_at=svid.expires_at,
            **who,
        )
        self._schedule(key, server, half, half=half)

    def _schedule(
        self,
        key: tuple,
        server: str,
        due: float,
        half: float | None = None,
        forget_half: bool = False,
    ) -> None:
        with self._lock:
            if half is not None:
                self._half[key, server] = half
            if forget_half:  # the next exec tries again
                self._half.pop((key, server), None)
            t = self._targets.get(key)
            if t is not None:
                t.due[server] = due
                if half is not None:
                    t.timed.add(server)

    def _forget(self, key: tuple, server: str) -> None:
        with self._lock:
            t = self._targets.get(key)
            if t is not None:
                t.due.pop(server, None)
            self._half.pop((key, server), None)

    def _emit(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.emit(event, **fields)


def _exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited (zombie or reaped)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))
