"""A process that imports the MCP server (tests/mcp/server.py) once and forks one per test.

Why: the official MCP SDK takes about 1.3 s of CPU to import (pydantic builds its models),
and the suite starts some eighty servers on a 2-core machine whose tests are CPU-bound. A
fork of a process that has imported it starts serving at once. The server is the same code
run the same way (its `main()`, its arguments, its own process, stdout and stderr); only
the import is shared. The servers are the tests' remote peers, never workloads: nothing
attests them, so how they were started does not change what a test shows.

Each pytest worker starts one zygote on first use (`spawn`) and talks to it over a Unix
socket pair: a request is the server's arguments, its working directory and environment,
with its stdout, stderr and listening sockets passed as descriptors (SCM_RIGHTS); the answer
is the child's pid. The zygote exits when the worker's end of the socket closes (its
`atexit`, or the worker's death), and each server is sent SIGTERM when the zygote dies
(PR_SET_PDEATHSIG): nothing outlives the suite.

Why not fork the pytest worker itself: it runs threads (pytest-xdist's channel), and a
fork of a threaded process may copy a lock that another thread holds.
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


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


class ForkedServer:
    """A server the zygote forked: Popen's poll/wait/send_signal/kill, through a pidfd the
    zygote opened before the child could exit (the process is the zygote's child, not
    ours, and no pid reuse can mistake it). The zygote reaps it, so its exit status is not
    known here: returncode is 0 once it has exited, which is all
    tests.helpers.stop_process asks."""

    def __init__(self, pid: int, pidfd: int, stdout: int):
        self.pid = pid
        self._pidfd = pidfd
        self.stdout = os.fdopen(stdout, "r")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.wait(0) if self.returncode is None else self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None:
            readable, _, _ = select.select([self._pidfd], [], [], timeout)
            if not readable:
                if timeout == 0:
                    return None
                raise subprocess.TimeoutExpired(f"mcp server {self.pid}", timeout or 0)
            self.returncode = 0
            os.close(self._pidfd)
            self.stdout.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """One zygote process and the socket to it; spawn() may be called from any thread."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.mcp.zygote", str(theirs.fileno())],
            cwd=Path(__file__).resolve().parents[2],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.sock = ours
        self.lock = threading.Lock()
        atexit.register(self.close)

    def spawn(self, argv: list[str], cwd: Path, stderr: int, listening: list[int]) -> ForkedServer:
        read_end, write_end = os.pipe()
        request = json.dumps({"argv": argv, "cwd": str(cwd), "env": dict(os.environ)})
        try:
            with self.lock:
                socket.send_fds(self.sock, [request.encode()], [write_end, stderr, *listening])
                answer, pidfds, _flags, _addr = socket.recv_fds(self.sock, 4096, 1)
        finally:
            os.close(write_end)
        if not answer or len(pidfds) != 1:
            os.close(read_end)
            raise RuntimeError(f"the MCP server zygote exited ({self.proc.poll()})")
        return ForkedServer(json.loads(answer)["pid"], pidfds[0], read_end)

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_zygote: Zygote | None = None
_zygote_lock = threading.Lock()


def spawn(argv: list[str], cwd: Path, stderr: int, listening: list[int]) -> ForkedServer:
    """`python -m tests.mcp.server --fd N... argv` as a fork of this worker's zygote, its
    stdout a pipe (ForkedServer.stdout) and its stderr the descriptor given."""
    global _zygote
    with _zygote_lock:
        if _zygote is None or _zygote.proc.poll() is not None:
            _zygote = Zygote()
        zygote = _zygote
    return zygote.spawn(argv, cwd, stderr, listening)


# ---------------------------------------------------------------- the zygote's side
def _serve_one(server_main, request: dict, fds: list[int]) -> None:
    """In the forked child: become `python -m tests.mcp.server`, then exit."""
    stdout, stderr, *listening = fds
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    os.close(stdout)
    os.close(stderr)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = ["tests.mcp.server", *(a for fd in listening for a in ("--fd", str(fd)))]
    sys.argv += request["argv"]
    code = 1
    try:
        server_main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # noqa: BLE001 — shown in its log; the fork must never go back
        traceback.print_exc()  # into the zygote's loop
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(_signum: int, _frame: object) -> None:
    """Collect every server that has exited (SIGCHLD), so none stays a zombie."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _zygote_main(control_fd: int) -> None:
    _die_with_parent()
    from tests.mcp import server  # the import every server shares

    zygote = os.getpid()
    signal.signal(signal.SIGCHLD, _reap)
    control = socket.socket(fileno=control_fd)
    while True:
        message, fds, _flags, _addr = socket.recv_fds(control, _MAX_REQUEST, 64)
        if not message:  # the worker closed its end, or died
            break
        # no reaping between the fork and the pidfd: then no exit or pid reuse can come
        # between them either
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        pid = os.fork()
        if pid == 0:
            control.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            _die_with_parent()
            if os.getppid() != zygote:  # the zygote died before prctl: no one to serve
                os._exit(1)
            _serve_one(server.main, json.loads(message), fds)
        pidfd = os.pidfd_open(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        for fd in fds:
            os.close(fd)
        socket.send_fds(control, [json.dumps({"pid": pid}).encode()], [pidfd])
        os.close(pidfd)


if __name__ == "__main__":
    _zygote_main(int(sys.argv[1]))
