"""One validated configuration model, loaded from one TOML file.

Every error names the key path, the bad value and what is accepted, and all errors in a file
are reported together, so an operator fixes a file in one pass. Unknown keys are errors:
a misspelt hardening option silently ignored is worse than a refusal to start.

The schema is declared once, as frozen dataclasses whose field metadata carries the check
and the human description of what is accepted; `deploy/credless.example.toml` documents the
same defaults and the tests load it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

DEFAULT_CONFIG_PATH = Path("/etc/credless/credless.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")

# SPIFFE-ID.md §2.1: lowercase letters, digits, '.', '-', '_'; at most 255 bytes.
_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]+$")


class ConfigError(Exception):
    """All problems found in one configuration file, each on its own line."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


# ---------------------------------------------------------------- field checks
# A check returns None when the value is fine, else the description of what is accepted.
Check = Callable[[Any], "str | None"]


def _one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else "one of: " + ", ".join(choices)

    return check


def _positive(v: Any) -> str | None:
    return None if v > 0 else "a number greater than 0"


def _absolute_path(v: Any) -> str | None:
    return None if v == "" or os.path.isabs(v) else "an absolute path"


def _loopback_listen(v: Any) -> str | None:
    accepted = 'a loopback HOST:PORT such as "127.0.0.1:9890" or "[::1]:9890"'
    addr = parse_listen(v)
    if addr is None:
        return accepted
    try:
        if not ipaddress.ip_address(addr[0]).is_loopback:
            return accepted + " (the metrics endpoint is never exposed beyond the node)"
    except ValueError:
        return accepted
    return None


def check_trust_domain(v: Any) -> str | None:
    accepted = (
        "a SPIFFE trust domain: 1-255 characters of lowercase letters, digits, "
        "'.', '-', '_', with no scheme, port or path (e.g. \"example.org\")"
    )
    if not isinstance(v, str) or not v or len(v.encode()) > 255 or not _TRUST_DOMAIN_RE.match(v):
        return accepted
    return None


