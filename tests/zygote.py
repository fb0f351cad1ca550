"""Processes the suite starts many of, forked from one that has imported them once.

Why: the suite runs on a 2-core machine and its tests are CPU-bound. The official MCP SDK
takes about 1.3 s of CPU to import (pydantic builds its models) and the suite starts some
eighty MCP servers; the agent takes about 0.9 s (grpc, cryptography, BCC's bindings, its own
modules) and the suite starts some 230 agents. A fork of a process that has imported them
starts at once. Two kinds:

- "mcp-server": tests/mcp/server.py's `main()`, its listening sockets given as `--fd N`.
  The servers are the tests' remote peers, never workloads: nothing attests them.
- "agent": `python -m agent ARGS` (agent/cli.py's `main()`), the system under test
  (tests.helpers.AgentProcess). Only the import is shared: the agent runs the same `main()`
  with the same arguments and environment, in a process of its own, in the worker's cgroup
  as before, and ends the way the interpreter would (non-daemon threads joined, atexit
  handlers run); its exit status is the real one. What differs is what no test looks at:
  its parent is the zygote, its command line the zygote's, its modules were imported
  before it read its configuration (none reads the environment or the configuration at
  import), and the kernel's BTF offsets (agent/attest/btf.py, cached per process) were
  read once, by the zygote, on the same kernel. CREDLESS_TEST_AGENT_EXEC=1 execs every
  agent instead; `make bench-start` measures an exec'd agent's start.

Each pytest worker starts one zygote per kind on first use (`spawn`) and talks to it over a
Unix socket pair: a request is the arguments, working directory and environment, with the
child's stdout, stderr and listening sockets passed as descriptors (SCM_RIGHTS); the answer
is the child's pid, a pidfd of it, and a pipe on which the zygote writes its exit status
once it has reaped it. The zygote exits when the worker's end of the socket closes (its
`atexit`, or the worker's death), and each child is sent SIGTERM when the zygote dies
(PR_SET_PDEATHSIG): nothing outlives the suite.

Why not fork the pytest worker itself: it runs threads (pytest-xdist's channel), and a
fork of a threaded process may copy a lock that another thread holds. The zygote runs none:
importing these modules starts no thread (grpc starts its own when a server is made).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_MAX_REQUEST = 1 << 20
KINDS = ("mcp-server", "agent")


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


class ForkedProcess:
    """A process the zygote forked, with Popen's pid, returncode, poll, wait,
    send_signal, terminate and kill. Signals go through a pidfd the zygote opened before
    the child could exit (the process is the zygote's child, not ours, and no pid reuse can
    mistake it); the exit status comes on a pipe the zygote writes when it reaps the child
    (a negative signal number for a child a signal ended, as Popen says it), or -1 if the
    zygote died first."""

    def __init__(self, pid: int, pidfd: int, status: int, stdout: int | None, parent: int):
        self.pid = pid
        self.parent = parent  # the zygote's pid
        self._pidfd = pidfd
        self._status = status
        self.stdout = os.fdopen(stdout, "r") if stdout is not None else None
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.wait(0) if self.returncode is None else self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None:
            readable, _, _ = select.select([self._status], [], [], timeout)
            if not readable:
                if timeout == 0:
                    return None
                raise subprocess.TimeoutExpired(f"forked process {self.pid}", timeout or 0)
            said = os.read(self._status, 64)
            self.returncode = int(said) if said else -1
            for fd in (self._pidfd, self._status):
                os.close(fd)
            if self.stdout is not None:
                self.stdout.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:  # exited, not reaped yet: as Popen, nothing to do
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """One zygote process of a kind and the socket to it; spawn() may be called from any
    thread."""

    def __init__(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"no zygote of kind {kind!r}: one of {KINDS}")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote", kind, str(theirs.fileno())],
            cwd=Path(__file__).resolve().parents[1],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            # as the agent is run (tests.helpers.AgentProcess): its stdout is made at start
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        theirs.close()
        self.sock = ours
        self.lock = threading.Lock()
        atexit.register(self.close)

    def spawn(
        self,
        argv: list[str],
        cwd: Path,
        stderr: int,
        listening: list[int],
        stdout: int | None = None,
        env: dict[str, str] | None = None,
    ) -> ForkedProcess:
        """A child running argv; its stdout the descriptor given, or a pipe
        (ForkedProcess.stdout); its environment env (default: this process's)."""
        read_end = None
        if stdout is None:
            read_end, stdout = os.pipe()
        request = json.dumps({"argv": argv, "cwd": str(cwd), "env": env or dict(os.environ)})
        try:
            with self.lock:
                socket.send_fds(self.sock, [request.encode()], [stdout, stderr, *listening])
                answer, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 2)
        finally:
            if read_end is not None:
                os.close(stdout)
        if not answer or len(fds) != 2:
            for fd in fds if read_end is None else [*fds, read_end]:
                os.close(fd)
            raise RuntimeError(f"the zygote exited ({self.proc.poll()})")
        pidfd, status = fds
        return ForkedProcess(json.loads(answer)["pid"], pidfd, status, read_end, self.proc.pid)

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_zygotes: dict[str, Zygote] = {}
_zygote_lock = threading.Lock()


