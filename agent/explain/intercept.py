"""`credless explain`'s interception step: would this process's connect to this URL reach
the proxy, and as which server?

The answer is the kernel's (bpf/redirect.c decides a connect by its destination, the
connecting task's cgroup and the agent's state), read from the pinned maps
(agent/explain/maps.py), then the proxy's: which `[[servers]]` entry the address is, and
whether a request to this URL is one the proxy credentials (agent/inject/decide.py
refuses another Host or a path outside the server's MCP endpoint).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from agent import server_names
from agent.attest.cgroupfs import cgroup2_root
from agent.explain import maps
from agent.explain.render import Step
from agent.inject.netns import netns_inode
from agent.inject.upstreams import loopback_answers

if TYPE_CHECKING:
    from agent.config import ServerSection
    from agent.inject.components import ProxyComponent
    from agent.wiring import Agent


def _addresses(host: str, port: int) -> list[str]:
    """host's addresses as this node resolves them (and both loopbacks for localhost, as
    the proxy intercepts them: agent/inject/upstreams.py)."""
    infos = [
        *socket.getaddrinfo(host, port, type=socket.SOCK_STREAM),
        *loopback_answers(host, port),
    ]
    return list(dict.fromkeys(str(i[4][0]) for i in infos))


MANAGED, UNMANAGED, PENDING = "managed", "not managed", "pending"


def _managed(
    agent: Agent, pin: Path, cgroup: str | None, cfg: maps.RedirectConfig
) -> tuple[str, str]:
    """Whether the kernel counts a task in cgroup as MANAGED, UNMANAGED or PENDING (its
    connects to a target refused until the agent decides), and why."""
    if cgroup is None:
        return UNMANAGED, "its cgroup is unknown (the process is gone)"
    root = cgroup2_root(agent.cfg.attest.cgroup_root)
    if root is None:
        return UNMANAGED, "no cgroup v2 mount"
    chain = maps.ancestor_ids(root, cgroup)
    if not chain or chain[-1][0] != ("/" + "/".join(p for p in cgroup.split("/") if p)):
        return UNMANAGED, f"its cgroup {cgroup} no longer exists"
    if chain[-1][1] == cfg.excluded_cgroup:
        return UNMANAGED, f"{cgroup} is the agent's own cgroup, never redirected"
    if cfg.all_cgroups:
        return (
            MANAGED,
            f"{cgroup}: every cgroup but the agent's is managed (no managed cgroups set)",
        )
    states = maps.managed_states(pin, [i for _, i in chain])
    for path, cg_id in reversed(chain):  # the kernel: any MANAGED ancestor manages it
        if states.get(cg_id) == maps.MANAGED:
            where = "is" if path == chain[-1][0] else f"is under {path}, which is"
            return MANAGED, f"{cgroup} {where} a managed cgroup (id {cg_id})"
    pending = [path for path, cg_id in chain if states.get(cg_id) == maps.PENDING]
    if pending:
        return PENDING, (
            f"{pending[-1]} is new and not yet decided by the agent: its intercepted "
            "connects are refused until it is (fail closed)"
        )
    configured = ", ".join(agent.cfg.inject.managed_cgroups) or "none"
    return UNMANAGED, (
        f"neither {cgroup} nor a cgroup above it is managed (inject.managed_cgroups: {configured})"
    )


def _listening_there(component: ProxyComponent | None, pid: int) -> tuple[bool, str]:
    """Whether the proxy listens in pid's network namespace, where the kernel sends its
    redirected connects (127.0.0.1 of that namespace), and why."""
    ino = netns_inode(pid)
    own = netns_inode("self")
    if ino is None or ino == own:
        return True, "its network namespace is the agent's"
    pods = component.pods if component is not None else None
    if pods is None:
        return False, (
            f"it is in another network namespace (net:[{ino}]) and inject.pod_netns is off: "
            "its redirected connects find no listener there and are refused"
        )
    if ino in pods.served:
        return True, f"the agent listens in its network namespace too (net:[{ino}])"
    return False, (
        f"the agent does not listen in its network namespace (net:[{ino}]) yet: its "
        "redirected connects are refused until it does"
    )


def interception(
    agent: Agent,
    component: ProxyComponent | None,
    server: ServerSection | None,
    url: str,
    asked: str,
    pid: int,
    cgroup: str | None,
) -> Step:
    """The interception step for a connect to url's address from process pid (in cgroup);
    server: the configured server `asked` named, if any."""
    proxy = component.proxy if component is not None else None
    known = server_names.known(agent.cfg.servers)
    if agent.redirector is None:
        return Step(
            "intercept",
            False,
            "not intercepted: injection is off (inject.enabled = false, or no [[servers]])",
        )
    u = urlsplit(url)
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        return Step("intercept", False, f"not intercepted: {url!r} has no valid port")
    if u.hostname is None or u.scheme not in ("http", "https"):
        return Step("intercept", False, f"not intercepted: {url!r} is not an http(s) URL")
    lines: list[str] = []
    data: dict = {"server": server.name if server else None, "port": port}
    if server is None:
        lines.append(server_names.unknown_reason(agent.cfg.servers, asked) + f"; known: {known}")
    else:
        lines.append(f"[[servers]] {server.name!r} ({server.url}), mode {server.mode}")
        if server.workload_url and url != server.workload_url:
            lines.append(f"workloads may call it at {server.workload_url} too: explain that URL")
    pin = Path(agent.cfg.agent.bpf_pin_dir)
    try:
        addresses = _addresses(u.hostname, port)
    except OSError as e:
        return Step(
            "intercept", False, f"not intercepted: {u.hostname} does not resolve ({e})", lines
        )
    try:
        cfg = maps.redirect_config(pin)
        targets = {a: maps.target_listener(pin, a, port) for a in addresses}
        managed, why_managed = _managed(agent, pin, cgroup, cfg)
    except (maps.MapUnreadable, OSError) as e:
        return Step("intercept", None, f"unknown: the redirect maps cannot be read ({e})", lines)
    upstreams = proxy.upstreams if proxy is not None else {}
    inject = agent.cfg.inject
    servers_at = set()
    for a in addresses:
        listener = targets[a]
        up = upstreams.get((a, port))
        shown = f"[{a}]:{port}" if ":" in a else f"{a}:{port}"
        if listener is None:
            lines.append(f"{shown}: not in the redirect map")
            continue
        # the map holds the listener port for a TLS target, 0 for the plain listener
        lines.append(
            f"{shown}: in the redirect map → the proxy's {'TLS' if listener else 'plain'} "
            f"listener (port {listener or inject.listen_port})"
            + (f", [[servers]] {up.name!r}" if up else "")
        )
        if up is not None:
            servers_at.add(up.name)
        if listener:
            ca = Path(agent.cfg.agent.run_dir) / "inject-ca.crt"
            lines.append(f"  the workload's TLS must trust credless's injection CA ({ca})")
    data["addresses"] = {a: targets[a] for a in addresses}
    lines.append(f"{managed}: {why_managed}")
    data.update(managed=managed, agent_up=cfg.agent_up, fail_open=cfg.fail_open)
    targeted = any(v is not None for v in targets.values())
    if not targeted:
        return Step(
            "intercept", False, "not intercepted: its address is not a redirect target", lines, data
        )
    if managed == UNMANAGED:
        summary = "not intercepted: the process's cgroup is not managed"
        return Step("intercept", False, summary, lines, data)
    if managed == PENDING:
        summary = "refused: the process's cgroup is not yet decided by the agent"
        return Step("intercept", False, summary, lines, data)
    if not cfg.enabled:
        return Step("intercept", False, "not intercepted: the redirect is disabled", lines, data)
    there, why_there = _listening_there(component, pid)
    lines.append(why_there)
    if not there:
        return Step("intercept", False, "refused: no proxy listener where it connects", lines, data)
    if not cfg.agent_up:
        summary = (
            "not intercepted: the agent's proxy is not up and inject.fail_open lets connects out"
            if cfg.fail_open
            else "refused: the agent's proxy is not up (fail closed)"
        )
        return Step("intercept", False, summary, lines, data)
    if server is None:
        names = ", ".join(sorted(servers_at)) or "a server"
        modes = {up.mode for (a, p), up in upstreams.items() if p == port and a in addresses}
        if modes == {"passthrough"}:  # observed only: decide.py checks no Host or path
            summary = f"intercepted as {names} (passthrough): forwarded as sent, observed only"
        else:
            summary = (
                f"intercepted as {names}, but this URL is not that server's: the proxy "
                "refuses it (421 for another Host, 403 for a path outside the MCP endpoint)"
            )
        return Step("intercept", False, summary, lines, data)
    if server.name not in servers_at:
        lines.append(f"the proxy has no upstream for {server.name!r} at these addresses")
    return Step(
        "intercept", True, f"intercepted: the proxy serves it as {server.name!r}", lines, data
    )
