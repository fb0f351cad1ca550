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
import contextlib
import fcntl
import gc
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from agent import handover, server_names
from agent.config import Config
from agent.explain import explain
from agent.handover_tokens import adopt_tokens, export_tokens, resolve_adopted
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
    """An flock-held pid file: a second agent on the same run_dir refuses to start. The one
    way past it is a handover (agent/handover.py): the running agent sends the new one its
    descriptor of the file over the root-only handover socket, and with it the lock (an
    flock belongs to the open file, not to a process)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, wait: bool = False) -> None:
        """Lock and write this pid; wait: until the holder lets go (it is stopping)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not wait:
                break
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder removed the file as it let go: lock the next one
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

    def adopt(self, fd: int) -> None:
        """Hold the lock through a descriptor the running agent handed over: it must be
        this very file, locked (by that agent, through the same open file)."""
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise StartupError(f"the pid file handed over cannot be locked: {e}") from None
        if not same:
            os.close(fd)
            raise StartupError(f"the pid file handed over is not {self.path}")
        self._fd = fd

    def write_pid(self) -> None:
        """This process is the agent now (after a handover)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    @property
    def fd(self) -> int | None:
        """The locked pid file's descriptor (handed to a new agent), None when not held."""
        return self._fd

    def release(self, handed_over: bool = False) -> None:
        """Unlock and remove; handed over: only close, the new agent holds the lock."""
        if self._fd is not None:
            if not handed_over:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