def zygote(kind: str) -> Zygote:
    """This worker's zygote of the kind, started on first use (again if it died)."""
    with _zygote_lock:
        found = _zygotes.get(kind)
        if found is None or found.proc.poll() is not None:
            found = _zygotes[kind] = Zygote(kind)
        return found


def spawn(argv: list[str], cwd: Path, stderr: int, listening: list[int]) -> ForkedProcess:
    """`python -m tests.mcp.server --fd N... argv` as a fork of this worker's zygote, its
    stdout a pipe (ForkedProcess.stdout) and its stderr the descriptor given."""
    return zygote("mcp-server").spawn(argv, cwd, stderr, listening)


def spawn_agent(
    argv: list[str], cwd: Path, stdout: int, stderr: int, env: dict[str, str]
) -> ForkedProcess:
    """`python -m agent argv` as a fork of this worker's agent zygote."""
    return zygote("agent").spawn(argv, cwd, stderr, [], stdout=stdout, env=env)


# ---------------------------------------------------------------- the zygote's side
def _preload(kind: str):
    """Import what every child of the kind shares; returns (its main, argv[0])."""
    if kind == "mcp-server":
        from tests.mcp import server  # the import every server shares

        return server.main, "tests.mcp.server"
    import bcc  # noqa: F401 — what the agent imports when it compiles its programs
    import uvloop  # noqa: F401

    import agent.daemon
    import agent.wiring  # noqa: F401
    from agent import cli
    from agent.attest.btf import offset_cflags

    # The running kernel's field offsets, read from its BTF once for every agent (about
    # 0.16 s of CPU each): the function caches them, as each agent does for its programs.
    offset_cflags()
    return cli.main, "agent"


def _run(kind: str, main, name: str, request: dict, fds: list[int]) -> None:
    """In the forked child: become `python -m <name> argv`, then exit as it would."""
    stdout, stderr, *listening = fds
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    os.close(stdout)
    os.close(stderr)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = [name, *(a for fd in listening for a in ("--fd", str(fd)))]
    sys.argv += request["argv"]
    code = 1
    try:
        result = main(sys.argv[1:]) if kind == "agent" else main()
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # noqa: BLE001 — shown in its log; the fork must never go back
        traceback.print_exc()  # into the zygote's loop
    finally:
        try:  # what the interpreter does at exit: non-daemon threads, then atexit
            threading._shutdown()  # type: ignore[attr-defined]
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


_statuses: dict[int, int] = {}  # child pid -> the write end of its status pipe


def _reap(_signum: int, _frame: object) -> None:
    """Collect every child that has exited (SIGCHLD), so none stays a zombie, and tell its
    status to whoever holds the read end of its pipe."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = _statuses.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, str(os.waitstatus_to_exitcode(status)).encode())
            except OSError:  # the worker no longer listens
                pass
            os.close(fd)


def _zygote_main(kind: str, control_fd: int) -> None:
    _die_with_parent()
    main, name = _preload(kind)
    zygote = os.getpid()
    signal.signal(signal.SIGCHLD, _reap)
    control = socket.socket(fileno=control_fd)
    while True:
        message, fds, _flags, _addr = socket.recv_fds(control, _MAX_REQUEST, 64)
        if not message:  # the worker closed its end, or died
            break
        status_r, status_w = os.pipe()
        # no reaping between the fork and the pidfd and status pipe: then no exit or pid
        # reuse can come between them either
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        pid = os.fork()
        if pid == 0:
            control.close()
            os.close(status_r)
            os.close(status_w)
            for held in _statuses.values():
                os.close(held)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            _die_with_parent()
            if os.getppid() != zygote:  # the zygote died before prctl: no one to serve
                os._exit(1)
            _run(kind, main, name, json.loads(message), fds)
        pidfd = os.pidfd_open(pid)
        _statuses[pid] = status_w
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        for fd in fds:
            os.close(fd)
        socket.send_fds(control, [json.dumps({"pid": pid}).encode()], [pidfd, status_r])
        os.close(pidfd)
        os.close(status_r)


if __name__ == "__main__":
    _zygote_main(sys.argv[1], int(sys.argv[2]))
