"""Registration entries: which attested processes get which SPIFFE ID.

A TOML file of `[[entry]]` tables:

    [[entry]]
    id = "mcp-agent"                       # unique; names the entry in logs and audit
    spiffe_id = "spiffe://example.org/k8s/ns/{k8s:ns}/sa/{k8s:sa}"
    selectors = ["k8s:ns:prod", "k8s:container-name:agent"]
    x509_svid_ttl_seconds = 1800           # optional, else identity.x509_svid_ttl_seconds
    jwt_svid_ttl_seconds = 300             # optional, else identity.jwt_svid_ttl_seconds
    authorization_server_audience = false  # optional: may this workload get JWT-SVIDs
                                           # for an authorization server credless uses?
    phantom_dir = "/run/credless-phantom"  # optional: where credless writes the placeholder
                                           # of each phantom-mode server (docs/phantom.md)

By default the Workload API refuses a JWT-SVID whose audience is an authorization server
credless obtains tokens from: that JWT-SVID is exactly the client assertion credless sends,
and a workload holding one could get its own tokens, past the proxy's policy, its DPoP
binding and its audit. A SPIFFE-native workload that is meant to talk to the authorization
server itself gets `authorization_server_audience = true`.

Matching: an entry matches when *all* its selectors are among the process's selectors.
No match ⇒ no identity (fail closed). Several matches ⇒ the entry with the most selectors
wins (the most specific statement about the process), ties go to the entry that comes first
in the file; a warning names all of them, because overlapping entries are usually a mistake.

Templates: `{type:key}` in spiffe_id is replaced by the value of the process's single
selector starting with `type:key:` (e.g. `{k8s:ns}` ← `k8s:ns:prod`). A placeholder with no
such selector, or with several, makes the entry not match that process; a value that is not
a valid SPIFFE path segment does the same. Either is logged, never silently "fixed".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent import schema
from agent.identity.spiffeid import InvalidSpiffeId, SpiffeId, TrustDomain
from agent.schema import Check, OperatorFileError, computed, non_empty, positive, required, setting

_PLACEHOLDER = re.compile(r"\{([a-z0-9_-]+:[a-z0-9_.-]+)\}")


class EntriesError(OperatorFileError):
    """entries.toml is wrong."""


def _probe(template: str) -> SpiffeId:
    """The ID `template` renders to with every placeholder filled by a harmless segment."""
    return SpiffeId.parse(_PLACEHOLDER.sub("x", template))


def _spiffe_id_template(v: Any) -> str | None:
    try:
        sid = _probe(v)
    except InvalidSpiffeId as e:
        return f'a SPIFFE ID or template such as "spiffe://example.org/ns/{{k8s:ns}}" ({e})'
    if sid.is_root:
        return "a SPIFFE ID with a path: workloads never get the trust domain's own ID"
    return None


def _in_trust_domain(td: TrustDomain) -> Check:
    def check(v: Any) -> str | None:
        if _probe(v).trust_domain == td:
            return None
        return f"a SPIFFE ID in the trust domain {td.name} this agent issues in"

    return check


def _selectors(v: Any) -> str | None:
    example = 'such as ["unix:uid:1000"]'
    if not all(isinstance(s, str) for s in v):
        return f"an array of selector strings {example}"
    if not v:
        return (
            f"at least one selector {example} (an entry without selectors would match everything)"
        )
    bad = [s for s in v if s.count(":") < 2 or not all(s.split(":", 2)[:2])]
    if bad:
        return f"selectors of the form type:key:value {example}; not: " + ", ".join(
            schema.render(s) for s in bad
        )
    return None


def _phantom_dir(v: Any) -> str | None:
    """An absolute path as the workload sees it, spelled plainly: the agent walks it one
    component at a time (agent/inject/phantom_files.py), so '..', '.' or '//' are refused
    here rather than resolved, and '/' would put placeholders beside the workload's /etc."""
    parts = v.split("/")
    if not v.startswith("/") or v == "/" or "\0" in v:
        return 'an absolute directory path other than "/", such as "/run/credless-phantom"'
    if any(p in ("", ".", "..") for p in parts[1:]):
        return "a plain absolute path: no '.', '..', '//' or trailing '/'"
    return None


@dataclass(frozen=True)
class Entry:
    # names the entry in logs and audit; an entry without one is named entry-<index>
    id: str = required("it names the entry in logs and audit", non_empty)
    # a SPIFFE ID, or a template with {type:key} fields
    spiffe_id: str = required(
        'the SPIFFE ID matching processes get, such as "spiffe://example.org/workload"',
        _spiffe_id_template,
    )
    selectors: frozenset[str] = required("what a process must have to match", _selectors)
    # absent: identity.x509_svid_ttl_seconds, identity.jwt_svid_ttl_seconds
    x509_svid_ttl_seconds: int | None = setting(None, positive)
    jwt_svid_ttl_seconds: int | None = setting(None, positive)
    order: int = computed(0)  # the entry's place in the file: ties go to the first
    # may this workload get JWT-SVIDs for an authorization server credless uses?
    authorization_server_audience: bool = setting(False)
    # where credless writes a placeholder file per phantom-mode server, in the process's
    # own filesystem view (docs/phantom.md, "A placeholder in a file"); None: no files
    phantom_dir: str | None = setting(None, _phantom_dir)

    @property
    def is_template(self) -> bool:
        return bool(_PLACEHOLDER.search(self.spiffe_id))

    def render(self, selectors: Iterable[str]) -> SpiffeId | None:
        """The SPIFFE ID for a process with `selectors`, or None if the template can't fill."""
        if not self.is_template:
            return SpiffeId.parse(self.spiffe_id)
        sels = list(selectors)
        values: dict[str, str] = {}
        for name in set(_PLACEHOLDER.findall(self.spiffe_id)):
            found = [s[len(name) + 1 :] for s in sels if s.startswith(name + ":")]
            if len(found) != 1:
                return None
            values[name] = found[0]
        rendered = _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.spiffe_id)
        try:
            sid = SpiffeId.parse(rendered)
        except InvalidSpiffeId:
            return None
        # a filled value must stay one path segment: "{k8s:ns}" may not smuggle in "/admin"
        if rendered.count("/") != self.spiffe_id.count("/"):
            return None
        return sid