def parse_listen(v: str) -> tuple[str, int] | None:
    """'127.0.0.1:9890' or '[::1]:9890' -> (host, port); None when malformed."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})", v or "")
    if not m:
        return None
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        return None
    return host, port


def _setting(default: Any, doc: str, check: Check | None = None) -> Any:
    meta = {"doc": doc, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------- the model
@dataclass(frozen=True)
class AgentSection:
    node_name: str = _setting("", "node name in audit events; empty means the host name")
    state_dir: str = _setting("/var/lib/credless", "keys and CA material (0700)", _absolute_path)
    run_dir: str = _setting("/run/credless", "pid file and sockets", _absolute_path)
    bpf_pin_dir: str = _setting(
        "/sys/fs/bpf/credless", "where BPF maps are pinned (bpffs)", _absolute_path
    )

    def resolved_node_name(self) -> str:
        return self.node_name or socket.gethostname()


@dataclass(frozen=True)
class LogSection:
    level: str = _setting("info", "diagnostic log level", _one_of(*LOG_LEVELS))
    format: str = _setting(
        "auto", "json lines, console, or auto (console on a TTY)", _one_of(*LOG_FORMATS)
    )


@dataclass(frozen=True)
class MetricsSection:
    enabled: bool = _setting(True, "serve /metrics, /healthz and /readyz")
    listen: str = _setting(
        "127.0.0.1:9890",
        "address of the metrics endpoint: loopback unless expose = true",
        lambda v: None if parse_listen(v) else 'HOST:PORT such as "127.0.0.1:9890"',
    )
    expose: bool = _setting(
        False,
        "allow a non-loopback listen address (e.g. for Prometheus "
        "scraping a hostNetwork DaemonSet); metrics carry no secrets",
    )


@dataclass(frozen=True)
class KubeletSection:
    enabled: bool = _setting(False, "add k8s: selectors from the kubelet's /pods endpoint")
    url: str = _setting(
        "https://127.0.0.1:10250",
        "kubelet URL; on Kubernetes use the node IP "
        "(status.hostIP): serving certificates rarely name 127.0.0.1; "
        "${VAR} is expanded from the environment, e.g. https://${NODE_IP}:10250",
        lambda v: None if v.startswith("https://") else "an https:// URL",
    )
    token_file: str = _setting(
        "/var/run/secrets/kubernetes.io/serviceaccount/token",
        "bearer token file, re-read on each refresh",
        _absolute_path,
    )
    ca_file: str = _setting(
        "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        "CA bundle that signed the kubelet's serving certificate",
        _absolute_path,
    )
    insecure_skip_verify: bool = _setting(
        False, "do not verify the kubelet's certificate (never in production)"
    )
    cache_ttl_seconds: float = _setting(5.0, "how long a /pods answer is reused", _positive)


@dataclass(frozen=True)
class AttestSection:
    cgroup_root: str = _setting(
        "", "cgroup v2 mount point; empty means found in /proc/mounts", _absolute_path
    )
    exit_grace_seconds: float = _setting(
        5.0, "how long an exited process stays answerable", _positive
    )
    ring_buffer_pages: int = _setting(
        1024,
        "BPF ring buffer size in pages (power of two)",
        lambda v: None if v > 0 and v & (v - 1) == 0 else "a power of two greater than 0",
    )
    kubelet: KubeletSection = field(default_factory=KubeletSection)


@dataclass(frozen=True)
class IdentitySection:
    trust_domain: str = _setting(
        "example.org", "the SPIFFE trust domain this node issues in", check_trust_domain
    )
    entries_file: str = _setting(
        "/etc/credless/entries.toml",
        "registration entries; empty means none (no process gets an identity)",
        _absolute_path,
    )
    x509_svid_ttl_seconds: int = _setting(
        3600,
        "X509-SVID lifetime; renewed at half-life",
        lambda v: None if 60 <= v <= 86400 else "between 60 and 86400",
    )
    jwt_svid_ttl_seconds: int = _setting(
        300, "JWT-SVID lifetime", lambda v: None if 10 <= v <= 3600 else "between 10 and 3600"
    )
    jwt_key_rotation_seconds: int = _setting(
        86400,
        "how often the JWT signing key rotates",
        lambda v: None if v >= 600 else "at least 600",
    )
    jwt_issuer: str = _setting(
        "",
        "iss claim of JWT-SVIDs; empty means the SPIFFE ID itself "
        "(what RFC 7523 validators expect of a client assertion)",
    )
    upstream_ca_cert: str = _setting(
        "",
        "PEM intermediate CA issued by your organisation's "
        "CA; empty means a self-signed CA in state_dir/ca",
        _absolute_path,
    )
    upstream_ca_key: str = _setting(
        "", "PEM private key of upstream_ca_cert (0600)", _absolute_path
    )
    upstream_ca_chain: str = _setting(
        "", "PEM chain above upstream_ca_cert, ending with the root", _absolute_path
    )
    source: str = _setting(
        "embedded",
        "where SVIDs come from: embedded (this agent's CA and "
        "entries) or spire (a SPIRE agent's Delegated Identity API)",
        _one_of("embedded", "spire"),
    )
    spire_admin_socket: str = _setting(
        "/tmp/spire-agent/private/admin.sock",  # noqa: S108 — SPIRE's default path
        'the SPIRE agent\'s admin socket (source = "spire")',
        _absolute_path,
    )


@dataclass(frozen=True)
class WorkloadApiSection:
    enabled: bool = _setting(True, "serve the SPIFFE Workload API")
    socket: str = _setting(
        "/run/credless/agent.sock",
        "unix socket path (mode 0666; callers are attested by their peer credentials)",
        _absolute_path,
    )


@dataclass(frozen=True)
class BundleEndpointSection:
    enabled: bool = _setting(True, "serve the trust bundle over HTTP")
    listen: str = _setting(
        "127.0.0.1:8444",
        "address of the bundle endpoint (a loopback "
        "address unless an authorization server elsewhere needs it)",
        lambda v: None if parse_listen(v) else 'HOST:PORT such as "127.0.0.1:8444"',
    )


def _url(v: Any) -> str | None:
    return (
        None
        if isinstance(v, str) and re.match(r"^https?://[^/\s]+", v)
        else 'an absolute http(s) URL such as "https://mcp.example.com/mcp"'
    )


def _optional_url(v: Any) -> str | None:
    return None if v == "" else _url(v)


_ISSUER = (
    "https, or http only to a loopback host (127.0.0.0/8, ::1, localhost), with no "
    'query or fragment, such as "https://as.example.com"'
)


def _issuer(v: Any) -> str | None:
    """An authorization server issuer identifier (RFC 8414 §2) the agent may send
    assertions to: the rule it also applies at run time (agent/oauth/trust.py)."""
    from agent.oauth.trust import insecure_reason

    ok = (
        isinstance(v, str)
        and not _url(v)
        and not insecure_reason(v)
        and "?" not in v
        and "#" not in v
    )
    return None if ok else "an issuer URL: " + _ISSUER


def _optional_issuer(v: Any) -> str | None:
    return None if v == "" else _issuer(v)


def _issuers(v: Any) -> str | None:
    ok = isinstance(v, list) and not any(_issuer(x) for x in v)
    return None if ok else "a list of issuer URLs, each " + _ISSUER


@dataclass(frozen=True)
class ServerSection:
    """One MCP server the agent obtains credentials for."""

    name: str = _setting(
        "",
        "name used in policy, metrics and audit",
        lambda v: (
            None
            if re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", v)
            else "1-63 characters of lowercase letters, digits, '.', '_', '-'"
        ),
    )
    url: str = _setting("", "the MCP server URL (its RFC 8707 resource identifier)", _url)
    auth_profile: str = _setting(
        "jwt-bearer",
        "client assertion profile: jwt-bearer "
        "(RFC 7523 private_key_jwt) or jwt-spiffe (IETF SPIFFE "
        "client auth draft)",
        _one_of("jwt-bearer", "jwt-spiffe"),
    )
    assertion_audience: str = _setting(
        "issuer",
        "aud of the client assertion: the issuer identifier, or the token endpoint URL",
        _one_of("issuer", "token_endpoint"),
    )
    issuer: str = _setting(
        "", "authorization server issuer; empty means discovered", _optional_issuer
    )
    authorization_servers: list = _setting(
        [],
        "authorization servers (issuer URLs) that may "
        "receive this server's client assertions; the "
        "first one the server's metadata names is used; "
        "empty means issuer if set, else the first one "
        "discovered, pinned in <state_dir>/oauth/"
        "authorization_servers.json",
        _issuers,
    )
    scope: str = _setting(
        "",
        "scope to request; empty means the 401 challenge's, then the "
        "resource metadata's, then none",
    )
    registration: str = _setting(
        "preregistered",
        "preregistered (client_id = the SPIFFE ID "
        "or client_id) or dynamic (RFC 7591 with a software "
        "statement)",
        _one_of("preregistered", "dynamic"),
    )
    client_id: str = _setting("", "client_id for a preregistered client; empty means the SPIFFE ID")
    dpop: str = _setting(
        "auto",
        "auto (when the server advertises it), always or never",
        _one_of("auto", "always", "never"),
    )
    mode: str = _setting(
        "broker",
        "broker (inject the access token), assertion (url is the "
        "authorization server's token endpoint: the workload's own token "
        "requests get a JWT-SVID client assertion) or passthrough (observe "
        "and audit only)",
        _one_of("broker", "assertion", "passthrough"),
    )


@dataclass(frozen=True)
class OAuthSection:
    refresh_ahead: float = _setting(
        0.8,
        "refresh a token after this fraction of its lifetime",
        lambda v: None if 0.1 <= v <= 0.95 else "between 0.1 and 0.95",
    )
    discovery_ttl_seconds: float = _setting(
        300.0, "how long discovery results are reused", _positive
    )
    request_timeout_seconds: float = _setting(
        10.0, "timeout of each HTTP request to an authorization server", _positive
    )
    ca_file: str = _setting(
        "", "CA bundle for authorization servers; empty means the system store", _absolute_path
    )
    jwks_uri: str = _setting(
        "",
        "jwks_uri registered for dynamic clients; empty means the bundle endpoint's /jwks.json",
        _optional_url,
    )


def _cgroup_paths(v: Any) -> str | None:
    ok = isinstance(v, list) and all(isinstance(p, str) and p.startswith("/") for p in v)
    return (
        None
        if ok
        else "a list of cgroup paths relative to the cgroup v2 root, like "
        '["/system.slice/agent.service"]'
    )


@dataclass(frozen=True)
class InjectSection:
    enabled: bool = _setting(True, "redirect MCP connections to the proxy and inject")
    listen_host: str = _setting(
        "127.0.0.1",
        "IPv4 loopback address of the proxy",
        lambda v: None if v.startswith("127.") else "a 127.x.y.z address",
    )
    listen_port: int = _setting(
        15001, "proxy port on listen_host", lambda v: None if 0 < v < 65536 else "a port 1-65535"
    )
    listen_port6: int = _setting(
        15001, "proxy port on [::1]", lambda v: None if 0 < v < 65536 else "a port 1-65535"
    )
    tls_listen_port: int = _setting(
        15002,
        "port of the TLS-intercepting listener (on listen_host and [::1]) for https servers",
        lambda v: None if 0 < v < 65536 else "a port 1-65535",
    )
    managed_cgroups: list = _setting(
        [],
        "cgroup subtrees whose processes are redirected; "
        "empty means every cgroup but the agent's own",
        _cgroup_paths,
    )
    unattested: str = _setting(
        "deny",
        "a process without identity: deny (HTTP 403) or "
        "passthrough (forwarded as sent, nothing added or removed)",
        _one_of("deny", "passthrough"),
    )
    workload_authorization: str = _setting(
        "strip",
        "Authorization/DPoP a workload sends: strip them, or reject the request (HTTP 400)",
        _one_of("strip", "reject"),
    )
    fail_open: bool = _setting(
        False,
        "while no agent listens, let intercepted connects go "
        "out untouched (default: they are refused)",
    )
    resolve_interval_seconds: float = _setting(
        30.0,
        "how often MCP server host names are resolved again (0: only at start)",
        lambda v: None if v >= 0 else "0 or more",
    )
    resolve_retain_seconds: float = _setting(
        600.0,
        "how long an address a server's name no "
        "longer resolves to stays intercepted (workloads "
        "may hold older answers)",
        _positive,
    )
    pod_netns: bool = _setting(
        True,
        "serve processes in network namespaces of their own "
        "(pods, containers) with a proxy listener inside each; off: "
        "only processes on the agent's network are served, the "
        "others' intercepted connects are refused",
    )
    netns_scan_seconds: float = _setting(
        5.0,
        "how often /proc is scanned for network "
        "namespaces gained or left by managed processes "
        "(a new process's exec is seen at once)",
        _positive,
    )
    keep_redirect_on_stop: bool = _setting(
        True,
        "leave the redirect attached (pinned under "
        "agent.bpf_pin_dir) when the agent stops, so a "
        "restart never lets intercepted connects out "
        "uninjected; `credless detach` removes it",
    )
    upstream_idle_seconds: float = _setting(
        4.0,
        "an idle upstream connection is closed rather "
        "than reused after this long; keep it under the "
        "MCP servers' keep-alive timeouts (uvicorn: 5 s)",
        _positive,
    )
    client_idle_seconds: float = _setting(
        300.0,
        "a workload connection with no request in flight is closed after this long",
        _positive,
    )
    request_timeout_seconds: float = _setting(
        60.0,
        "a request whose head or body stops "
        "arriving for this long is answered 408 and "
        "its connection closed",
        _positive,
    )
    upstream_connect_timeout_seconds: float = _setting(
        10.0, "connecting (and the TLS handshake) to an MCP server; then 502", _positive
    )
    upstream_timeout_seconds: float = _setting(
        300.0,
        "from a request sent to an MCP server "
        "to its response head; then 504 (a response "
        "that has begun, an SSE stream, is not cut)",
        _positive,
    )
    drain_seconds: float = _setting(
        10.0,
        "on stop, requests in flight get this long to "
        "finish (idle connections are closed at once, new ones "
        "refused); keep it under the stop timeout (systemd "
        "TimeoutStopSec, Kubernetes terminationGracePeriodSeconds)",
        lambda v: None if 0 <= v <= 600 else "between 0 and 600",
    )
    max_head_bytes: int = _setting(
        65536,
        "largest request head (request line and header "
        "fields) a workload may send; larger: HTTP 431 and the "
        "connection closed",
        lambda v: None if 1024 <= v <= 1 << 24 else "between 1024 and 16777216",
    )
    max_header_fields: int = _setting(
        100,
        "most header fields in a request head; more: HTTP 431 and the connection closed",
        lambda v: None if 8 <= v <= 10000 else "between 8 and 10000",
    )
    upstream_pool_size: int = _setting(
        16, "idle upstream connections kept per identity and server", _positive
    )
    upstream_ca_file: str = _setting(
        "", "CA bundle to verify https MCP servers; empty means the system store", _absolute_path
    )


@dataclass(frozen=True)
class PolicySection:
    file: str = _setting(
        "",
        "MCP policy file (see deploy/policy.example.toml); empty means "
        "no policy: every call is allowed and audited",
        _absolute_path,
    )
    max_body_bytes: int = _setting(
        1048576, "largest JSON-RPC body inspected; larger ones are refused (413)", _positive
    )
    subagents: str = _setting(
        "inherit",
        "a process spawned by another identity's process: "
        "inherit (its own rules only) or restrict_to_parent (also "
        "limited to what its parent may do)",
        _one_of("inherit", "restrict_to_parent"),
    )


@dataclass(frozen=True)
class AuditSection:
    stdout: bool = _setting(True, "write audit events as JSON lines on stdout")
    file: str = _setting(
        "", "also append them to this file (0600), rotated by size", _absolute_path
    )
    max_bytes: int = _setting(52428800, "rotate the audit file at this size", _positive)
    backups: int = _setting(
        5,
        "rotated audit files kept (file.1 ... file.N)",
        lambda v: None if v >= 1 else "at least 1",
    )
    flush_ms: float = _setting(
        5.0,
        "under load, write the proxy's audit events together at "
        "most this often (milliseconds; a quiet spell's first event "
        "is written at once; 0: every loop iteration)",
        lambda v: None if 0 <= v <= 1000 else "between 0 and 1000",
    )


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
    servers: tuple[ServerSection, ...] = _setting((), "[[servers]]: the MCP servers")


# ---------------------------------------------------------------- parsing
_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
}


def _toml_type_name(v: Any) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "array",
        dict: "table",
    }.get(type(v), type(v).__name__)


def _render(v: Any) -> str:
    if isinstance(v, str):
        return '"' + v.replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "a table"
    return repr(v)


def _type_ok(expected: type, v: Any) -> bool:
    if expected is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if expected is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, expected)


def _build(cls: type, data: dict, path: str, problems: list[str]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    where = f"[{path}]" if path else "the top level"
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else key
        f = fields.get(key)
        if f is None:
            problems.append(
                f"{key_path}: unknown key; accepted keys in {where}: " + ", ".join(sorted(fields))
            )
            continue
        ftype = hints[key]
        if getattr(ftype, "__origin__", None) is tuple and dataclasses.is_dataclass(
            ftype.__args__[0]
        ):
            item = ftype.__args__[0]
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                problems.append(
                    f"{key_path}: got {_toml_type_name(value)}, expected an array "
                    f"of tables [[{key_path}]]"
                )
                continue
            kwargs[key] = tuple(
                _build(item, v, f"{key_path}[{i}]", problems) for i, v in enumerate(value)
            )
            continue
        if dataclasses.is_dataclass(ftype):
            if not isinstance(value, dict):
                problems.append(
                    f"{key_path}: got {_toml_type_name(value)} {_render(value)}, "
                    f"expected a table [{key_path}]"
                )
                continue
            kwargs[key] = _build(ftype, value, key_path, problems)
            continue
        if not _type_ok(ftype, value):
            problems.append(
                f"{key_path}: got {_toml_type_name(value)} {_render(value)}, "
                f"expected {_TYPE_NAMES[ftype]}"
            )
            continue
        check = f.metadata.get("check")
        accepted = check(value) if check else None
        if accepted:
            problems.append(f"{key_path}: got {_render(value)}, expected {accepted}")
            continue
        kwargs[key] = float(value) if ftype is float else value
    return cls(**kwargs)


def _check_metrics(cfg: Config, problems: list[str]) -> None:
    if not cfg.metrics.expose and _loopback_listen(cfg.metrics.listen):
        problems.append(
            f"metrics.listen: got {_render(cfg.metrics.listen)}, expected "
            f"{_loopback_listen(cfg.metrics.listen)}; set metrics.expose = true "
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
            problems.append(f"{where}.name: {srv.name!r} is used twice; names must be unique")
        seen.add(srv.name)


def parse(data: dict, source: str = "<config>") -> Config:
    problems: list[str] = []
    cfg = _build(Config, data, "", problems)
    if not problems:
        _check_metrics(cfg, problems)
        _check_servers(cfg, problems)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def load(path: str | os.PathLike) -> Config:
    p = Path(path)
    src = str(p)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            src,
            [
                "file not found; create it (deploy/credless.example.toml "
                "documents every key) or pass --config FILE"
            ],
        ) from None
    except IsADirectoryError:
        raise ConfigError(src, ["is a directory, expected a TOML file"]) from None
    except PermissionError:
        raise ConfigError(src, ["permission denied; run as root or make it readable"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(src, [f"not UTF-8 text (byte {e.start})"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(src, [f"not valid TOML: {e}"]) from None
    return parse(data, src)


def iter_settings(cls: type = Config, prefix: str = ""):
    """(key path, default, doc) for every setting: the example config is checked against it."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        ftype = hints[f.name]
        key = f"{prefix}.{f.name}" if prefix else f.name
        if getattr(ftype, "__origin__", None) is tuple and dataclasses.is_dataclass(
            ftype.__args__[0]
        ):
            yield from iter_settings(ftype.__args__[0], key)
        elif dataclasses.is_dataclass(ftype):
            yield from iter_settings(ftype, key)
        else:
            yield key, f.default, f.metadata.get("doc", "")
