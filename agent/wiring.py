"""Builds the agent from its configuration: every component, in start-up order, and the
connections between them. The daemon (agent/daemon.py) runs what this builds.

Order matters: attestation first (everything asks it), then identity, the Workload API, the
bundle endpoint and OAuth, then the injection path (policy, redirect, proxy), operator
surfaces last. Stopping runs the list backwards.

Every module is imported here at the top: BCC, the one import that loads a native library
(libbcc), is imported inside the functions that load BPF programs (agent/bpfload.py,
agent/attest/events.py, agent/inject/redirect.py), so building the agent needs no kernel.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric

from agent.attest.attestor import Attestor
from agent.attest.cgroupfs import cgroup2_root, process_cgroup
from agent.attest.kubelet import KubeletClient
from agent.attest.kubelet_errors import KubeletError
from agent.attest.kubelet_settings import expand_server_name, expand_url
from agent.config import Config, KubeletSection
from agent.config_values import parse_listen
from agent.identity.bundle_endpoint import BundleEndpoint, default_jwks_uri
from agent.identity.manager import IdentityManager
from agent.identity.workload_api import WorkloadApiServer
from agent.inject.components import ProxyComponent, RedirectComponent
from agent.inject.listeners import ProxyListeners
from agent.inject.netns import NetnsListeners
from agent.inject.phantom import Binding, PhantomVerifier
from agent.inject.phantom_files import PhantomFiles
from agent.inject.proxy import Proxy
from agent.inject.redirect import Redirector
from agent.inject.tls import InjectionCA
from agent.inject.upstreams import UpstreamResolver
from agent.oauth.audiences import AuthorizationServerReader
from agent.oauth.prewarm import Prewarmer
from agent.oauth.service import OAuthService
from agent.oauth.trust import verifying_context
from agent.observe.admin import AdminServer
from agent.observe.http import HttpEndpoint
from agent.observe.logging import AuditLog, get_logger
from agent.observe.metrics import Metrics, MetricsServer
from agent.observe.recent import RecentEvents
from agent.observe.recent import attach as keep_recent_events
from agent.policy.engine import PolicyEngine

log = get_logger("daemon")


class StartupError(Exception):
    """A component could not start; the message says what to do."""


class Component(Protocol):
    """A part of the agent the daemon starts in order and stops in reverse. start() returns
    once the component serves (bound, attached); stop() undoes all of it."""

    @property
    def name(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class BlockingService(Protocol):
    """A component whose start() and stop() are plain calls (threads, BPF loads)."""

    @property
    def name(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Synchronous:
    """A BlockingService as a Component. Its calls run on the event loop, as start-up must
    finish each one before the next component starts anyway."""

    def __init__(self, service: BlockingService):
        self.service = service
        self.name = service.name

    async def start(self) -> None:
        self.service.start()

    async def stop(self) -> None:
        self.service.stop()


class BoundEndpoint:
    """An HTTP endpoint as a component: a busy address fails start-up naming the setting."""

    def __init__(self, endpoint: HttpEndpoint, setting: str):
        self.endpoint = endpoint
        self.setting = setting
        self.name = setting.split(".")[0]

    async def start(self) -> None:
        try:
            self.endpoint.start()
        except OSError as e:
            host, port = self.endpoint.requested_address
            raise StartupError(
                f"{self.setting} {host}:{port}: {e.strerror}; choose a free "
                f"port or set {self.name}.enabled = false"
            ) from None
        log.info("listening", endpoint=self.name, address="{}:{}".format(*self.endpoint.address))

    async def stop(self) -> None:
        self.endpoint.stop()


class AuditDropped:
    """credless_audit_events_dropped: audit events that could not be written."""

    def __init__(self, audit: AuditLog):
        self.audit = audit

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily(
            "credless_audit_events_dropped", "Audit events that could not be written"
        )
        c.add_metric([], self.audit.dropped)
        yield c


@dataclass
class Injection:
    """The injection path's parts a handover acts on (agent/handover.py)."""

    redirector: Redirector
    listeners: ProxyListeners
    pods: NetnsListeners | None
    proxy: ProxyComponent
    redirect: RedirectComponent


