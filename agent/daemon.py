"""The agent process: start components in order, serve until a signal, stop in reverse.

The components are built from the configuration in agent/wiring.py; this module runs them,
and answers the operator commands about them (`credless status`, `ps`, `oauth probe`).

Start-up is shaped for systemd Type=notify: every component binds and attaches in start(),
so when `ready` is logged (and READY=1 sent to $NOTIFY_SOCKET) the agent really serves.
Shutdown stops components in reverse order, each of which detaches what it attached, so a
stopped agent leaves no BPF link, cgroup attachment, listener or pid file behind.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from agent import server_names
from agent.config import Config
from agent.explain import explain
from agent.oauth.errors import OAuthError
from agent.observe.logging import AuditLog, get_logger
from agent.wiring import Component, StartupError, build

log = get_logger("daemon")


def sd_notify(state: str) -> None:
    """Send a state line to systemd's notify socket, if there is one."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(state.encode())


class PidFile:
    """An flock-held pid file: a second agent on the same run_dir refuses to start."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode().strip() or "?"
            os.close(fd)
            raise StartupError(
                f"another credless agent (pid {other}) holds {self.path}; "
                "stop it or give this one another agent.run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


class Daemon:
    def __init__(self, cfg: Config, audit: AuditLog | None = None):
        self.cfg = cfg
        self.agent = build(cfg, audit)
        admin = self.agent.admin
        admin.register("oauth_probe", self._oauth_probe)
        admin.register("status", self.status)
        admin.register("ps", lambda _req: [a.to_dict() for a in self.agent.attestor.snapshot()])
        admin.register("explain", lambda req: explain(self.agent, req))
        self._started: list[Component] = []
        self._stop = asyncio.Event()

    def _oauth_probe(self, req: dict[str, Any]) -> dict[str, Any]:
        identity, oauth = self.agent.identity, self.agent.oauth
        ident = identity.identity_for_id(str(req.get("spiffe_id", "")))
        if ident is None:
            raise RuntimeError(
                f"{req.get('spiffe_id')!r} is not an identity this agent can "
                "issue: no registration entry produces it"
            )
        try:  # by name or URL, as every command takes a server (agent/server_names.py)
            server = server_names.resolve(self.cfg.servers, str(req.get("server", "")))
        except server_names.UnknownServer as e:
            raise RuntimeError(str(e)) from None
        try:
            return oauth.run_sync(oauth.probe(server.url, ident))
        except OAuthError as e:
            return {"error": e.to_dict()}

    async def _watchdog(self) -> None:
        """systemd WatchdogSec: ping from the event loop at half the interval, so a wedged
        loop (the proxy's) stops the pings and systemd restarts the agent."""
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if usec <= 0 or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
            return
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(usec / 2e6)

    def status(self, _req: dict[str, Any] | None = None) -> dict[str, Any]:
        """What `credless status` shows: no secret, only names, fingerprints and times."""
        identity, attestor = self.agent.identity, self.agent.attestor
        redirector = self.agent.redirector
        now = time.time()
        workloads = []
        users = identity.live_identities()
        for att in attestor.snapshot():
            ident = identity.resolve(att, quiet=True)
            if ident is not None:
                workloads.append(
                    {
                        "pid": att.tgid,
                        "exe": att.exe,
                        "spiffe_id": str(ident.spiffe_id),
                        "active": str(ident.spiffe_id) in users,
                    }
                )
        svids = [
            {
                "spiffe_id": sid,
                "not_after": svid.not_after.isoformat(),
                "expires_in": int(svid.not_after.timestamp() - now),
            }
            for sid, svid in identity.held_svids()
        ]
        tokens = [
            {
                "spiffe_id": key[0],
                "server": key[1],
                "token_type": tok.token_type,
                "expires_in": int(tok.expires_at - now),
                "token_sha256": tok.fingerprint,
            }
            for key, tok in self.agent.oauth.cache.tokens()
        ]
        return {
            "workloads": workloads,
            "svids": svids,
            "tokens": tokens,
            "redirect_targets": sorted(f"{t.host}:{t.port}" for t in redirector.targets)
            if redirector
            else [],
            "redirect_counts": redirector.counts() if redirector else {},
            "managed_cgroups": redirector.cgroups_status() if redirector else {},
            "bpf_events_lost": attestor.lost_events(),
        }

    def request_stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read what can change without a restart (registration entries)."""
        log.info("reload requested")
        for hook in self.agent.reload_hooks:
            try:
                hook()
            except Exception:
                log.exception("reload failed")

    async def _start_all(self) -> None:
        for c in self.agent.components:
            try:
                await c.start()
            except StartupError:
                raise
            except Exception as e:  # BCC and the kernel raise bare exceptions
                hint = "; `credless doctor` checks this host" if c.name == "attest" else ""
                raise StartupError(f"{c.name}: {e}{hint}") from e
            self._started.append(c)

    async def _stop_all(self) -> None:
        while self._started:
            c = self._started.pop()
            try:
                await c.stop()
            except Exception:  # keep stopping the rest: leaking an attachment is worse
                log.exception("component stop failed", component=c.name)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        pidfile = PidFile(Path(self.cfg.agent.run_dir) / "credless.pid")
        self.agent.audit.attach_loop(loop)
        try:
            pidfile.acquire()
            await self._start_all()
            # Everything built at start-up (BCC, gRPC, compiled programs, config) lives as
            # long as the agent: keep it out of the collector's scans, which otherwise cost
            # the proxy a full-heap walk every few thousand requests.
            gc.freeze()
            log.info("ready", pid=os.getpid(), components=[c.name for c in self._started])
            sd_notify("READY=1\nSTATUS=serving")
            watchdog = asyncio.create_task(self._watchdog())
            await self._stop.wait()
            watchdog.cancel()
            log.info("stopping")
            sd_notify("STOPPING=1")
            return 0
        except StartupError as e:
            log.error("start-up failed", error=str(e))
            return 1
        finally:
            await self._stop_all()
            self.agent.audit.attach_loop(None)  # writes what the last iteration left pending
            pidfile.release()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            log.info("stopped")