class Daemon:
    def __init__(
        self,
        cfg: Config,
        audit: AuditLog | None = None,
        take_over: bool = False,
        ready_fd: int | None = None,
    ):
        self.cfg = cfg
        self.take_over = take_over  # a running agent's pid file lock: hand over, not refuse
        self.ready_fd = ready_fd  # `credless restart` reads the outcome here
        self.handed_over = False  # this agent handed over to a new one and is draining
        self.agent = build(cfg, audit)
        admin = self.agent.admin
        admin.register("oauth_probe", self._oauth_probe)
        admin.register("status", self.status)
        admin.register("ps", lambda _req: [a.to_dict() for a in self.agent.attestor.snapshot()])
        admin.register("explain", lambda req: explain(self.agent, req))
        self._started: list[Component] = []
        self._stop = asyncio.Event()
        self.pidfile = PidFile(Path(cfg.agent.run_dir) / "credless.pid")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._client: handover.HandoverClient | None = None  # taking over through it
        self.agent.components.append(
            handover.HandoverServer(
                Path(cfg.agent.run_dir) / handover.SOCKET_NAME,
                self._offer,
                self._release,
                self._handed_over,
                self._abort_handover,
            )
        )

    # ------------------------------------------------------------ handing over (old agent)
    def _offer(self) -> handover.Offer:
        listeners = []
        inj = self.agent.injection
        if inj is not None:
            listeners += [handover.describe(srv, 0) for srv in inj.listeners.listening()]
            if inj.pods is not None:
                for ino, servers in inj.pods.served.items():
                    listeners += [handover.describe(srv, ino) for srv in servers]
        fd = self.pidfile.fd
        if fd is None:
            raise handover.HandoverError("this agent holds no pid file")
        return handover.Offer(
            fd, listeners, export_tokens(self.agent.oauth), handover.tcp_endpoints(self.cfg)
        )

    async def _release(self) -> None:
        """`takeover`: accept nothing more, and let go of what the new agent binds next."""
        # identities ending from now on are the new agent's to clean up after (their
        # registered clients are in the state both share)
        self.agent.identity.on_identity_ended.clear()
        inj = self.agent.injection
        if inj is not None:
            inj.proxy.handed_over = inj.redirect.handed_over = True
            inj.listeners.stop_accepting()
            if inj.pods is not None:
                await inj.pods.stop()
        for c in reversed(list(self._started)):
            if c.name in handover.LATE:
                self._started.remove(c)
                try:
                    await c.stop()
                except Exception:
                    log.exception("component stop failed", component=c.name)

    def _handed_over(self) -> None:
        self.handed_over = True
        self.request_stop()

    def _abort_handover(self) -> None:
        """A new agent went away before taking over: its BPF programs may be in the pinned
        links, its process_images pin gone with it. Ours go back."""
        if self.agent.redirector is not None:
            self.agent.redirector.reclaim()
        handover.repin_process_images(self.agent.attestor)

    # ------------------------------------------------------------ taking over (new agent)
    async def _take_over(self) -> None:
        """The pid file is locked by a running agent: take its place (agent/handover.py).
        Raises StartupError (the running agent keeps serving) naming what failed."""
        loop = asyncio.get_running_loop()
        client = handover.HandoverClient(Path(self.cfg.agent.run_dir) / handover.SOCKET_NAME)
        try:
            fd, inherited, tokens = await loop.run_in_executor(None, client.offer)
        except handover.NoHandover:
            client.close()
            raise
        except handover.HandoverError as e:
            client.close()
            raise StartupError(str(e)) from None
        self._client = client
        # the running agent's process_images map is kept and shared (a new one would time
        # processes that exec'd since it started differently: each agent would refuse the
        # other's redirect records); needs agent/attest/events.py's reuse_pinned_images
        self.agent.attestor.source.reuse_pinned_images = True
        inj = self.agent.injection
        if inj is not None:  # until the takeover, leave the shared redirect as it is on stop
            inj.proxy.handed_over = inj.redirect.handed_over = True
        self.pidfile.adopt(fd)
        if inj is not None:
            inj.listeners.inherited = inherited.main
            inj.listeners.inherited_pods = inherited.pods
        else:
            inherited.close()
        log.info("taking over", old_pid=client.old_pid, listeners=len(inherited.main))
        await self._start_all(skip=handover.LATE)
        adopted = adopt_tokens(self.agent.oauth, self.agent.identity, tokens)
        try:
            handover.check_bindable(handover.tcp_endpoints(self.cfg), client.endpoints)
            await loop.run_in_executor(None, client.take_over)
        except handover.HandoverError as e:
            raise StartupError(str(e)) from None
        if inj is not None:
            inj.proxy.handed_over = inj.redirect.handed_over = False
        await self._start_all(only=handover.LATE)
        self.pidfile.write_pid()
        for key, value in client.notify.items():  # systemd gave these to the old agent
            os.environ.setdefault(key, value)
        if "WATCHDOG_USEC" in client.notify:
            os.environ["WATCHDOG_PID"] = str(os.getpid())
        self._background(resolve_adopted(self.agent.oauth, adopted))
        self._background(self._after_old_exit(client))
        log.info("took over", old_pid=client.old_pid, tokens=len(adopted))

    async def _replace(self, why: str) -> None:
        """The running agent cannot hand over (a version from before handovers): stop it
        and start once it has, as a restart does (its intercepted connects are refused in
        between). Once only: the next upgrade is a handover."""
        try:
            old = int(self.pidfile.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            raise StartupError(f"cannot take over: {why}; and no pid to stop") from None
        log.warning(
            "the running agent has no handover socket: stopping it, then starting "
            "(intercepted connects are refused in between, as at a restart)",
            old_pid=old,
            reason=why,
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGTERM)
        await asyncio.get_running_loop().run_in_executor(None, self.pidfile.acquire, True)
        await self._start_all()

    async def _after_old_exit(self, client: handover.HandoverClient) -> None:
        """The old agent holds the handover connection until it exits; then pins it
        removed on its way out are put back."""
        loop = asyncio.get_running_loop()
        client.sock.setblocking(False)
        with contextlib.suppress(OSError):
            while await loop.sock_recv(client.sock, 4096):
                pass
        client.close()
        handover.repin_process_images(self.agent.attestor)
        log.info("the agent taken over from has exited", old_pid=client.old_pid)

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _report(self, line: str) -> None:
        """Tell `credless restart` how start-up went (one line, then the pipe closes)."""
        if self.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.ready_fd, line.encode() + b"\n")
                os.close(self.ready_fd)
            self.ready_fd = None

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
            return oauth.run_sync(oauth.probe(server.url, ident, server.name))
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

    async def _start_all(
        self, skip: frozenset[str] = frozenset(), only: frozenset[str] | None = None
    ) -> None:
        for c in self.agent.components:
            if c.name in skip or (only is not None and c.name not in only):
                continue
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
        pidfile = self.pidfile
        self.agent.audit.attach_loop(loop)
        try:
            try:
                pidfile.acquire()
                taking_over = False
            except StartupError:
                if not self.take_over:
                    raise
                taking_over = True
            if taking_over:
                try:
                    await self._take_over()
                except handover.NoHandover as e:
                    await self._replace(str(e))
                    taking_over = False
            else:
                await self._start_all()
            # Everything built at start-up (BCC, gRPC, compiled programs, config) lives as
            # long as the agent: keep it out of the collector's scans, which otherwise cost
            # the proxy a full-heap walk every few thousand requests.
            gc.freeze()
            log.info("ready", pid=os.getpid(), components=[c.name for c in self._started])
            main = f"MAINPID={os.getpid()}\n" if taking_over else ""
            sd_notify(f"{main}READY=1\nSTATUS=serving")
            self._report(f"ok {os.getpid()}")
            watchdog = asyncio.create_task(self._watchdog())
            await self._stop.wait()
            watchdog.cancel()
            log.info("stopping", handed_over=self.handed_over)
            if not self.handed_over:  # the new agent is the service's main process now
                sd_notify("STOPPING=1")
            return 0
        except StartupError as e:
            log.error("start-up failed", error=str(e))
            self._report(f"error {e}")
            return 1
        finally:
            for t in list(self._tasks):
                t.cancel()
            await self._stop_all()
            if self._client is not None:  # after our stop: the old agent reclaims on EOF
                self._client.close()
            self.agent.audit.attach_loop(None)  # writes what the last iteration left pending
            pidfile.release(handed_over=self.handed_over or self._client is not None)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            log.info("stopped")