@dataclass
class Agent:
    """What build() made: the components in start-up order, and the parts the operator
    commands read (agent/daemon.py)."""

    cfg: Config
    metrics: Metrics
    audit: AuditLog
    attestor: Attestor
    identity: IdentityManager
    oauth: OAuthService
    admin: AdminServer
    components: list[Component] = field(default_factory=list)
    reload_hooks: list[Callable[[], object]] = field(default_factory=list)  # SIGHUP
    redirector: Redirector | None = None  # None: injection is off
    injection: Injection | None = None  # None: injection is off
    recent: RecentEvents | None = None  # the last audit lines, for `credless explain`


def build(cfg: Config, audit: AuditLog | None = None) -> Agent:
    """The agent cfg describes, not yet started. Raises StartupError for what the
    configuration asks that this host cannot give."""
    metrics = Metrics()
    registry = metrics.registry
    audit = audit or audit_log(cfg)
    registry.register(AuditDropped(audit))
    attestor = Attestor(
        cfg.attest,
        registry=registry,
        kubelet=kubelet_client(cfg.attest.kubelet, registry),
        pin_dir=cfg.agent.bpf_pin_dir,
    )
    identity = identity_manager(cfg, audit, registry)
    oauth = OAuthService(
        cfg,
        identity,
        cfg.agent.state_dir,
        audit=audit,
        registry=registry,
        jwks_uri=default_jwks_uri(cfg.bundle_endpoint),
    )
    agent = Agent(cfg, metrics, audit, attestor, identity, oauth, AdminServer(admin_socket(cfg)))
    agent.recent = keep_recent_events(audit)
    metrics.add_ready_check("attest", attestor.ready)
    metrics.add_ready_check("identity", identity.ready)
    agent.components += [Synchronous(attestor), Synchronous(identity)]
    agent.reload_hooks.append(identity.reload_entries)
    # reads every configured and pinned AS's metadata at start, so the Workload API knows
    # their endpoints on other origins too (it starts after OAuth, whose discovery it uses;
    # with no [[servers]] there is none to read)
    reader = None
    if cfg.servers:
        reader = AuthorizationServerReader(
            oauth.servers, oauth.issuers, oauth.server_metadata, registry=registry
        )
    if cfg.workload_api.enabled:
        # FetchJWTSVID refuses audiences naming an authorization server credless uses
        api = WorkloadApiServer(
            cfg.workload_api.socket,
            identity,
            attestor,
            audit=audit,
            registry=registry,
            authorization_servers=oauth.assertion_audiences,
            unread_authorization_servers=reader.unread if reader is not None else tuple,
        )
        agent.components.append(Synchronous(api))
    if cfg.bundle_endpoint.enabled:
        host, port = listen_address(cfg.bundle_endpoint.listen, "bundle_endpoint.listen")
        bundle = BundleEndpoint(identity, host, port, cfg.bundle_endpoint)
        agent.components.append(BoundEndpoint(bundle, "bundle_endpoint.listen"))
    agent.components.append(oauth)
    if reader is not None:
        agent.components.append(reader)
    attestor.add_event_listener(identity.process_event)
    identity.on_identity_ended.append(lambda spiffe_id: forget_tokens(oauth, spiffe_id))
    identity.on_identity_started.append(lambda spiffe_id: resume_tokens(oauth, spiffe_id))
    if cfg.inject.enabled and cfg.servers:
        add_injection(agent)
    agent.components.append(Synchronous(agent.admin))
    if cfg.metrics.enabled:
        host, port = listen_address(cfg.metrics.listen, "metrics.listen")
        agent.components.append(BoundEndpoint(MetricsServer(metrics, host, port), "metrics.listen"))
    return agent


def audit_log(cfg: Config) -> AuditLog:
    a = cfg.audit
    return AuditLog(
        cfg.agent.resolved_node_name(),
        file=a.file,
        max_bytes=a.max_bytes,
        backups=a.backups,
        to_stream=a.stdout,
        flush_interval=a.flush_ms / 1000,
    )


