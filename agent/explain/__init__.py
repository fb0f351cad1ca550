"""`credless explain`: the chain a live process's request to a URL would go through.

Answered over the admin socket from the running agent's own state (agent/daemon.py registers
it); never a secret, only names, fingerprints and times. Each step asks the layer that
decides it, read-only, the same question the data path asks: the attestor for the process,
the registration entries (agent/identity/entries.py `consider`, Registry.match's order) and
the identity manager for the SPIFFE ID, the kernel's pinned redirect maps for interception
(agent/explain/maps.py), the policy for the call, the token cache for the credential, and
the in-memory ring of recent audit events (agent/observe/recent.py). Nothing is counted,
audited or fetched: asking does not change what it explains.

The answer is a dict: the request, an `outcome` line, and `steps` in order, each with `ok`
(true: passes, false: the request stops or goes out uncredentialed here, null: not
applicable), a `summary`, `lines` saying why, and `data`. agent/explain/render.py prints it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import server_names
from agent.attest.cgroupfs import process_cgroup
from agent.explain.intercept import interception
from agent.explain.render import Step
from agent.identity.entries import consider

if TYPE_CHECKING:
    from agent.attest.selectors import Attestation
    from agent.config import ServerSection
    from agent.inject.components import ProxyComponent
    from agent.inject.proxy import Proxy
    from agent.wiring import Agent

RECENT_EVENTS = 10  # audit events shown per identity


def explain(agent: Agent, req: dict[str, Any]) -> dict[str, Any]:
    """The chain for req["pid"] and req["url"] (optional "method", "tool", "arguments")."""
    try:
        pid = int(req["pid"])
        url = str(req["url"])
    except (KeyError, TypeError, ValueError):
        return {"error": "explain needs pid (a number) and url (a server's URL or name)"}
    method = req.get("method") or None
    tool = req.get("tool") or None
    # a name must be a server's; a URL that is none is explained all the same (where its
    # connects go, and why not to the proxy)
    server: ServerSection | None
    if server_names.looks_like_url(url):
        server, target_url = server_names.find(agent.cfg.servers, url), url
    else:
        try:
            server = server_names.resolve(agent.cfg.servers, url)
        except server_names.UnknownServer as e:
            return {"error": str(e)}
        target_url = server.url
    att = agent.attestor.attest(pid, timeout=1.0)
    steps = [process_step(agent, pid, att)]
    sid = None
    if att is not None:
        steps.append(selectors_step(att))
        steps.append(entries_step(agent, att))
        ident = agent.identity.resolve(att, quiet=True)
        sid = str(ident.spiffe_id) if ident is not None else None
        steps.append(identity_step(agent, att, sid, ident.entry.id if ident else None))
    component = _proxy(agent)
    proxy = component.proxy if component is not None else None
    cgroup = att.cgroup_path if att is not None else process_cgroup(pid)
    steps.append(interception(agent, component, server, target_url, url, pid, cgroup))
    # the proxy's own answer: the sub-agent rule is decided where requests are
    parent = proxy.parent_identity(att) if proxy is not None and att is not None and sid else None
    call = Call(
        method, tool, req.get("arguments"), att.selectors if att is not None else frozenset()
    )
    steps.append(policy_step(agent, proxy, server, sid, parent, call))
    steps.append(token_step(agent, server, sid))
    steps.append(audit_step(agent, pid, sid))
    return {
        "pid": pid,
        "url": url,
        "server": server.name if server else None,
        "method": method,
        "tool": tool,
        "spiffe_id": sid,
        "outcome": outcome(steps, server.mode if server else "broker"),
        "steps": [s.to_dict() for s in steps],
    }


PASSED = {
    "broker": "would be sent with credless's credential",
    "assertion": "would be forwarded; its token requests get credless's client assertion",
    "passthrough": "would be forwarded as sent, observed and audited only (passthrough)",
}


def outcome(steps: list[Step], mode: str = "broker") -> str:
    """One line: where the request stops, or what happens to it in the server's mode. A
    connect the kernel does not intercept goes out untouched, whatever else is true, so
    that comes first; then the first step that stops it."""
    intercept = [s for s in steps if s.step == "intercept"]
    for s in intercept + steps:
        if s.ok is False:
            return f"{s.step}: {s.summary}"
    return PASSED.get(mode, PASSED["broker"])


# ------------------------------------------------------------ the process
def _wall(boottime_ns: int) -> str:
    """A CLOCK_BOOTTIME instant (the kernel's exec time) as UTC wall-clock time."""
    ago = (time.clock_gettime_ns(time.CLOCK_BOOTTIME) - boottime_ns) / 1e9
    return dt.datetime.fromtimestamp(time.time() - ago, dt.UTC).isoformat(timespec="seconds")


def _why_unattested(agent: Agent, pid: int) -> str:
    status = Path(f"/proc/{pid}/status")
    try:
        fields = dict(ln.split(":", 1) for ln in status.read_text().splitlines() if ":" in ln)
    except OSError:
        return f"no process {pid} is running"
    tgid = fields.get("Tgid", "").strip()
    if tgid and tgid != str(pid):
        return f"{pid} is a thread of process {tgid}; give the process id"
    kernel = agent.attestor.source.kernel_image(pid)
    if kernel is None:
        return (
            "the kernel's process table has no image for it (it exited, or started "
            "before attestation could see it)"
        )
    img = agent.attestor.table.image(pid, kernel[1])
    if img is not None and img.enrich_error:
        return f"it could not be attested: {img.enrich_error}"
    return "its attestation is not ready (it exec'd just now); ask again"


def process_step(agent: Agent, pid: int, att: Attestation | None) -> Step:
    if att is None:
        why = _why_unattested(agent, pid)
        return Step(
            "process",
            False,
            f"pid {pid} is not attested: {why}",
            [
                "no attestation, no identity: a request from it is refused (403) or passed "
                f"through bare (inject.unattested = {agent.cfg.inject.unattested})"
            ],
            {"pid": pid, "attested": False, "reason": why},
        )
    data = att.to_dict()
    data["exec_time"] = _wall(att.exec_ns)
    data["attested"] = True
    lines = [
        f"exe {att.exe}" + (f" (sha256 {att.sha256[:16]}…)" if att.sha256 else ""),
        f"uid {att.uid} gid {att.gid} (effective)",
        f"cgroup {att.cgroup_path} (id {att.cgroup_id})",
        f"exec'd at {data['exec_time']}",
    ]
    if att.container_id:
        lines.append(f"container {att.container_id[:12]}")
    if att.pod is not None:
        lines.append(f"pod {att.pod.namespace}/{att.pod.name}")
    if att.lineage:
        lines.append(
            "parents " + " ← ".join(f"{t} {e.rsplit('/', 1)[-1]}" for t, _, e in att.lineage)
        )
    return Step("process", True, f"pid {pid} runs {att.exe}", lines, data)


def selectors_step(att: Attestation) -> Step:
    sels = sorted(att.selectors)
    return Step("selectors", None, f"{len(sels)} selectors", sels, {})


def entries_step(agent: Agent, att: Attestation) -> Step:
    entries = list(agent.identity.source.entries())
    if not entries:
        if agent.cfg.identity.source == "spire":
            return Step(
                "entries",
                None,
                "held by the SPIRE agent (identity.source = spire): it matches these "
                "selectors against its own entries",
            )
        return Step("entries", False, "no registration entries are loaded (identity.entries_file)")
    considered = consider(entries, att.selectors)
    lines = [
        f"{'✓' if c.matched else '✗'} {c.entry.id}: {c.reason}"
        + (f" → {c.spiffe_id}" if c.chosen else "")
        for c in considered
    ]
    data = {
        "considered": [
            {
                "id": c.entry.id,
                "matched": c.matched,
                "chosen": c.chosen,
                "reason": c.reason,
                "spiffe_id": str(c.spiffe_id) if c.spiffe_id else None,
            }
            for c in considered
        ]
    }
    hits = sum(c.matched for c in considered)
    # none matching is the identity step's failure: said once, there
    ok = True if hits else None
    return Step("entries", ok, f"{hits} of {len(considered)} entries match", lines, data)


def identity_step(agent: Agent, att: Attestation, sid: str | None, entry: str | None) -> Step:
    if sid is None:
        return Step(
            "identity",
            False,
            "none: no registration entry matches this process",
            [
                "a request from it is refused (403) or passed through bare "
                f"(inject.unattested = {agent.cfg.inject.unattested})"
            ],
        )
    users = agent.identity.live_identities().get(sid, 0)
    return Step(
        "identity",
        True,
        sid,
        [f"from entry {entry!r}", f"{users} live process(es) use it through the proxy"],
        {"spiffe_id": sid, "entry": entry},
    )


def _proxy(agent: Agent) -> ProxyComponent | None:
    from agent.inject.components import ProxyComponent

    for c in agent.components:
        if isinstance(c, ProxyComponent):
            return c
    return None


# ------------------------------------------------------------ policy, token, audit
@dataclass(frozen=True)
class Call:
    """The call the policy is asked about: the JSON-RPC method, the tool (resource URI,
    prompt) it names, its arguments (for rules with a `when` condition) and the caller's
    selectors (which conditions may read too)."""

    method: str | None
    tool: str | None = None
    args: Any = None
    selectors: frozenset[str] = frozenset()


def _rule_line(r: Any) -> str:
    names = f" tools {', '.join(r.tools)}" if r.tools != ("*",) else ""
    when = getattr(r, "when", "")
    return f"rule {r.id!r}: {r.effect} {', '.join(r.methods)}{names}" + (
        f" when {when}" if when else ""
    )


def policy_step(
    agent: Agent,
    proxy: Proxy | None,
    server: ServerSection | None,
    sid: str | None,
    parent: str | None,
    call: Call,
) -> Step:
    if server is None or sid is None:
        return Step(
            "policy", None, "not asked: " + ("no server" if server is None else "no identity")
        )
    if server.mode != "broker":
        return Step("policy", None, f"not asked: {server.mode} mode forwards without MCP policy")
    engine = proxy.policy if proxy is not None else None
    policy = getattr(engine, "policy", None)
    if policy is None:
        return Step("policy", True, "no policy file (policy.file): every call is allowed")
    lines = [_rule_line(r) for r in policy.rules if r.applies(sid, server.name)] or [
        f"no rule names {sid} on {server.name!r}"
    ]
    if call.method is None:
        return Step(
            "policy", None, "give --method (and --tool) for a decision; rules for it:", lines
        )
    # the decision the proxy's PolicyEngine.decide makes, without counting it
    ask = (server.name, call.method, call.tool)
    d = policy.decide(sid, *ask, args=call.args, selectors=call.selectors)
    if d.allowed and parent and agent.cfg.policy.subagents == "restrict_to_parent":
        p = policy.decide(parent, *ask, args=call.args, selectors=call.selectors)
        if not p.allowed:
            d = type(d)(False, p.rule_id, f"sub-agent of {parent}, which may not: {p.reason}")
    what = f"{call.method} {call.tool}" if call.tool else call.method
    if call.args is None and any(getattr(r, "when", "") for r in policy.rules):
        lines.append("asked without arguments: give --args for rules with a `when` condition")
    return Step(
        "policy",
        d.allowed,
        f"{what}: {'allowed' if d.allowed else 'denied (403)'}: {d.reason}",
        lines,
        {"decision": "allow" if d.allowed else "deny", "rule": d.rule_id, "reason": d.reason},
    )


def _cached_tokens(agent: Agent, sid: str, server: str) -> list[Any]:
    """The cache's tokens for (sid, server), read on the OAuth loop that owns the cache."""
    oauth = agent.oauth

    async def read() -> list[Any]:
        return [t for k, t in oauth.cache.tokens() if k[0] == sid and k[1] == server]

    if oauth.loop is None:
        return [t for k, t in oauth.cache.tokens() if k[0] == sid and k[1] == server]
    return oauth.run_sync(read(), timeout=5.0)


_NO_TOKEN = {
    "passthrough": "none added: passthrough mode observes and audits only",
    "assertion": "none held: in assertion mode the workload obtains its own tokens, credless "
    "adds the client assertion to its token requests",
}


def token_step(agent: Agent, server: ServerSection | None, sid: str | None) -> Step:
    if server is None or sid is None:
        return Step("token", None, "not needed: " + ("no server" if sid else "no identity"))
    if server.mode in _NO_TOKEN:
        return Step("token", None, _NO_TOKEN[server.mode])
    ases: tuple[str, ...] = ()
    with contextlib.suppress(Exception):  # a pin file unreadable: shown as unknown
        ases = agent.oauth.resolver.authorization_servers(agent.oauth.server(server.name))
    where = ", ".join(ases) if ases else "the one the server's metadata names (then pinned)"
    now = time.time()
    tokens = _cached_tokens(agent, sid, server.name)
    if not tokens:
        return Step(
            "token",
            None,
            "none cached: the first request fetches one",
            [f"authorization server: {where}"],
            {"cached": False, "authorization_servers": list(ases)},
        )
    lines, data = [], []
    for t in tokens:
        left = int(t.expires_at - now)
        lines.append(
            f"{t.token_type} from {t.issuer}, expires in {left} s "
            f"({dt.datetime.fromtimestamp(t.expires_at, dt.UTC).isoformat(timespec='seconds')})"
        )
        lines.append(
            f"  sha256 {t.fingerprint}"
            + (f", jti {t.jti}" if t.jti else "")
            + (f", DPoP key {t.jkt}" if t.jkt else ", not DPoP-bound")
            + (f", scope {t.scope!r}" if t.scope else "")
        )
        data.append(t.summary())  # what `oauth probe` shows: never the token
    valid = any(t.valid(now) for t in tokens)
    return Step(
        "token",
        True if valid else None,
        "cached" if valid else "cached but expired: the next request fetches one",
        lines,
        {"cached": True, "tokens": data, "authorization_servers": list(ases)},
    )


_SHOWN = (
    "server",
    "status",
    "rpc_method",
    "tool",
    "rule",
    "reason",
    "token_sha256",
    "tokens_dropped",
    "event_id",
)


def audit_step(agent: Agent, pid: int, sid: str | None) -> Step:
    ring = agent.recent
    if ring is None:
        return Step("audit", None, "this agent keeps no recent audit events")
    events = (
        ring.matching(RECENT_EVENTS, spiffe_id=sid)
        if sid
        else ring.matching(RECENT_EVENTS, pid=pid)
    )
    who = sid or f"pid {pid}"
    if not events:
        return Step("audit", None, f"no recent audit event for {who}")
    lines = [
        f"{e.get('time', '?')} {e.get('event')} "
        + " ".join(f"{k}={e[k]}" for k in _SHOWN if e.get(k) is not None)
        for e in events
    ]
    return Step("audit", None, f"the last {len(events)} for {who}", lines, {"events": events})
