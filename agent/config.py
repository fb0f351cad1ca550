"""One validated configuration model, loaded from one TOML file.

Every error names the key path, the bad value and what is accepted, and all errors in a file
are reported together, so an operator fixes a file in one pass. Unknown keys are errors:
a misspelt hardening option silently ignored is worse than a refusal to start.

The schema is declared once, as frozen dataclasses read by the schema engine (agent/schema.py):
each key is one line, its default and its check (which says what is accepted), under a comment
saying what it means; `deploy/credless.example.toml` documents the same keys and defaults for
operators, and the tests load it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import schema
from agent.config_values import (
    cgroup_paths,
    check_trust_domain,
    https_url,
    ipv4_loopback,
    issuers,
    listen,
    loopback_listen,
    optional_issuer,
    optional_url,
    port,
    power_of_two,
    server_name,
    url,
)
from agent.schema import (
    OperatorFileError,
    absolute_path,
    at_least,
    between,
    one_of,
    positive,
    render,
    setting,
    used_twice,
)

DEFAULT_CONFIG_PATH = Path("/etc/credless/credless.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")

_SPIRE_ADMIN_SOCKET = "/tmp/spire-agent/private/admin.sock"  # noqa: S108 — SPIRE's default path


class ConfigError(OperatorFileError):
    """credless.toml is wrong."""


# ---------------------------------------------------------------- the model
@dataclass(frozen=True)
class AgentSection:
    # node name in audit events; empty means the host name
    node_name: str = setting("")
    # keys and CA material (0700)
    state_dir: str = setting("/var/lib/credless", absolute_path)
    # pid file and sockets
    run_dir: str = setting("/run/credless", absolute_path)
    # where BPF maps are pinned (bpffs)
    bpf_pin_dir: str = setting("/sys/fs/bpf/credless", absolute_path)

    def resolved_node_name(self) -> str:
        return self.node_name or socket.gethostname()


@dataclass(frozen=True)
class LogSection:
    # diagnostic log level
    level: str = setting("info", one_of(*LOG_LEVELS))
    # json lines, console, or auto (console on a TTY)
    format: str = setting("auto", one_of(*LOG_FORMATS))


@dataclass(frozen=True)
class MetricsSection:
    # serve /metrics, /healthz and /readyz
    enabled: bool = setting(True)
    # address of the metrics endpoint: loopback unless expose = true
    listen: str = setting("127.0.0.1:9890", listen("127.0.0.1:9890"))
    # allow a non-loopback listen address (e.g. for Prometheus scraping a hostNetwork DaemonSet);
    # metrics carry no secrets
    expose: bool = setting(False)


@dataclass(frozen=True)
class KubeletSection:
    # add k8s: selectors from the kubelet's /pods endpoint
    enabled: bool = setting(False)
    # kubelet URL; on Kubernetes use the node IP (status.hostIP): serving certificates rarely name
    # 127.0.0.1; ${VAR} is expanded from the environment, e.g. https://${NODE_IP}:10250
    url: str = setting("https://127.0.0.1:10250", https_url)
    # bearer token file, re-read on each refresh
    token_file: str = setting("/var/run/secrets/kubernetes.io/serviceaccount/token", absolute_path)
    # CA bundle that signed the kubelet's serving certificate
    ca_file: str = setting("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt", absolute_path)
    # name the kubelet's serving certificate must carry, instead of the url's host; ${VAR} is
    # expanded (kubeadm's self-signed certificate names only the node: "${NODE_NAME}"); empty
    # means the url's host
    server_name: str = setting("")
    # do not verify the kubelet's certificate (the last resort: deploy/k8s/README.md)
    insecure_skip_verify: bool = setting(False)
    # how long a /pods answer is reused
    cache_ttl_seconds: float = setting(5.0, positive)


@dataclass(frozen=True)
class AttestSection:
    # cgroup v2 mount point; empty means found in /proc/mounts
    cgroup_root: str = setting("", absolute_path)
    # how long an exited process stays answerable
    exit_grace_seconds: float = setting(5.0, positive)
    # BPF ring buffer size in pages (power of two)
    ring_buffer_pages: int = setting(1024, power_of_two)
    kubelet: KubeletSection = field(default_factory=KubeletSection)


@dataclass(frozen=True)
class IdentitySection:
    # the SPIFFE trust domain this node issues in
    trust_domain: str = setting("example.org", check_trust_domain)
    # registration entries; empty means none (no process gets an identity)
    entries_file: str = setting("/etc/credless/entries.toml", absolute_path)
    # X509-SVID lifetime; renewed at half-life
    x509_svid_ttl_seconds: int = setting(3600, between(60, 86400))
    # JWT-SVID lifetime
    jwt_svid_ttl_seconds: int = setting(300, between(10, 3600))
    # how often the JWT signing key rotates
    jwt_key_rotation_seconds: int = setting(86400, at_least(600))
    # iss claim of JWT-SVIDs; empty means the SPIFFE ID itself (what RFC 7523 validators expect of a
    # client assertion)
    jwt_issuer: str = setting("")
    # PEM intermediate CA issued by your organisation's CA; empty means a self-signed CA in
    # state_dir/ca
    upstream_ca_cert: str = setting("", absolute_path)
    # PEM private key of upstream_ca_cert (0600)
    upstream_ca_key: str = setting("", absolute_path)
    # PEM chain above upstream_ca_cert, ending with the root
    upstream_ca_chain: str = setting("", absolute_path)
    # where SVIDs come from: embedded (this agent's CA and entries) or spire (a SPIRE agent's
    # Delegated Identity API)
    source: str = setting("embedded", one_of("embedded", "spire"))
    # the SPIRE agent's admin socket (source = "spire")
    spire_admin_socket: str = setting(_SPIRE_ADMIN_SOCKET, absolute_path)


@dataclass(frozen=True)
class WorkloadApiSection:
    # serve the SPIFFE Workload API
    enabled: bool = setting(True)
    # unix socket path (mode 0666; callers are attested by their peer credentials)
    socket: str = setting("/run/credless/agent.sock", absolute_path)


@dataclass(frozen=True)
class BundleEndpointSection:
    # serve the trust bundle over HTTP
    enabled: bool = setting(True)
    # address of the bundle endpoint (a loopback address unless an authorization server elsewhere
    # needs it)
    listen: str = setting("127.0.0.1:8444", listen("127.0.0.1:8444"))
    # serve it over https with this certificate chain (PEM, leaf first); empty means plain http,
    # which only a loopback authorization server may be registered with
    cert_file: str = setting("", absolute_path)
    # private key of cert_file (PEM, 0600)
    key_file: str = setting("", absolute_path)


@dataclass(frozen=True)
class ServerSection:
    """One MCP server the agent obtains credentials for."""

    # name used in policy, metrics and audit
    name: str = setting("", server_name)
    # the MCP server URL (its RFC 8707 resource identifier)
    url: str = setting("", url)
    # client assertion profile: jwt-bearer (RFC 7523 private_key_jwt) or jwt-spiffe (IETF SPIFFE
    # client auth draft)
    auth_profile: str = setting("jwt-bearer", one_of("jwt-bearer", "jwt-spiffe"))
    # aud of the client assertion: the issuer identifier, or the token endpoint URL
    assertion_audience: str = setting("issuer", one_of("issuer", "token_endpoint"))
    # authorization server issuer; empty means discovered
    issuer: str = setting("", optional_issuer)
    # authorization servers (issuer URLs) that may receive this server's client assertions; the
    # first one the server's metadata names is used; empty means issuer if set, else the first one
    # discovered, pinned in <state_dir>/oauth/authorization_servers.json
    authorization_servers: list[str] = setting([], issuers)
    # scope to request; empty means the 401 challenge's, then the resource metadata's, then none
    scope: str = setting("")
    # preregistered (client_id = the SPIFFE ID or client_id) or dynamic (RFC 7591 with a software
    # statement)
    registration: str = setting("preregistered", one_of("preregistered", "dynamic"))
    # client_id for a preregistered client; empty means the SPIFFE ID
    client_id: str = setting("")
    # auto (when the server advertises it), always or never
    dpop: str = setting("auto", one_of("auto", "always", "never"))
    # broker (inject the access token), assertion (url is the authorization server's token endpoint:
    # the workload's own token requests get a JWT-SVID client assertion), passthrough (observe and
    # audit only) or phantom (as broker, and the workload may hold a placeholder credless swaps
    # for the token: docs/phantom.md)
    mode: str = setting("broker", one_of("broker", "assertion", "passthrough", "phantom"))
    # CA bundle that verifies this server's certificate, for every connection credless makes to it
    # (the token probe, its metadata, the requests it relays); empty means inject.upstream_ca_file,
    # then the system store
    ca_file: str = setting("", absolute_path)
    # for an https url: the plain http:// URL workloads call instead, mapped onto url (credless
    # originates the TLS, with SNI and Host from url); empty means workloads call url itself
    workload_url: str = setting("", optional_url)
    # assertion mode, a client_assertion the workload sent that is a JWT (its own credential):
    # refuse (HTTP 400) or replace it; a placeholder (not a JWT) is replaced, a missing one added
    workload_assertion: str = setting("refuse", one_of("refuse", "replace"))
    # phantom mode, a placeholder from a process it was not issued to, or sent to another server:
    # refuse it and revoke the real token of the identity it was issued to (RFC 7009; the next
    # request obtains a new one), or only refuse it
    phantom_misuse: str = setting("revoke", one_of("revoke", "refuse"))
    # broker mode: fetch the token when a matching process execs in a managed cgroup, before its
    # first request (docs/prewarm.md); other modes ignore it
    prewarm: bool = setting(True)


@dataclass(frozen=True)
class OAuthSection:
    # refresh a token after this fraction of its lifetime
    refresh_ahead: float = setting(0.8, between(0.1, 0.95))
    # how long discovery results are reused
    discovery_ttl_seconds: float = setting(300.0, positive)
    # timeout of each HTTP request to an authorization server
    request_timeout_seconds: float = setting(10.0, positive)
    # CA bundle for authorization servers; empty means the system store
    ca_file: str = setting("", absolute_path)
    # jwks_uri registered for dynamic clients; empty means the bundle endpoint's /jwks.json
    jwks_uri: str = setting("", optional_url)
    # an identity's tokens (and their DPoP key) are kept this long after its last process exits,
    # so the next process of the same identity reuses them; never past a token's expiry; 0: drop
    # them at once
    token_grace_seconds: float = setting(300.0, at_least(0))


@dataclass(frozen=True)
class InjectSection:
    # redirect MCP connections to the proxy and inject
    enabled: bool = setting(True)
    # IPv4 loopback address of the proxy
    listen_host: str = setting("127.0.0.1", ipv4_loopback)
    # proxy port on listen_host
    listen_port: int = setting(15001, port)
    # proxy port on [::1]
    listen_port6: int = setting(15001, port)
    # port of the TLS-intercepting listener (on listen_host and [::1]) for https servers
    tls_listen_port: int = setting(15002, port)
    # cgroup subtrees whose processes are redirected: paths or globs (a * within one component)
    # that may name cgroups not made yet (docs/cgroups.md); empty means every cgroup but the
    # agent's own
    managed_cgroups: list[str] = setting([], cgroup_paths)
    # a process without identity: deny (HTTP 403) or passthrough (forwarded as sent, nothing added
    # or removed)
    unattested: str = setting("deny", one_of("deny", "passthrough"))
    # Authorization/DPoP a workload sends: strip them, or reject the request (HTTP 400)
    workload_authorization: str = setting("strip", one_of("strip", "reject"))
    # while no agent listens, let intercepted connects go out untouched (default: they are refused)
    fail_open: bool = setting(False)
    # how often MCP server host names are resolved again (0: only at start)
    resolve_interval_seconds: float = setting(30.0, at_least(0))
    # how long an address a server's name no longer resolves to stays intercepted (workloads may
    # hold older answers)
    resolve_retain_seconds: float = setting(600.0, positive)
    # serve processes in network namespaces of their own (pods, containers) with a proxy listener
    # inside each; off: only processes on the agent's network are served, the others' intercepted
    # connects are refused
    pod_netns: bool = setting(True)
    # how often /proc is scanned for network namespaces gained or left by managed processes (a new
    # process's exec is seen at once)
    netns_scan_seconds: float = setting(5.0, positive)
    # leave the redirect attached (pinned under agent.bpf_pin_dir) when the agent stops, so a
    # restart never lets intercepted connects out uninjected; `credless detach` removes it
    keep_redirect_on_stop: bool = setting(True)
    # an idle upstream connection is closed rather than reused after this long; keep it under the
    # MCP servers' keep-alive timeouts (uvicorn: 5 s)
    upstream_idle_seconds: float = setting(4.0, positive)
    # a workload connection with no request in flight is closed after this long
    client_idle_seconds: float = setting(300.0, positive)
    # a request whose head or body stops arriving for this long is answered 408 and its connection
    # closed
    request_timeout_seconds: float = setting(60.0, positive)
    # connecting (and the TLS handshake) to an MCP server; then 502
    upstream_connect_timeout_seconds: float = setting(10.0, positive)
    # from a request sent to an MCP server to its response head; then 504 (a response that has
    # begun, an SSE stream, is not cut)
    upstream_timeout_seconds: float = setting(300.0, positive)
    # on stop, requests in flight get this long to finish (idle connections are closed at once, new
    # ones refused); keep it under the stop timeout (systemd TimeoutStopSec, Kubernetes
    # terminationGracePeriodSeconds)
    drain_seconds: float = setting(10.0, between(0, 600))
    # largest request head (request line and header fields) a workload may send; larger: HTTP 431
    # and the connection closed
    max_head_bytes: int = setting(65536, between(1024, 1 << 24))
    # most header fields in a request head; more: HTTP 431 and the connection closed
    max_header_fields: int = setting(100, between(8, 10000))
    # idle upstream connections kept per identity and server
    upstream_pool_size: int = setting(16, positive)
    # CA bundle for https MCP servers without a servers.ca_file of their own; empty means the
    # system store
    upstream_ca_file: str = setting("", absolute_path)
    # token pre-fetches on exec (servers.prewarm) running at once, across all identities
    prewarm_concurrency: int = setting(4, between(1, 64))


@dataclass(frozen=True)
class PolicySection:
    # MCP policy file (see deploy/policy.example.toml); empty means no policy: every call is allowed
    # and audited
    file: str = setting("", absolute_path)
    # largest JSON-RPC body inspected; larger ones are refused (413)
    max_body_bytes: int = setting(1048576, positive)
    # a process spawned by another identity's process: inherit (its own rules only) or
    # restrict_to_parent (also limited to what its parent may do)
    subagents: str = setting("inherit", one_of("inherit", "restrict_to_parent"))


@dataclass(frozen=True)
class AuditSection:
    # write audit events as JSON lines on stdout
    stdout: bool = setting(True)
    # also append them to this file (0600), rotated by size
    file: str = setting("", absolute_path)
    # rotate the audit file at this size
    max_bytes: int = setting(52428800, positive)
    # rotated audit files kept (file.1 ... file.N)
    backups: int = setting(5, at_least(1))
    # under load, write the proxy's audit events together at most this often (milliseconds; a quiet
    # spell's first event is written at once; 0: every loop iteration)
    flush_ms: float = setting(5.0, between(0, 1000))


@dataclass(frozen=True)
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    log: LogSection = field(default_factory=LogSection)
    audit: AuditSection = field(default_factory=AuditSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    attest: AttestSection = field(default_factory=AttestSection)
    identity: IdentitySection = field(default_factory=IdentitySection)
    workload_api: WorkloadApiSection = field(default_factory=WorkloadApiSection)
    bundle_endpoint: BundleEndpointSection = field(default_factory=BundleEndpointSection)
    oauth: OAuthSection = field(default_factory=OAuthSection)
    inject: InjectSection = field(default_factory=InjectSection)
    policy: PolicySection = field(default_factory=PolicySection)
    # [[servers]]: the MCP servers the agent obtains credentials for
    servers: tuple[ServerSection, ...] = setting(())


# ---------------------------------------------------------------- cross-checks
def _check_metrics(cfg: Config, problems: list[str]) -> None:
    if not cfg.metrics.expose and loopback_listen(cfg.metrics.listen):
        problems.append(
            f"metrics.listen: got {render(cfg.metrics.listen)}, expected "
            f"{loopback_listen(cfg.metrics.listen)}; set metrics.expose = true "
            "to serve it beyond the node's loopback"
        )


def _check_servers(cfg: Config, problems: list[str]) -> None:
    seen: set[str] = set()
    for i, srv in enumerate(cfg.servers):
        where = f"servers[{i}]"
        for key in ("name", "url"):
            if not getattr(srv, key):
                problems.append(f"{where}.{key}: required")
        if srv.mode == "assertion" and not srv.issuer:
            problems.append(
                f'{where}.issuer: required with mode = "assertion" (the '
                "assertion's audience is the authorization server's issuer)"
            )
        if srv.mode == "assertion" and srv.url:
            # the proxy puts client assertions into requests to this URL: the same rule as
            # for every endpoint assertions go to (agent/oauth/trust.py)
            from agent.oauth.trust import insecure_reason

            reason = insecure_reason(srv.url)
            if reason is not None:
                problems.append(f'{where}.url: {srv.url!r} with mode = "assertion": {reason}')
        if srv.name in seen:
            problems.append(f"{where}.name: {used_twice('name', srv.name)}")
        seen.add(srv.name)


def _check_jwks_uri(cfg: Config, problems: list[str]) -> None:
    """An authorization server verifies a dynamic client's assertions with the keys at its
    registered jwks_uri: fetched in clear from another host, they could be anyone's."""
    b = cfg.bundle_endpoint
    if bool(b.cert_file) != bool(b.key_file):
        problems.append(
            "bundle_endpoint: cert_file and key_file go together; set both to serve https, "
            "or neither"
        )
    if not any(s.registration == "dynamic" for s in cfg.servers):
        return
    from agent.identity.bundle_endpoint import default_jwks_uri
    from agent.oauth.trust import insecure_reason

    uri = cfg.oauth.jwks_uri or default_jwks_uri(b)
    if uri is None:
        problems.append(
            'oauth.jwks_uri: required with registration = "dynamic" while '
            "bundle_endpoint.enabled = false (the authorization server needs the keys)"
        )
        return
    reason = insecure_reason(uri)
    if reason is not None:
        where = "oauth.jwks_uri" if cfg.oauth.jwks_uri else "bundle_endpoint.listen"
        problems.append(
            f"{where}: the jwks_uri registered for dynamic clients would be {uri!r}: {reason}; "
            "serve the bundle endpoint over https (bundle_endpoint.cert_file, key_file) or "
            "set oauth.jwks_uri to an https URL"
        )


def parse(data: Mapping[str, Any], source: str = "<config>") -> Config:
    problems: list[str] = []
    cfg = schema.build(Config, data, problems)
    # the cross-checks read a whole, well-typed model: only once every key is right
    if cfg is not None:
        _check_metrics(cfg, problems)
        _check_servers(cfg, problems)
        _check_jwks_uri(cfg, problems)
    if cfg is None or problems:
        raise ConfigError(source, problems)
    return cfg


def load(path: str | os.PathLike[str]) -> Config:
    missing = "create it (deploy/credless.example.toml documents every key) or pass --config FILE"
    return parse(schema.read_toml(path, ConfigError, missing), str(path))


def iter_settings() -> Iterator[tuple[str, Any]]:
    """(key path, default) for every setting: the example config is checked against it."""
    return schema.iter_settings(Config)