def listen_address(value: str, setting: str) -> tuple[str, int]:
    address = parse_listen(value)
    if address is None:  # config.load() refuses it: a Config made some other way
        raise StartupError(f"{setting}: {value!r} is not HOST:PORT")
    return address


def admin_socket(cfg: Config) -> Path:
    return Path(cfg.agent.run_dir) / "admin.sock"


def kubelet_client(
    k: KubeletSection, registry: CollectorRegistry | None = None
) -> KubeletClient | None:
    if not k.enabled:
        return None
    try:
        url = expand_url(k.url, os.environ)
        server_name = expand_server_name(k.server_name, os.environ)
    except KubeletError as e:
        raise StartupError(str(e)) from None
    return KubeletClient(
        url,
        token_file=k.token_file,
        ca_file=k.ca_file,
        cache_ttl_seconds=k.cache_ttl_seconds,
        insecure_skip_verify=k.insecure_skip_verify,
        server_name=server_name or None,
        registry=registry,
    )


def identity_manager(cfg: Config, audit: AuditLog, registry: CollectorRegistry) -> IdentityManager:
    """The identity manager, SVIDs from the source cfg.identity names."""
    return IdentityManager(cfg.identity, cfg.agent.state_dir, audit=audit, registry=registry)


def forget_tokens(oauth: OAuthService, spiffe_id: str) -> None:
    """An identity's last process has ended (called on the attestor's thread): its tokens,
    DPoP keys and registered clients go once oauth.token_grace_seconds have passed with no
    new process of it (docs/tokens.md), on the OAuth service's loop."""
    if oauth.loop is not None:
        asyncio.run_coroutine_threadsafe(oauth.forget(spiffe_id), oauth.loop)


def resume_tokens(oauth: OAuthService, spiffe_id: str) -> None:
    """An identity with no live process has one again (the attestor's thread): a pending
    drop of its tokens is cancelled. A task, like forget_tokens', so it never overtakes a
    forget submitted before it."""
    if oauth.loop is not None:
        asyncio.run_coroutine_threadsafe(oauth.resumed(spiffe_id), oauth.loop)


def add_prewarm(agent: Agent, policy: PolicyEngine, redirector: Redirector) -> None:
    """Tokens fetched on exec for the broker-mode servers with prewarm on (docs/prewarm.md),
    for processes in managed cgroups, and the servers the policy lets them initialize."""
    cfg = agent.cfg
    servers = [s.name for s in cfg.servers if s.prewarm and s.mode in ("broker", "phantom")]
    if not servers:
        return
    warm = Prewarmer(
        agent.identity,
        agent.oauth,
        servers,
        concurrency=cfg.inject.prewarm_concurrency,
        allowed=may_initialize(agent, policy),
        managed=lambda att: redirector.matcher.is_managed(att.cgroup_path),
        registry=agent.metrics.registry,
    )
    agent.attestor.add_listener(warm.attested)


def may_initialize(agent: Agent, policy: PolicyEngine) -> Callable[[str, str], bool]:
    """allowed(spiffe_id, server): the policy lets the identity `initialize` there, the first
    call any MCP client makes. A server it may not initialize is one it will not call: it
    gets neither a pre-warmed token nor a placeholder file."""
    cfg = agent.cfg

    def allowed(spiffe_id: str, server: str) -> bool:
        rules = policy.policy if cfg.policy.file else None
        return rules is None or rules.decide(spiffe_id, server, "initialize", None).allowed

    return allowed


def add_phantom_files(agent: Agent, policy: PolicyEngine, redirector: Redirector) -> None:
    """Placeholder files (docs/phantom.md, "A placeholder in a file"): for processes in
    managed cgroups whose entry names a phantom_dir, one file per phantom-mode server the
    policy lets them initialize, kept fresh while they live."""
    cfg = agent.cfg
    servers = [s.name for s in cfg.servers if s.mode == "phantom"]
    if not servers:
        return
    files = PhantomFiles(
        agent.identity,
        servers,
        allowed=may_initialize(agent, policy),
        managed=lambda att: redirector.matcher.is_managed(att.cgroup_path),
        audit=agent.audit,
        registry=agent.metrics.registry,
    )
    agent.attestor.add_listener(files.attested)
    agent.attestor.add_event_listener(files.process_event)
    agent.components.append(Synchronous(files))


