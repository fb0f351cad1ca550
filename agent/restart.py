"""`credless restart`: start a new agent that takes over from the running one (handover,
agent/handover.py), wait until it serves or failed, and say which.

The new agent is started detached (its own session), with the same Python and this
package, as `credless run --take-over` does; on a systemd host in the running agent's
cgroup (the service's), so systemd keeps tracking it once it sends MAINPID. It reports its
outcome on a pipe: "ok PID" once it serves and the old agent drains, or "error CAUSE". The
command exits 0 on ok; 1 naming the cause otherwise, and then the old agent still serves.

Until agent/cli.py wires `restart` and `run --take-over` (the report has the diff), the same
is reachable as `python -m agent.restart [--config F]` and
`python -m agent.restart --run [--config F]` (a `run --take-over`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

from agent import config
from agent.attest.procfs import current_ids
from agent.peercred import not_the_agents_equal

READY_FD_ENV = "CREDLESS_READY_FD"
DEFAULT_TIMEOUT = 300.0  # BCC compiles at start-up: minutes on a small, loaded node


def _old_pid(run_dir: str) -> int | None:
    """The running agent's pid, from its pid file: None when the file names no process
    with the agent's privileges (the new agent is about to join its cgroup, which the
    redirect exempts, and the run directory may be mounted into pods)."""
    try:
        pid = int(Path(run_dir, "credless.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    ids = current_ids(pid)
    refused = "exited" if ids is None else not_the_agents_equal(pid, ids.uid, lambda: True)
    if refused is not None:
        print(f"credless: the pid file names no running agent ({refused})", file=sys.stderr)
        return None
    return pid


def _cgroup_of(pid: int) -> Path | None:
    """The cgroup v2 directory of pid (unified hierarchy), if it can be found."""
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
    except OSError:
        pass
    return None


# Started through a parent that exits at once, so that the new agent is the init system's
# child (systemd's, the subreaper) before it tells systemd MAINPID=: a main process that is
# not its child is one systemd cannot wait for, and at stop it kills it at once (verified
# under systemd 252: "code=killed, signal=KILL" mid-drain).
DETACH = (
    "import os, sys\nif os.fork() == 0:\n    os.setsid()\n    os.execv(sys.argv[1], sys.argv[1:])\n"
)


def start_new_agent(
    config_path: str | None, old_pid: int | None, extra: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """The new agent, detached; returns its (exiting) launcher and the read end of its
    outcome pipe."""
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "agent.restart", "--run"]
    if config_path:
        cmd += ["--config", config_path]
    cmd += extra or []
    procs = _cgroup_of(old_pid) if old_pid else None

    def preexec() -> None:
        # the running agent's cgroup: the same unit under systemd, and the cgroup its
        # redirect excludes (an agent's own upstream connects are never redirected)
        if procs is not None:
            try:
                (procs / "cgroup.procs").write_text("0")
            except OSError:
                pass

    proc = subprocess.Popen(  # noqa: S603 — this interpreter, this package
        [sys.executable, "-c", DETACH, *cmd],
        pass_fds=(w,),
        env={**os.environ, READY_FD_ENV: str(w)},
        preexec_fn=preexec,
    )
    os.close(w)
    proc.wait()  # the launcher: gone at once, the agent lives on
    return proc, r


def wait_outcome(proc: subprocess.Popen[bytes], r: int, timeout: float) -> tuple[bool, str]:
    """(ok, what to print) from the new agent's outcome line, or its exit."""
    data = b""
    with os.fdopen(r, "rb") as pipe:
        import select

        ready, _, _ = select.select([pipe], [], [], timeout)
        if ready:
            data = pipe.readline()
    line = data.decode(errors="replace").strip()
    if line.startswith("ok "):
        return True, f"credless: new agent (pid {line[3:]}) serves; the old one drains"
    if line.startswith("error "):
        return False, f"credless: restart failed, the running agent keeps serving: {line[6:]}"
    if not ready:
        return False, f"credless: the new agent did not report within {timeout}s"
    return False, (
        "credless: the new agent exited before serving (its log says why); "
        "the running agent keeps serving"
    )


def cmd_restart(args: argparse.Namespace) -> int:
    """credless restart [--config F] [--timeout S]"""
    cfg = config.load(args.config or config.DEFAULT_CONFIG_PATH)  # a bad config fails here
    old = _old_pid(cfg.agent.run_dir)
    extra: list[str] = []
    for flag in ("log_level", "log_format"):
        value = getattr(args, flag, None)
        if value:
            extra += [f"--{flag.replace('_', '-')}", value]
    proc, r = start_new_agent(args.config, old, extra)
    ok, message = wait_outcome(proc, r, getattr(args, "timeout", None) or DEFAULT_TIMEOUT)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_run_taking_over(args: argparse.Namespace) -> int:
    """`credless run --take-over`: as cmd_run, taking over from a running agent if one
    holds the pid file (and starting plainly if none does)."""
    from agent.daemon import Daemon, StartupError
    from agent.observe import logging as obs_logging

    ready = os.environ.pop(READY_FD_ENV, None)
    ready_fd = int(ready) if ready and ready.isdigit() else None
    cfg = config.load(args.config or config.DEFAULT_CONFIG_PATH)
    obs_logging.configure(
        level=args.log_level or cfg.log.level, fmt=args.log_format or cfg.log.format
    )
    try:
        daemon = Daemon(cfg, take_over=True, ready_fd=ready_fd)
    except StartupError as e:
        obs_logging.get_logger("daemon").error("start-up failed", error=str(e))
        if ready_fd is not None:
            os.write(ready_fd, f"error {e}\n".encode())
        return 1
    try:
        import uvloop
    except ImportError:
        return asyncio.run(daemon.run())
    return uvloop.run(daemon.run())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.restart")
    ap.add_argument("--config")
    ap.add_argument("--run", action="store_true", help="run, taking over (the new agent)")
    ap.add_argument("--timeout", type=float)
    ap.add_argument("--log-level", choices=config.LOG_LEVELS)
    ap.add_argument("--log-format", choices=config.LOG_FORMATS)
    args = ap.parse_args(argv)
    try:
        return cmd_run_taking_over(args) if args.run else cmd_restart(args)
    except config.ConfigError as e:
        print(f"credless: config error\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
