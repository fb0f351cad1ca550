"""The agent process: start components in order, serve until a signal, stop in reverse.

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
from pathlib import Path
from typing import Protocol

from agent.config import Config, parse_listen
from agent.observe.admin import AdminServer
from agent.observe.logging import AuditLog, get_logger
from agent.observe.metrics import Metrics, MetricsServer

log = get_logger("daemon")


class Component(Protocol):
    name: str

    def start(self) -> None: ...
    def stop(self) -> None: ...


class StartupError(Exception):
    """A component could not start; the message says what to do."""


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


class _Bound:
    """An HTTP endpoint as a component: a busy address fails start-up naming the setting."""

    def __init__(self, endpoint, setting: str):
        self.endpoint = endpoint
        self.setting = setting
        self.name = setting.split(".")[0]

    def start(self) -> None:
        try:
            self.endpoint.start()
        except OSError as e:
            host, port = self.endpoint.requested_address
            section = self.setting.split(".")[0]
            raise StartupError(
                f"{self.setting} {host}:{port}: {e.strerror}; choose a free "
                f"port or set {section}.enabled = false"
            ) from None
        log.info("listening", endpoint=self.name, address="{}:{}".format(*self.endpoint.address))

    def stop(self) -> None:
        self.endpoint.stop()


class Daemon:
    def __init__(self, cfg: Config, audit: AuditLog | None = None):
        self.cfg = cfg
        self.metrics = Metrics()
        self.audit = audit or AuditLog(
            cfg.agent.resolved_node_name(),
            file=cfg.audit.file,
            max_bytes=cfg.audit.max_bytes,
            backups=cfg.audit.backups,
            to_stream=cfg.audit.stdout,
            flush_interval=cfg.audit.flush_ms / 1000,
        )
        self.components: list[Component] = []
        from prometheus_client.core import CounterMetricFamily

        audit = self.audit

        class _AuditDropped:
            def collect(self):
                c = CounterMetricFamily(
                    "credless_audit_events_dropped", "Audit events that could not be written"
                )
                c.add_metric([], getattr(audit, "dropped", 0))
                yield c

        self.metrics.registry.register(_AuditDropped())
        # Order matters: attestation first (everything asks it), operator surfaces last.
        from agent.attest.attestor import Attestor

        kubelet = None
        if cfg.attest.kubelet.enabled:
            from agent.attest.kubelet import KubeletClient, KubeletError, expand_url

            k = cfg.attest.kubelet
            try:
                url = expand_url(k.url, os.environ)
            except KubeletError as e:
                raise StartupError(str(e)) from None
            kubelet = KubeletClient(
                url,
                token_file=k.token_file,
                ca_file=k.ca_file,
                cache_ttl_seconds=k.cache_ttl_seconds,
                insecure_skip_verify=k.insecure_skip_verify,
            )
        self.attestor = Attestor(
            cfg.attest,
            registry=self.metrics.registry,
            kubelet=kubelet,
            pin_dir=cfg.agent.bpf_pin_dir,
        )
        self.metrics.add_ready_check("attest", self.attestor.ready)
        self.components.append(self.attestor)

        from agent.identity.manager import IdentityManager

        self.identity = IdentityManager(
            cfg.identity, cfg.agent.state_dir, audit=self.audit, registry=self.metrics.registry
        )
        self.metrics.add_ready_check("identity", self.identity.ready)
        self.components.append(self.identity)
        self.reload_hooks = [self.identity.reload_entries]
        if cfg.workload_api.enabled:
            from agent.identity.workload_api import WorkloadApiServer

            # FetchJWTSVID refuses audiences naming an authorization server credless uses
            # (self.oauth, made below, is there before the first call)
            self.components.append(
                WorkloadApiServer(
                    cfg.workload_api.socket,
                    self.identity,
                    self.attestor,
                    audit=self.audit,
                    registry=self.metrics.registry,
                    authorization_servers=lambda: self.oauth.assertion_audiences(),
                )
            )
        if cfg.bundle_endpoint.enabled:
            from agent.identity.bundle_endpoint import BundleEndpoint

            host, port = parse_listen(cfg.bundle_endpoint.listen)
            self.components.append(
                _Bound(BundleEndpoint(self.identity, host, port), "bundle_endpoint.listen")
            )
        from agent.oauth.service import OAuthService

        _bundle_host, _bundle_port = parse_listen(cfg.bundle_endpoint.listen)
        self.oauth = OAuthService(
            cfg,
            self.identity,
            cfg.agent.state_dir,
            audit=self.audit,
            registry=self.metrics.registry,
            jwks_uri=f"http://{cfg.bundle_endpoint.listen}/jwks.json"
            if cfg.bundle_endpoint.enabled
            else None,
        )
        self.components.append(self.oauth)
        self.attestor.add_event_listener(self.identity.process_event)
        self.identity.on_identity_ended.append(self._identity_ended)
        if cfg.inject.enabled and cfg.servers:
            self._add_injection(cfg)
        self.admin = AdminServer(Path(cfg.agent.run_dir) / "admin.sock")
        self.admin.register("oauth_probe", self._oauth_probe)
        self.admin.register("status", self.status)
        self.admin.register("ps", lambda _req: [a.to_dict() for a in self.attestor.snapshot()])
        self.components.append(self.admin)
        if cfg.metrics.enabled:
            host, port = parse_listen(cfg.metrics.listen)
            self.components.append(
                _Bound(MetricsServer(self.metrics, host, port), "metrics.listen")
            )
        self._started: list[Component] = []
        self._stop = asyncio.Event()

    def _add_injection(self, cfg: Config) -> None:
        from agent.attest.cgroupfs import cgroup2_root
        from agent.inject.proxy import Proxy
        from agent.inject.redirect import Redirector, Target
        from agent.inject.upstreams import UpstreamConflict, UpstreamResolver

        resolver = UpstreamResolver(cfg.servers, retain=cfg.inject.resolve_retain_seconds)
        try:
            upstreams = resolver.refresh()
        except UpstreamConflict as e:
            raise StartupError(str(e)) from None
        root = cgroup2_root(cfg.attest.cgroup_root)
        if root is None:
            raise StartupError("no cgroup v2 mount: the redirect needs one (credless doctor)")
        inj = cfg.inject
        self.redirector = Redirector(
            cfg.agent.bpf_pin_dir,
            root,
            (inj.listen_host, inj.listen_port),
            inj.listen_port6,
            list(inj.managed_cgroups),
            fail_open=inj.fail_open,
            keep_on_stop=inj.keep_redirect_on_stop,
        )
        from agent.inject.tls import InjectionCA, upstream_context

        self.inject_ca = (
            InjectionCA(cfg.agent.state_dir, Path(cfg.agent.run_dir) / "inject-ca.crt")
            if any(u.scheme == "https" for u in upstreams.values())
            else None
        )
        from agent.policy.engine import PolicyEngine

        self.policy = PolicyEngine(
            cfg.policy, {s.name for s in cfg.servers}, registry=self.metrics.registry
        )
        self.components.append(self.policy)
        self.reload_hooks.append(self.policy.reload)
        self.proxy = Proxy(
            inj,
            upstreams,
            self.redirector,
            self.attestor,
            self.identity,
            self.oauth,
            audit=self.audit,
            registry=self.metrics.registry,
            ssl_context=upstream_context(inj.upstream_ca_file),
            policy=self.policy if cfg.policy.file else None,
            max_body=cfg.policy.max_body_bytes,
        )
        redirector = self.redirector

        def targets(ups) -> set:
            return {
                Target(h, p, inj.tls_listen_port if up.scheme == "https" else 0)
                for (h, p), up in ups.items()
            }

        async def follow_dns() -> None:
            """Servers' addresses as their names resolve now (UpstreamResolver)."""
            loop = asyncio.get_running_loop()
            while True:
                await asyncio.sleep(inj.resolve_interval_seconds)
                try:
                    fresh = await loop.run_in_executor(None, resolver.refresh)
                except Exception:  # keep following; the addresses known stay intercepted
                    log.exception("resolving MCP servers failed")
                    continue
                if fresh != self.proxy.upstreams:
                    redirector.set_targets(targets(fresh))
                    self.proxy.upstreams = fresh
                    log.info(
                        "MCP server addresses changed",
                        addresses=sorted(f"{h}:{p}" for h, p in fresh),
                    )

        class RedirectComponent:
            name = "redirect"

            def start(self) -> None:
                redirector.start()
                redirector.set_targets(targets(upstreams))

            def stop(self) -> None:
                redirector.stop()

        proxy = self.proxy

        from agent.inject.listeners import ProxyListeners

        listeners = ProxyListeners(inj, proxy, self.inject_ca)
        pods = None
        if inj.pod_netns:
            from agent.attest.cgroupfs import process_cgroup
            from agent.inject.netns import NetnsListeners

            pods = NetnsListeners(
                listeners.listen_specs(),
                listeners.serve,
                list(inj.managed_cgroups),
                process_cgroup(os.getpid()) or "/",
                inj.netns_scan_seconds,
                registry=self.metrics.registry,
            )
            self.attestor.add_event_listener(pods.process_event)

        class ProxyComponent:
            name = "proxy"
            dns: asyncio.Task | None = None

            async def astart(self) -> None:
                await listeners.astart()
                if pods is not None:
                    await pods.astart()
                redirector.set_agent_up(True)
                self.dns = (
                    asyncio.create_task(follow_dns()) if inj.resolve_interval_seconds > 0 else None
                )

            async def astop(self) -> None:
                if self.dns is not None:
                    self.dns.cancel()
                redirector.set_agent_up(False)
                if pods is not None:
                    await pods.astop()
                await listeners.astop()
                proxy.close()

        self.components += [RedirectComponent(), ProxyComponent()]
        self.metrics.add_ready_check(
            "redirect", lambda: (bool(redirector._links), f"{len(redirector.targets)} targets")
        )

    def _identity_ended(self, spiffe_id: str) -> None:
        if self.oauth.loop is not None:
            asyncio.run_coroutine_threadsafe(self.oauth.forget(spiffe_id), self.oauth.loop)

    def _oauth_probe(self, req: dict) -> dict:
        from agent.oauth.errors import OAuthError

        ident = self.identity.identity_for_id(str(req.get("spiffe_id", "")))
        if ident is None:
            raise RuntimeError(
                f"{req.get('spiffe_id')!r} is not an identity this agent can "
                "issue: no registration entry produces it"
            )
        try:
            return self.oauth.run_sync(self.oauth.probe(str(req.get("server", "")), ident))
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

    def status(self, _req: dict | None = None) -> dict:
        """What `credless status` shows: no secret, only names, fingerprints and times."""
        import time as _time

        now = _time.time()
        workloads = []
        users = self.identity.live_identities()
        for att in self.attestor.snapshot():
            ident = self.identity.resolve(att, quiet=True)
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
            for sid, svid in list(self.identity._svids.items())
        ]
        tokens = [
            {
                "spiffe_id": key[0],
                "server": key[1],
                "token_type": tok.token_type,
                "expires_in": int(tok.expires_at - now),
                "token_sha256": tok.fingerprint,
            }
            for key, tok in self.oauth.cache.tokens()
        ]
        redirector = getattr(self, "redirector", None)
        return {
            "workloads": workloads,
            "svids": svids,
            "tokens": tokens,
            "redirect_targets": sorted(f"{t.host}:{t.port}" for t in redirector.targets)
            if redirector
            else [],
            "redirect_counts": redirector.counts() if redirector else {},
            "bpf_events_lost": self.attestor.lost_events(),
        }

    def request_stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read what can change without a restart (registration entries)."""
        log.info("reload requested")
        for hook in self.reload_hooks:
            try:
                hook()
            except Exception:
                log.exception("reload failed")

    async def _start_all(self) -> None:
        for c in self.components:
            try:
                if hasattr(c, "astart"):
                    await c.astart()
                else:
                    c.start()
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
                if hasattr(c, "astop"):
                    await c.astop()
                else:
                    c.stop()
            except Exception:  # keep stopping the rest: leaking an attachment is worse
                log.exception("component stop failed", component=c.name)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        pidfile = PidFile(Path(self.cfg.agent.run_dir) / "credless.pid")
        self.audit.attach_loop(loop)
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
            self.audit.attach_loop(None)  # writes what the last iteration left pending
            pidfile.release()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            log.info("stopped")
