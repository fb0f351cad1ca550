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
    when = 'args.path.startsWith("/srv" + spiffe.path + "/")'  # a CEL condition; default none

Evaluation: explicit deny wins; then any allow; else deny. A rule with `when` covers a call
only when its condition holds (agent/policy/conditions.py: what it reads, its limits); a
condition that cannot be evaluated for a call (a missing argument, a type error) denies the
call, naming the rule, whether the rule allows or denies: fail closed. Deny rules are all
asked first; allow rules in file order, the first that holds allowing.

A server with no rules at all is governed by `default_unlisted` ("allow" keeps servers that
were never put under policy working; "deny" makes every server need rules). Session
lifecycle methods (initialize, notifications/initialized, notifications/cancelled, ping,
server/discover) are allowed for an identity whenever any rule allows it something on that
server (a conditional rule counts: its condition is about calls, not sessions): a client
that may call a tool must be able to open the session first. So are the HTTP requests of a
session that carry no JSON-RPC message, named here as the methods `http:GET` (the
server-to-client event stream) and `http:DELETE` (ending the session): a deny rule whose
methods cover them (such as `methods = ["*"]`) refuses them too.

Rules once had `oauth` and `scope` keys that nothing enforced; a file that still uses them
is refused with a message saying what to do instead (a control that looks active but is
not is worse than none).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from agent import schema
from agent.policy.conditions import CallView, Condition, EvaluationError, check, compile_condition
from agent.schema import Check, OperatorFileError, computed, non_empty, one_of, required, setting

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
_EFFECTS = ("allow", "deny")


class PolicyError(OperatorFileError):
    """policy.toml is wrong."""


def _spiffe_id_glob(v: Any) -> str | None:
    return (
        None if v.startswith("spiffe://") else "a SPIFFE ID, or a glob over one, starting spiffe://"
    )


def _server(v: Any) -> str | None:
    return None if v else 'a [[servers]] name, or "*"'


def _globs(v: Any) -> str | None:
    ok = all(isinstance(x, str) and x for x in v)
    return None if ok else 'an array of non-empty strings (globs), such as ["tools/*"]'


def _configured(servers: set[str]) -> Check:
    def check(v: Any) -> str | None:
        if v == "*" or v in servers:
            return None
        return 'a configured [[servers]] name or "*"; known: ' + ", ".join(sorted(servers))

    return check


@dataclass(frozen=True)
class Rule:
    id: str = required("it names the rule in audit events", non_empty)
    spiffe_id: str = required("a SPIFFE ID, or a glob over the whole ID", _spiffe_id_glob)
    server: str = required('a [[servers]] name, or "*"', _server)
    # globs over JSON-RPC methods; the names a rule covers default to any
    methods: tuple[str, ...] = setting((), _globs)
    tools: tuple[str, ...] = setting(("*",), _globs)  # tools/call names
    resources: tuple[str, ...] = setting(("*",), _globs)  # resources/read URIs
    prompts: tuple[str, ...] = setting(("*",), _globs)  # prompts/get names
    effect: str = setting("allow", one_of(*_EFFECTS))
    when: str = setting("")  # a CEL condition over the call (checked in check_together)
    # `when`, compiled (computed() returns a dataclasses.field, not a shared default)
    condition: Condition | None = computed(None)  # noqa: RUF009

    # a control that looks active but is not is worse than none
    removed_keys: ClassVar[Mapping[str, str]] = {
        "oauth": "removed: it was never enforced. Which identities obtain tokens for a server "
        "follows from their call rules (an identity with no allowed call gets none used)",
        "scope": "removed: it was never enforced. Set the scope to request per server with "
        "`scope` in the agent's [[servers]] table",
    }

    def __post_init__(self) -> None:
        # compiled when the file is loaded (cached: check_together compiled the same text)
        if self.when:
            object.__setattr__(self, "condition", compile_condition(self.when))

    @staticmethod
    def check_together(raw: Mapping[str, Any]) -> list[tuple[str, str]]:
        problems = []
        # no default: an allow rule without methods would allow nothing, and a deny rule
        # without them (tools = ["delete"]) would deny nothing while reading as a denial
        if "methods" not in raw:
            problems.append(
                (
                    "methods",
                    'required (e.g. ["tools/list", "tools/call"]; ["*"] for every method)',
                )
            )
        # here rather than as the key's check, whose message would repeat the whole
        # expression; a `when` that is not a string has its type problem reported already
        when = raw.get("when")
        if isinstance(when, str):
            problem = check(when)
            if problem:
                problems.append(("when", f"not a valid condition: {problem}"))
        return problems

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


