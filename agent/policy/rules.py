"""MCP-aware policy: which identity may do what on which MCP server.

A TOML file of `[[rule]]` tables:

    [[rule]]
    id = "readers"
    spiffe_id = "spiffe://example.org/agent/*"  # exact, or a glob over the whole ID
    server = "weather"                           # a [[servers]] name, or "*"
    methods = ["tools/list", "tools/call"]       # JSON-RPC methods (globs)
    tools = ["get_*"]                            # tools/call names (globs); default any
    resources = ["file:///docs/*"]               # resources/read URIs (globs); default any
    prompts = ["*"]                              # prompts/get names (globs); default any
    effect = "allow"                             # or "deny"

Evaluation: explicit deny wins; then any allow; else deny. A server with no rules at all is
governed by `default_unlisted` ("allow" keeps servers that were never put under policy
working; "deny" makes every server need rules). Session lifecycle methods (initialize,
notifications/initialized, notifications/cancelled, ping, server/discover) are allowed for
an identity whenever any rule allows it something on that server: a client that may call a
tool must be able to open the session first. So are the HTTP requests of a session that carry
no JSON-RPC message, named here as the methods `http:GET` (the server-to-client event
stream) and `http:DELETE` (ending the session): a deny rule whose methods cover them (such
as `methods = ["*"]`) refuses them too.

Rules once had `oauth` and `scope` keys that nothing enforced; a file that still uses them
is refused with a message saying what to do instead (a control that looks active but is
not is worse than none).
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LIFECYCLE = frozenset(
    {
        "initialize",
        "notifications/initialized",
        "notifications/cancelled",
        "ping",
        "server/discover",
        "http:GET",
        "http:DELETE",
    }
)
_KEYS = {"id", "spiffe_id", "server", "methods", "tools", "resources", "prompts", "effect"}
_REMOVED = {
    "oauth": "removed: it was never enforced. Which identities obtain tokens for a server "
    "follows from their call rules (an identity with no allowed call gets none used)",
    "scope": "removed: it was never enforced. Set the scope to request per server with "
    "`scope` in the agent's [[servers]] table",
}


class PolicyError(Exception):
    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


@dataclass(frozen=True)
class Rule:
    id: str
    spiffe_id: str
    server: str
    methods: tuple[str, ...] = ()
    tools: tuple[str, ...] = ("*",)
    resources: tuple[str, ...] = ("*",)
    prompts: tuple[str, ...] = ("*",)
    effect: str = "allow"

    def applies(self, spiffe_id: str, server: str) -> bool:
        return fnmatch.fnmatchcase(spiffe_id, self.spiffe_id) and (
            self.server == "*" or self.server == server
        )

    def covers(self, method: str, name: str | None) -> bool:
        if not any(fnmatch.fnmatchcase(method, m) for m in self.methods):
            return False
        names = {
            "tools/call": self.tools,
            "resources/read": self.resources,
            "prompts/get": self.prompts,
        }.get(method)
        if names is None:
            return True
        return name is not None and any(fnmatch.fnmatchcase(name, n) for n in names)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule_id: str | None
    reason: str


@dataclass
class Policy:
    rules: list[Rule] = field(default_factory=list)
    default_unlisted: str = "allow"
    source: str = "<policy>"

    def _governed(self, server: str) -> bool:
        return any(r.server in (server, "*") for r in self.rules)

    def decide(self, spiffe_id: str, server: str, method: str, name: str | None = None) -> Decision:
        if not self._governed(server):
            ok = self.default_unlisted == "allow"
            return Decision(
                ok,
                None,
                f"server {server!r} has no rules; default_unlisted = {self.default_unlisted}",
            )
        applicable = [r for r in self.rules if r.applies(spiffe_id, server)]
        for r in applicable:
            if r.effect == "deny" and r.covers(method, name):
                return Decision(False, r.id, f"denied by rule {r.id!r}")
        for r in applicable:
            if r.effect == "allow" and r.covers(method, name):
                return Decision(True, r.id, f"allowed by rule {r.id!r}")
        if method in LIFECYCLE and any(r.effect == "allow" for r in applicable):
            return Decision(True, None, "session lifecycle of an identity with allowed calls")
        what = f"{method} {name}" if name else method
        return Decision(False, None, f"no rule allows {what} on {server!r} for {spiffe_id}")


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) and x for x in v)


def parse(data: dict, source: str = "<policy>", servers: set[str] | None = None) -> Policy:
    problems: list[str] = []
    unknown = set(data) - {"rule", "default_unlisted"}
    problems += [
        f"unknown top-level key {k!r}; accepted: default_unlisted, [[rule]]"
        for k in sorted(unknown)
    ]
    default = data.get("default_unlisted", "allow")
    if default not in ("allow", "deny"):
        problems.append(f"default_unlisted: got {default!r}, expected allow or deny")
    rules, seen = [], set()
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise PolicyError(source, ["'rule' must be an array of tables: write [[rule]]"])
    for i, raw in enumerate(raw_rules):
        where = f"rule[{i}]" + (
            f' (id "{raw.get("id")}")'
            if isinstance(raw, dict) and isinstance(raw.get("id"), str)
            else ""
        )
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a table")
            continue
        errs = [
            f"{where}: {k}: {_REMOVED[k]}"
            if k in _REMOVED
            else f"{where}: unknown key {k!r}; accepted: {', '.join(sorted(_KEYS))}"
            for k in raw
            if k not in _KEYS
        ]
        rid = raw.get("id")
        if not isinstance(rid, str) or not rid:
            errs.append(f"{where}: id is required (it names the rule in audit events)")
        elif rid in seen:
            errs.append(f"{where}: duplicate id")
        sid = raw.get("spiffe_id")
        if not isinstance(sid, str) or not sid.startswith("spiffe://"):
            errs.append(f"{where}: spiffe_id must be a SPIFFE ID or glob starting spiffe://")
        server = raw.get("server")
        if not isinstance(server, str) or not server:
            errs.append(f'{where}: server must be a [[servers]] name or "*"')
        elif servers is not None and server != "*" and server not in servers:
            errs.append(
                f"{where}: server {server!r} is not configured; known: "
                + ", ".join(sorted(servers))
            )
        for key in ("methods", "tools", "resources", "prompts"):
            if key in raw and not _strings(raw[key]):
                errs.append(f"{where}: {key} must be a list of non-empty strings")
        if "methods" not in raw and raw.get("effect", "allow") == "allow":
            errs.append(f'{where}: methods is required (e.g. ["tools/list", "tools/call"])')
        if raw.get("effect", "allow") not in ("allow", "deny"):
            errs.append(f"{where}: effect must be allow or deny, got {raw.get('effect')!r}")
        if isinstance(rid, str):
            seen.add(rid)
        if errs:
            problems += errs
            continue
        rules.append(
            Rule(
                id=rid,
                spiffe_id=sid,
                server=server,
                methods=tuple(raw.get("methods", ())),
                tools=tuple(raw.get("tools", ("*",))),
                resources=tuple(raw.get("resources", ("*",))),
                prompts=tuple(raw.get("prompts", ("*",))),
                effect=raw.get("effect", "allow"),
            )
        )
    if problems:
        raise PolicyError(source, problems)
    return Policy(rules, default, source)


def load(path: str | Path, servers: set[str] | None = None) -> Policy:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(str(p), ["file not found; create it or set policy.file"]) from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(str(p), [f"not valid TOML: {e}"]) from None
    return parse(data, str(p), servers)