def phantom_verifier(agent: Agent) -> PhantomVerifier | None:
    """The placeholder check when a server is in phantom mode (docs/phantom.md); a misused
    placeholder's holder loses its real token where its server says revoke."""
    cfg = agent.cfg
    if not any(s.mode == "phantom" for s in cfg.servers):
        return None
    revoking = {s.name for s in cfg.servers if s.mode == "phantom" and s.phantom_misuse == "revoke"}
    verifier = PhantomVerifier(agent.identity, registry=agent.metrics.registry)
    oauth, identity = agent.oauth, agent.identity

    def revoke(found: Binding, server: str) -> None:
        if found.server in revoking and oauth.loop is not None:
            holder = identity.identity_for_id(found.spiffe_id)
            reason = f"its placeholder was presented to {server!r} by another process"
            asyncio.run_coroutine_threadsafe(
                oauth.revoke(found.spiffe_id, holder, found.server, reason), oauth.loop
            )

    verifier.on_misuse.append(revoke)
    return verifier


def add_injection(agent: Agent) -> None:
    """The injection path: policy, the redirect and the proxy, for cfg.servers."""
    cfg, inj, registry = agent.cfg, agent.cfg.inject, agent.metrics.registry
    try:
        resolver = UpstreamResolver(
            cfg.servers, retain=inj.resolve_retain_seconds, upstream_ca_file=inj.upstream_ca_file
        )
        upstreams = resolver.refresh()
    except ValueError as e:  # two servers on one address, a workload_url that cannot map
        raise StartupError(str(e)) from None
    root = cgroup2_root(cfg.attest.cgroup_root)
    if root is None:
        raise StartupError("no cgroup v2 mount: the redirect needs one (credless doctor)")
    redirector = Redirector(cfg.agent.bpf_pin_dir, root, inj, audit=agent.audit, registry=registry)
    # the agent's kernel programs in one object: one BCC compile, at attestation's start
    agent.attestor.share_kernel_object(redirector)
    inject_ca = (
        InjectionCA(cfg.agent.state_dir, Path(cfg.agent.run_dir) / "inject-ca.crt")
        if any(u.workload_tls for u in upstreams.values())
        else None
    )
    policy = PolicyEngine(cfg.policy, {s.name for s in cfg.servers}, registry=registry)
    agent.components.append(Synchronous(policy))
    agent.reload_hooks.append(policy.reload)
    add_prewarm(agent, policy, redirector)
    add_phantom_files(agent, policy, redirector)
    proxy = Proxy(
        inj,
        upstreams,
        redirector,
        agent.attestor,
        agent.identity,
        agent.oauth,
        audit=agent.audit,
        registry=registry,
        # each https Upstream carries its server's own trust (trust.server_tls); this is
        # the fallback for an Upstream made without one
        ssl_context=verifying_context(inj.upstream_ca_file),
        policy=policy if cfg.policy.file else None,
        max_body=cfg.policy.max_body_bytes,
        phantom=phantom_verifier(agent),
    )
    listeners = ProxyListeners(inj, proxy, inject_ca)
    pods = None
    if inj.pod_netns:
        pods = NetnsListeners(
            listeners.listen_specs(),
            listeners.serve,
            list(inj.managed_cgroups),
            process_cgroup(os.getpid()) or "/",
            inj.netns_scan_seconds,
            registry=registry,
        )
        agent.attestor.add_event_listener(pods.process_event)
    listeners.pods = pods
    redirect_component = RedirectComponent(redirector, upstreams, inj.tls_listen_port)
    proxy_component = ProxyComponent(
        proxy,
        listeners,
        pods,
        redirector,
        resolver,
        inj.resolve_interval_seconds,
        inj.tls_listen_port,
    )
    agent.components += [redirect_component, proxy_component]
    agent.injection = Injection(redirector, listeners, pods, proxy_component, redirect_component)
    agent.metrics.add_ready_check(
        "redirect", lambda: (redirector.attached, f"{len(redirector.targets)} targets")
    )
    agent.redirector = redirector