_ENCODED_SEPARATORS = ("%2e", "%2f", "%5c")


def unplain_uri(uri: str) -> str | None:
    """Why a resource URI is not plain, or None. A rule's glob reads the URI as written
    (`file:///docs/*` matches `file:///docs/../etc/passwd`), while the server resolving it
    reads where it leads: dot segments, percent-encoded dots or slashes and backslashes
    (which some resolvers take as separators) are refused before any rule, whatever the
    rules say, as HTTP paths under an MCP endpoint are (agent/inject/request.py)."""
    path = uri.split("?", 1)[0].split("#", 1)[0]
    if any(segment in (".", "..") for segment in path.split("/")):
        return "has a dot segment"
    lowered = path.lower()
    if any(code in lowered for code in _ENCODED_SEPARATORS):
        return "has a percent-encoded dot, slash or backslash"
    if "\\" in path:
        return "has a backslash"
    return None


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

    def decide(
        self,
        spiffe_id: str,
        server: str,
        method: str,
        name: str | None = None,
        args: Any = None,
        selectors: Iterable[str] = (),
    ) -> Decision:
        """args: the call's params.arguments (None: it has none); selectors: the calling
        process's. Both are read by conditions only, never shown."""
        if not self._governed(server):
            ok = self.default_unlisted == "allow"
            return Decision(
                ok,
                None,
                f"server {server!r} has no rules; default_unlisted = {self.default_unlisted}",
            )
        if method == "resources/read" and name is not None and (odd := unplain_uri(name)):
            return Decision(
                False,
                None,
                f"resource URI {name[:200]!r} {odd}: no rule's glob can say where it leads; "
                "ask for the resource by its plain URI",
            )
        applicable = [r for r in self.rules if r.applies(spiffe_id, server)]
        view = None
        if any(r.condition is not None for r in applicable):
            view = CallView(spiffe_id, server, method, name, args, selectors)
        for r in applicable:
            if r.effect == "deny" and r.covers(method, name):
                held = _holds(r, view)
                if isinstance(held, Decision):
                    return held
                if held:
                    return Decision(False, r.id, f"denied by rule {r.id!r}" + _WHEN[r.when != ""])
        unmet: list[str] = []
        for r in applicable:
            if r.effect == "allow" and r.covers(method, name):
                held = _holds(r, view)
                if isinstance(held, Decision):
                    return held
                if held:
                    return Decision(True, r.id, f"allowed by rule {r.id!r}" + _WHEN[r.when != ""])
                unmet.append(r.id)
        if method in LIFECYCLE and any(r.effect == "allow" for r in applicable):
            return Decision(True, None, "session lifecycle of an identity with allowed calls")
        what = f"{method} {name}" if name else method
        if unmet:
            return Decision(
                False,
                unmet[0],
                f"no rule allows {what} on {server!r} for {spiffe_id}: the condition of "
                + ", ".join(f"rule {u!r}" for u in unmet)
                + " does not hold",
            )
        return Decision(False, None, f"no rule allows {what} on {server!r} for {spiffe_id}")


_WHEN = ("", ": its condition holds")


def _holds(rule: Rule, view: CallView | None) -> bool | Decision:
    """Whether the rule's condition holds for the call (True for a rule without one), or the
    denial of a call it cannot be evaluated for (fail closed)."""
    if rule.condition is None:
        return True
    if view is None:  # decide() makes one whenever an applicable rule has a condition
        raise RuntimeError(f"rule {rule.id!r}: a condition asked without the call")
    try:
        return rule.condition.holds(view)
    except EvaluationError as e:
        return Decision(
            False, rule.id, f"the condition of rule {rule.id!r} cannot be evaluated: {e}"
        )


@dataclass(frozen=True)
class _PolicyFile:
    default_unlisted: str = setting("allow", one_of(*_EFFECTS))
    rule: tuple[Rule, ...] = setting((), named_by="id")


def parse(
    data: Mapping[str, Any], source: str = "<policy>", servers: set[str] | None = None
) -> Policy:
    """`servers`: the configured [[servers]] names a rule may name; None: any."""
    problems: list[str] = []
    checks = {} if servers is None else {"rule.server": _configured(servers)}
    file = schema.build(_PolicyFile, data, problems, checks)
    if file is None:
        raise PolicyError(source, problems)
    return Policy(list(file.rule), file.default_unlisted, source)


def load(path: str | Path, servers: set[str] | None = None) -> Policy:
    missing = "create it or set policy.file"
    return parse(schema.read_toml(path, PolicyError, missing), str(path), servers)
