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
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.identity.spiffeid import InvalidSpiffeId, SpiffeId, TrustDomain

_PLACEHOLDER = re.compile(r"\{([a-z0-9_-]+:[a-z0-9_.-]+)\}")
_ENTRY_KEYS = {
    "id",
    "spiffe_id",
    "selectors",
    "x509_svid_ttl_seconds",
    "jwt_svid_ttl_seconds",
    "authorization_server_audience",
}


class EntriesError(Exception):
    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


@dataclass(frozen=True)
class Entry:
    id: str
    spiffe_id: str  # a SPIFFE ID, or a template with {type:key} fields
    selectors: frozenset[str]
    x509_svid_ttl_seconds: int | None = None
    jwt_svid_ttl_seconds: int | None = None
    order: int = 0
    authorization_server_audience: bool = False  # JWT-SVIDs for an AS credless uses

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


def _check_entry(
    raw: Any, index: int, td: TrustDomain, seen: set[str]
) -> tuple[Entry | None, list[str]]:
    where = f"entry[{index}]"
    if not isinstance(raw, dict):
        return None, [f"{where}: expected a table [[entry]], got {type(raw).__name__}"]
    if isinstance(raw.get("id"), str):
        where += f' (id "{raw["id"]}")'
    problems = [
        f"{where}: unknown key {k!r}; accepted: {', '.join(sorted(_ENTRY_KEYS))}"
        for k in raw
        if k not in _ENTRY_KEYS
    ]
    eid = raw.get("id", f"entry-{index}")
    if not isinstance(eid, str) or not eid:
        problems.append(f"{where}: id must be a non-empty string")
    elif eid in seen:
        problems.append(f"{where}: duplicate id; every entry needs its own")
    sid = raw.get("spiffe_id")
    if not isinstance(sid, str):
        problems.append(
            f'{where}: spiffe_id is required, a string like "spiffe://{td.name}/workload"'
        )
    else:
        # validate the template with every placeholder filled by a harmless segment
        probe = _PLACEHOLDER.sub("x", sid)
        try:
            parsed = SpiffeId.parse(probe)
            if parsed.trust_domain != td:
                problems.append(
                    f"{where}: spiffe_id {sid!r} is outside the trust domain "
                    f"{td.name} this agent issues in"
                )
            elif parsed.is_root:
                problems.append(
                    f"{where}: spiffe_id {sid!r} needs a path: workloads never get "
                    "the trust domain's own ID"
                )
        except InvalidSpiffeId as e:
            problems.append(f"{where}: spiffe_id {sid!r} is not a valid SPIFFE ID: {e}")
    sels = raw.get("selectors")
    if not isinstance(sels, list) or not sels or not all(isinstance(s, str) for s in sels):
        problems.append(
            f"{where}: selectors must be a non-empty list of strings like "
            '"unix:uid:1000" (an entry without selectors would match everything)'
        )
        sels = []
    else:
        for s in sels:
            if s.count(":") < 2 or not all(s.split(":", 2)[:2]):
                problems.append(f"{where}: selector {s!r} is not of the form type:key:value")
    for ttl_key in ("x509_svid_ttl_seconds", "jwt_svid_ttl_seconds"):
        v = raw.get(ttl_key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            problems.append(f"{where}: {ttl_key} must be a positive integer, got {v!r}")
    as_audience = raw.get("authorization_server_audience", False)
    if not isinstance(as_audience, bool):
        problems.append(
            f"{where}: authorization_server_audience must be true or false, got {as_audience!r}"
        )
    if problems:
        return None, problems
    seen.add(eid)
    return Entry(
        id=eid,
        spiffe_id=sid,
        selectors=frozenset(sels),
        x509_svid_ttl_seconds=raw.get("x509_svid_ttl_seconds"),
        jwt_svid_ttl_seconds=raw.get("jwt_svid_ttl_seconds"),
        order=index,
        authorization_server_audience=as_audience,
    ), []


def parse(data: dict, trust_domain: TrustDomain, source: str = "<entries>") -> Registry:
    unknown = [k for k in data if k != "entry"]
    problems = [f"unknown top-level key {k!r}; entries are [[entry]] tables" for k in unknown]
    raw_entries = data.get("entry", [])
    if not isinstance(raw_entries, list):
        raise EntriesError(source, ["'entry' must be an array of tables: write [[entry]]"])
    entries, seen = [], set()
    for i, raw in enumerate(raw_entries):
        entry, errs = _check_entry(raw, i, trust_domain, seen)
        problems += errs
        if entry:
            entries.append(entry)
    if problems:
        raise EntriesError(source, problems)
    return Registry(entries, trust_domain, source)


def load(path: str | Path, trust_domain: TrustDomain) -> Registry:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EntriesError(
            str(p),
            [
                "file not found; create it or set identity.entries_file "
                "(an empty file means no process gets an identity)"
            ],
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise EntriesError(str(p), [f"cannot read: {e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise EntriesError(str(p), [f"not valid TOML: {e}"]) from None
    return parse(data, trust_domain, str(p))