@dataclass(frozen=True)
class Match:
    entry: Entry
    spiffe_id: SpiffeId
    also_matched: tuple[str, ...] = ()  # ids of other matching entries (a warning)


class Registry:
    """An immutable set of validated entries; reloading builds a new Registry."""

    def __init__(self, entries: list[Entry], trust_domain: TrustDomain, source: str = ""):
        self.entries = sorted(entries, key=lambda e: (-len(e.selectors), e.order))
        self.trust_domain = trust_domain
        self.source = source

    def match(self, selectors: Iterable[str]) -> Match | None:
        sels = frozenset(selectors)
        hits: list[tuple[Entry, SpiffeId]] = []
        for e in self.entries:
            if e.selectors <= sels and (sid := e.render(sels)) is not None:
                hits.append((e, sid))
        if not hits:
            return None
        (entry, sid), rest = hits[0], hits[1:]
        return Match(entry, sid, tuple(e.id for e, _ in rest))

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True)
class _EntriesFile:
    entry: tuple[Entry, ...] = setting((), named_by="id")


def _with_default_ids(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """An entry without an id is named by its place in the file, `entry-<index>`."""
    raw = data.get("entry")
    if not isinstance(raw, list):
        return data
    named = [{"id": f"entry-{i}", **e} if isinstance(e, dict) else e for i, e in enumerate(raw)]
    return {**data, "entry": named}


def parse(
    data: Mapping[str, Any], trust_domain: TrustDomain, source: str = "<entries>"
) -> Registry:
    problems: list[str] = []
    checks = {"entry.spiffe_id": _in_trust_domain(trust_domain)}
    file = schema.build(_EntriesFile, _with_default_ids(data), problems, checks)
    if file is None:
        raise EntriesError(source, problems)
    entries = [replace(e, order=i) for i, e in enumerate(file.entry)]
    return Registry(entries, trust_domain, source)


def load(path: str | Path, trust_domain: TrustDomain) -> Registry:
    missing = (
        "create it or set identity.entries_file (an empty file means no process gets an identity)"
    )
    return parse(schema.read_toml(path, EntriesError, missing), trust_domain, str(path))


# ------------------------------------------------------------ explaining a match
# Read-only helpers for `credless explain` (agent/explain.py): the same decision as
# Registry.match, with the reason for each entry, never a different rule.


@dataclass(frozen=True)
class Considered:
    """One entry as a process's selectors meet it."""

    entry: Entry
    matched: bool
    reason: str  # why it matched or not, for an operator
    spiffe_id: SpiffeId | None = None
    chosen: bool = False  # the entry whose SPIFFE ID the process gets


def _render_problem(entry: Entry, sels: frozenset[str]) -> str:
    """Why entry's template cannot be filled from sels (Entry.render returned None)."""
    for name in sorted(set(_PLACEHOLDER.findall(entry.spiffe_id))):
        found = [s for s in sels if s.startswith(name + ":")]
        if not found:
            return (
                f"its SPIFFE ID template needs {{{name}}}, and the process has no {name}: selector"
            )
        if len(found) > 1:
            return (
                f"its SPIFFE ID template needs {{{name}}}, and the process has "
                f"{len(found)} {name}: selectors"
            )
    return "its SPIFFE ID template fills to a value that is not one SPIFFE path segment"


def consider(entries: Iterable[Entry], selectors: Iterable[str]) -> list[Considered]:
    """Every entry, in the order Registry.match tries them (most selectors first, then file
    order), with why each does or does not match; the first that matches is chosen."""
    sels = frozenset(selectors)
    out: list[Considered] = []
    chosen = False
    for e in sorted(entries, key=lambda e: (-len(e.selectors), e.order)):
        missing = sorted(e.selectors - sels)
        if missing:
            out.append(Considered(e, False, "the process lacks " + ", ".join(missing)))
            continue
        sid = e.render(sels)
        if sid is None:
            out.append(Considered(e, False, _render_problem(e, sels)))
            continue
        n = len(e.selectors)
        if chosen:
            reason = f"all {n} selectors match, but a more specific or earlier entry is chosen"
        else:
            reason = f"all {n} selectors match; the most selectors, then the first in the file"
        out.append(Considered(e, True, reason, sid, chosen=not chosen))
        chosen = True
    return out
